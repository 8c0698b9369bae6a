"""The ``cascade`` command: generate, info, bench.

A user's mistake (bad option value, missing file, empty prompt, ...) prints one line
``error: ...`` on stderr and exits with code 2.
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # process start, near enough: this module is imported first

import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import typer  # noqa: E402

from .errors import CascadeError  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Lossless speculative decoding with a cascade of drafters, fast on CPUs.",
    pretty_exceptions_enable=False,
)

TARGET_HELP = "Target model: 'default' (embedded SmolLM2-135M-Instruct), a .gguf file, a model directory or a hub id."
DRAFT_HELP = "Draft model: 'int8' (INT8 copy of the target), 'none' (plain decoding), or a model like --target."


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


def _draft_arg(draft: str):
    return None if draft.lower() in ("none", "ar", "off") else draft


class _Streamer:
    """Prints text as tokens are accepted, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.ids, self.printed = tokenizer, [], 0
        self.first_token_s: float | None = None

    def __call__(self, new: list[int]) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - _START
        self.ids.extend(new)
        text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):
            return
        sys.stdout.write(text[self.printed :])
        sys.stdout.flush()
        self.printed = len(text)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt text."),
    target: str = typer.Option("default", "--target", "-t", help=TARGET_HELP),
    draft: str = typer.Option("int8", "--draft", "-d", help=DRAFT_HELP),
    k: int = typer.Option(8, "--k", "-k", help="Draft tokens per round."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n", help="Most tokens to generate."),
    temperature: float = typer.Option(0.0, help="0 = greedy (output identical to the target's own)."),
    top_k: int = typer.Option(0, "--top-k", help="Sample among the k most likely tokens (0 = off)."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling mass (1 = off)."),
    seed: Optional[int] = typer.Option(None, help="Random seed for sampling."),
    stop: list[str] = typer.Option([], "--stop", help="Stop string (repeatable)."),
    chat: Optional[bool] = typer.Option(
        None, "--chat/--no-chat", help="Wrap the prompt in the model's chat template (default: if it has one)."
    ),
    max_len: int = typer.Option(2048, "--max-len", help="KV-cache size in tokens."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: text, token_ids, stats."),
) -> None:
    """Generate text, streaming it as it is accepted, then a one-line summary."""
    from .generator import SpeculativeGenerator

    try:
        gen = SpeculativeGenerator(target, _draft_arg(draft), K=k, max_len=max_len)
        if chat is None:
            chat = bool(getattr(gen.tokenizer, "chat_template", None))
        streamer = None if as_json else _Streamer(gen.tokenizer)
        ids = gen.generate_ids(
            prompt,
            max_new_tokens=max_new_tokens,
            temperature=temperature,
            top_k=top_k,
            top_p=top_p,
            seed=seed,
            stop=stop,
            chat=chat,
            on_tokens=streamer,
        )
    except CascadeError as e:
        _fail(str(e))
    stats = gen.get_stats()
    if as_json:
        text = gen.tokenizer.decode(ids, skip_special_tokens=True)
        typer.echo(json.dumps({"text": text, "token_ids": ids, "stats": stats}))
        return
    typer.echo("")
    line = f"[{stats['new_tokens']} tokens, {stats['tokens_per_s']:.1f} tok/s"
    if gen.draft is not None:
        line += f", acceptance {stats['acceptance_rate']:.1%}, {stats['mean_accepted_length']:.2f} tokens/round"
    line += f", stop: {stats['stop_reason']}"
    if streamer.first_token_s is not None:
        line += f", first token {streamer.first_token_s:.1f} s after start"
    line += "]"
    typer.echo(line, err=True)


@app.command()
def info(
    target: str = typer.Option("default", "--target", "-t", help=TARGET_HELP),
    draft: str = typer.Option("int8", "--draft", "-d", help=DRAFT_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Describe the loaded models: architecture, parameters, bytes, dtype."""
    from .generator import SpeculativeGenerator

    try:
        gen = SpeculativeGenerator(target, _draft_arg(draft))
    except CascadeError as e:
        _fail(str(e))
    rows = {"target": describe(gen.target)}
    if gen.draft is not None:
        rows["draft"] = describe(gen.draft)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    for role, d in rows.items():
        typer.echo(
            f"{role:7s} {d['architecture']:8s} {d['implementation']:12s} {d['parameters'] / 1e6:8.1f} M params "
            f"{d['bytes'] / 2**20:8.1f} MiB  {d['dtype']:5s} vocab {d['vocab_size']}  layers {d['layers']}"
        )


def describe(model) -> dict:
    from .engine.model import Transformer

    native = isinstance(model, Transformer)
    return {
        "architecture": model.model_type,
        "implementation": "native" if native else "transformers",
        "parameters": model.num_parameters(),
        "bytes": model.nbytes,
        "dtype": getattr(model, "quantized", None) or "fp32",
        "vocab_size": model.vocab_size,
        "layers": model.args.n_layers if native else getattr(model.config, "num_hidden_layers", None),
    }


@app.command()
def bench(
    prompts: Optional[Path] = typer.Option(None, help="Spec-Bench style JSONL (first turn of each line)."),
    per_category: int = typer.Option(2, "--per-category", help="Prompts per category (0 = all)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    methods: str = typer.Option("hf,ar,spec", help="Comma-separated methods; see --list-methods."),
    target: str = typer.Option("default", "--target", "-t", help=TARGET_HELP),
    draft: str = typer.Option("int8", "--draft", "-d", help="Draft for 'spec' (as in generate)."),
    k: int = typer.Option(8, "--k", "-k", help="Draft tokens per round for 'spec'."),
    chat: bool = typer.Option(True, "--chat/--no-chat"),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the JSON report here."),
    list_methods: bool = typer.Option(False, "--list-methods", help="List the methods and exit."),
) -> None:
    """Benchmark methods on Spec-Bench prompts: tokens/s, acceptance, greedy identity with 'ar'."""
    from .bench.methods import METHODS
    from .bench.runner import run_bench

    if list_methods:
        for name, cls in METHODS.items():
            typer.echo(f"{name:8s} {cls.description}")
        return
    try:
        report = run_bench(
            prompts=prompts,
            per_category=per_category,
            max_new_tokens=max_new_tokens,
            methods=[m.strip() for m in methods.split(",") if m.strip()],
            target=target,
            draft=_draft_arg(draft),
            k=k,
            chat=chat,
        )
    except CascadeError as e:
        _fail(str(e))
    if json_path is not None:
        try:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps(report, indent=2))
        except OSError as e:
            _fail(f"cannot write {json_path}: {e.strerror}")
        typer.echo(f"report written to {json_path}", err=True)


def main() -> None:
    import warnings

    warnings.formatwarning = lambda message, *args, **kwargs: f"warning: {message}\n"
    command = typer.main.get_command(app)
    try:
        code = command.main(standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)
    except CascadeError as e:  # raised outside a command's own handler
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except typer.TyperException as e:  # bad option value, missing argument, unknown command
        ctx = getattr(e, "ctx", None)
        hint = f" (see 'cascade {ctx.info_name} --help')" if ctx is not None and ctx.parent is not None else ""
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        if message:  # empty when the help was shown for a bare `cascade`
            typer.echo(f"error: {message}{hint}", err=True)
        sys.exit(2)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
