"""The ``cascade`` command: generate, info, bench.

A user's mistake (bad option value, missing file, empty prompt, ...) prints one line
``error: ...`` on stderr and exits with code 2.
"""

from __future__ import annotations

import time

_START = time.perf_counter()  # process start, near enough: this module is imported first

import contextlib  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import warnings  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Optional  # noqa: E402

import typer  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn  # noqa: E402

from .config import TWO_STAGE_K, CascadeConfig, load_cascade, parse_k, parse_k_matrix  # noqa: E402
from .bench.report import rich_stage_table, stage_table, stage_totals, to_json, write  # noqa: E402
from .prompts import read_prompts  # noqa: E402
from .errors import CascadeError  # noqa: E402

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Lossless speculative decoding with a cascade of drafters, fast on CPUs.",
    pretty_exceptions_enable=False,
)

TARGET_HELP = "Target model: 'default' (embedded SmolLM2-135M-Instruct), a .gguf file, a model directory or a hub id."
PRECISION_HELP = (
    "The target's weights: 'stored' (as the file stores them: GGUF blocks, bf16; fp32 activations; default), "
    "'int8' (the stored GGUF blocks against int8 activations with integer dot products, as llama.cpp computes: "
    "faster, perplexity ~0.5% higher; docs/kernels.md) or 'fp32' (dequantized)."
)
DRAFT_HELP = (
    "Draft model: 'int8' (INT8 copy of the target), 'none' (plain decoding), or a model like --target "
    "(default: the default cascade for the target)."
)


def _fail(msg: str) -> None:
    typer.echo(f"error: {msg}", err=True)
    raise typer.Exit(2)


@contextlib.contextmanager
def _user_errors(path=""):
    """A user's mistake or an unwritable/unreadable file ends the command with one ``error:`` line."""
    try:
        yield
    except CascadeError as e:
        _fail(str(e))
    except OSError as e:
        _fail(f"{e.filename or path}: {e.strerror}")


def _draft_arg(draft: str | None):
    if draft is None:
        return "default"
    return None if draft.lower() in ("none", "ar", "off") else draft


class _Streamer:
    """Prints text as tokens are accepted (``decoding.TextStream``: incomplete UTF-8 held back)."""

    def __init__(self, tokenizer) -> None:
        from .decoding import TextStream  # heavy (torch): imported when the command runs

        self.text = TextStream(tokenizer, [])
        self.first_token_s: float | None = None

    def __call__(self, new: list[int]) -> None:
        if self.first_token_s is None:
            self.first_token_s = time.perf_counter() - _START
        sys.stdout.write(self.text.feed(new))
        sys.stdout.flush()


CASCADE_HELP = "Cascade file (TOML/YAML/JSON, see docs/cascade.md); overrides --draft."


def _plan(cascade, stages, mode, k, k_matrix, lenience, tree_nodes, tree_width, tree_keep, adaptive, draft):
    """What the generate options ask for: ``(cascade or None, draft model, k)`` for SpeculativeGenerator.

    A cascade file or ``--stages`` (with the other cascade options over it) is a cascade; ``--draft``
    or a lone ``--k`` is two-stage (the INT8 copy unless a draft is named); no option at all is
    the default cascade for the target; a file with no stages is plain decoding."""
    over = {
        "mode": mode,
        "k": parse_k(k) if k is not None else None,
        "k_matrix": parse_k_matrix(k_matrix) if k_matrix is not None else None,
        "lenience": lenience,
        "tree_nodes": tree_nodes,
        "tree_width": tree_width,
        "tree_keep": tree_keep,
        "adaptive": adaptive,
    }
    over = {key: v for key, v in over.items() if v is not None}
    if cascade is not None:
        loaded = load_cascade(cascade)
        if loaded is None:  # the file asks for plain decoding
            return None, None, TWO_STAGE_K
        base = loaded.to_dict()
    elif stages is not None:
        base = {"stages": [x.strip() for x in stages.split(",") if x.strip()]}
    elif draft is not None or k is not None:
        ks = parse_k(k) if k is not None else (TWO_STAGE_K,)
        if len(ks) != 1:
            raise CascadeError("--k takes one value with --draft (several go with --stages)")
        return None, _draft_arg(draft or "int8"), ks[0]
    elif not over:
        return None, "default", TWO_STAGE_K  # resolved for the loaded target
    else:
        base = {"stages": ["mag:none", "int8"], "mag_min_ngram": 2}
    base.update(over)
    if "k_matrix" in over or ("k" not in over and stages is not None):
        base.pop("k", None)  # CascadeConfig.from_dict fills in config.default_k
    return CascadeConfig.from_dict(base), None, TWO_STAGE_K


def print_stage_table(stats: dict) -> None:
    """The per-stage breakdown of one generation (the paper's throughput breakdown and conditional
    acceptances), as the bench prints it."""
    decode_s = stats.get("total_s", 0.0) - stats.get("prefill_s", 0.0)
    stages = stage_totals([stats])
    title = "per stage (gamma g_{i+1|i}: stage i's proposals accepted by stage i+1)"
    Console(stderr=True).print(rich_stage_table(title, stage_table(stages, decode_s)))


def _keep_stdout_for_results() -> None:
    """Send what native libraries write to file descriptor 1 to stderr; Python's stdout (the text,
    the JSON) keeps the real stdout."""
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = os.fdopen(real, "w", buffering=1)


@app.command()
def generate(
    prompt: str = typer.Argument(..., help="The prompt text."),
    target: str = typer.Option("default", "--target", "-t", help=TARGET_HELP),
    draft: Optional[str] = typer.Option(None, "--draft", "-d", help=DRAFT_HELP),
    cascade: Optional[Path] = typer.Option(None, "--cascade", "--config", "-c", help=CASCADE_HELP),
    stages: Optional[str] = typer.Option(
        None, "--stages", help="Drafting stages smallest first, e.g. 'mag,int8' or 'tiny,int8' (see docs)."
    ),
    mode: Optional[str] = typer.Option(None, "--mode", help="'chain' (vertical cascade) or 'tree' (Algorithm 1)."),
    k: Optional[str] = typer.Option(None, "--k", "-k", help="Draft tokens per review, one per stage: '8' or '2,8'."),
    k_matrix: Optional[str] = typer.Option(None, "--k-matrix", help="CSD k_matrix, e.g. '6,3;0,2' (increments)."),
    lenience: Optional[float] = typer.Option(None, help="CSD lenience below the target (greedy only; lossy never)."),
    tree_nodes: Optional[int] = typer.Option(None, "--tree-nodes", help="Tree mode: nodes stage 0 drafts."),
    tree_width: Optional[int] = typer.Option(None, "--tree-width", help="Tree mode: most nodes per level."),
    tree_keep: Optional[int] = typer.Option(None, "--tree-keep", help="Tree mode: nodes the filter keeps."),
    adaptive: Optional[bool] = typer.Option(
        None, "--adaptive/--fixed", help="Chain: each round chooses how many of the last k the target verifies."
    ),
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
    precision: Optional[str] = typer.Option(None, "--precision", help=PRECISION_HELP),
    show_stats: bool = typer.Option(False, "--stats", help="Print the per-stage breakdown after the text."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: text, token_ids, stats."),
    backend: str = typer.Option("torch", "--backend", help="The target's engine: 'torch' (native) or 'jax' (a mesh)."),
    mesh: Optional[str] = typer.Option(None, "--mesh", help="JAX mesh axes, e.g. 'model=4' or 'data=2,model=2'."),
    coordinator: Optional[str] = typer.Option(
        None, "--coordinator", envvar="CASCADE_COORDINATOR", help="Multi-host JAX: process 0's HOST:PORT."
    ),
    num_processes: Optional[int] = typer.Option(
        None, "--num-processes", envvar="CASCADE_NUM_PROCESSES", help="Multi-host JAX: number of processes."
    ),
    process_id: Optional[int] = typer.Option(
        None, "--process-id", envvar="CASCADE_PROCESS_ID", help="Multi-host JAX: this process's index (0 prints)."
    ),
) -> None:
    """Generate text, streaming it as it is accepted, then a one-line summary.

    With no cascade options the target runs its default cascade, adaptive (see docs/cascade.md).
    With --backend jax the target's forwards run on a JAX mesh (docs/distributed.md)."""
    from .generator import SpeculativeGenerator  # heavy (torch): imported when the command runs

    quiet = False  # a multi-host run's processes other than 0 print nothing
    try:
        if backend == "jax":
            from .engine import jax_target  # the optional JAX backend
            from .engine.loader import cache_dir  # heavy (torch): imported when the command runs

            if coordinator is not None:
                _keep_stdout_for_results()  # the collectives library prints to the process's stdout
            jax_target.initialize(coordinator, num_processes, process_id)
            jax_target.enable_compilation_cache(cache_dir() / "jax")
            quiet = jax_target.process_index() != 0
        elif coordinator or num_processes or process_id is not None:
            raise CascadeError("--coordinator, --num-processes and --process-id are for --backend jax")
        config, draft_model, draft_k = _plan(
            cascade, stages, mode, k, k_matrix, lenience, tree_nodes, tree_width, tree_keep, adaptive, draft
        )
        gen = SpeculativeGenerator(
            target, draft_model, K=draft_k, max_len=max_len, cascade=config, precision=precision,
            backend=backend, mesh=mesh, progress=not quiet,
        )
        if chat is None:
            chat = bool(getattr(gen.tokenizer, "chat_template", None))
        streamer = None if as_json or quiet else _Streamer(gen.tokenizer)
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
    if quiet:
        return
    if as_json:
        text = gen.tokenizer.decode(ids, skip_special_tokens=True)
        cfg = gen.config.to_dict() if gen.config is not None else None
        body = {"text": text, "token_ids": ids, "cascade": cfg, "stats": stats}
        if backend == "jax":
            body["jax"] = {
                "backend": gen.target.backend_name,
                "compile_cache_hits": jax_target.CACHE_EVENTS["hits"],
                "compile_cache_misses": jax_target.CACHE_EVENTS["misses"],
                "seconds_since_start": time.perf_counter() - _START,
            }
        typer.echo(json.dumps(body))
        return
    typer.echo("")
    line = f"[{stats['new_tokens']} tokens, {stats['tokens_per_s']:.1f} tok/s"
    if gen.speculative:
        line += f", acceptance {stats['acceptance_rate']:.1%}, {stats['mean_accepted_length']:.2f} tokens/round"
    line += f", stop: {stats['stop_reason']}"
    if streamer.first_token_s is not None:
        line += f", first token {streamer.first_token_s:.1f} s after start"
    line += "]"
    typer.echo(line, err=True)
    if show_stats:
        if gen.config is not None:
            typer.echo(f"cascade: {gen.config.describe()}", err=True)
        counts = stats.get("rounds_by_draft_length") or []
        if gen.speculative and counts:
            typer.echo("rounds by draft tokens verified: " + ", ".join(f"{k}: {n}" for k, n in enumerate(counts) if n), err=True)
        print_stage_table(stats)


@app.command()
def serve(
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on."),
    port: int = typer.Option(8000, "--port", help="Port to listen on."),
    target: str = typer.Option("default", "--target", "-t", help=TARGET_HELP),
    draft: Optional[str] = typer.Option(None, "--draft", "-d", help=DRAFT_HELP),
    cascade: Optional[Path] = typer.Option(None, "--cascade", "--config", "-c", help=CASCADE_HELP),
    stages: Optional[str] = typer.Option(None, "--stages", help="Drafting stages smallest first, e.g. 'mag,int8'."),
    mode: Optional[str] = typer.Option(None, "--mode", help="'chain' (batched) or 'tree' (runs alone)."),
    k: Optional[str] = typer.Option(None, "--k", "-k", help="Draft tokens per review, one per stage: '8' or '2,8'."),
    k_matrix: Optional[str] = typer.Option(None, "--k-matrix", help="CSD k_matrix, e.g. '6,3;0,2' (increments)."),
    lenience: Optional[float] = typer.Option(None, help="CSD lenience below the target (greedy only)."),
    adaptive: Optional[bool] = typer.Option(None, "--adaptive/--fixed", help="Chain: choose k per round."),
    max_len: int = typer.Option(2048, "--max-len", help="KV-cache size per sequence, in tokens."),
    precision: Optional[str] = typer.Option(None, "--precision", help=PRECISION_HELP),
    max_batch: int = typer.Option(16, "--max-batch", help="Most sequences verified in one target forward."),
    max_queue: int = typer.Option(256, "--max-queue", help="Most requests waiting for a row (then 429)."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="CASCADE_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 routes."
    ),
    model_name: Optional[str] = typer.Option(None, "--served-model-name", help="The model name clients use."),
    drain_timeout: float = typer.Option(30.0, "--drain-timeout", help="SIGTERM: seconds to let running requests end."),
) -> None:
    """Serve the target over an OpenAI-compatible HTTP API, batching every running request's rounds.

    Same model and cascade options as generate; see docs/serving.md."""
    try:
        import uvicorn  # the optional 'serve' dependencies: uvicorn, fastapi, prometheus-client

        from .serve import create_app, model_name_for  # heavy (torch) and needs the same extras
    except ImportError as e:
        _fail(f"cascade serve needs its extra dependencies ({e.name} is missing): pip install 'speculative-cascade[serve]'")
    from .generator import SpeculativeGenerator  # heavy (torch): imported when the command runs

    if not 0 < port < 65536:
        _fail(f"--port must be in 1..65535, got {port}")
    with _user_errors():
        config, draft_model, draft_k = _plan(
            cascade, stages, mode, k, k_matrix, lenience, None, None, None, adaptive, draft
        )
        if config is None and draft_model not in (None, "default"):  # --draft X: the two-stage cascade X -> target
            config = CascadeConfig(stages=(draft_model,), k=(draft_k,))
        gen = SpeculativeGenerator(
            target, draft_model if draft_model == "default" else None, max_len=max_len, cascade=config,
            precision=precision,
        )
        name = model_name or model_name_for(target)
        app_ = create_app(gen, model_name=name, max_batch=max_batch, max_queue=max_queue, api_key=api_key,
                          drain_timeout=drain_timeout)
    from .engine import kernels  # heavy (torch): imported when the command runs

    kern = kernels.get()
    desc = gen.config.describe() if gen.config is not None else "plain decoding"
    typer.echo(
        f"serving {name} on http://{host}:{port}/v1 (cascade: {desc}; kernels: "
        f"{kern.variant if kern else 'torch'} on {kernels.cpu_name()}; max batch {max_batch})",
        err=True,
    )
    uvicorn.run(app_, host=host, port=port, log_level="warning", timeout_graceful_shutdown=int(drain_timeout))


@app.command()
def info(
    target: str = typer.Option("default", "--target", "-t", help=TARGET_HELP),
    draft: str = typer.Option("int8", "--draft", "-d", help=DRAFT_HELP),
    precision: str = typer.Option("stored", "--precision", help=PRECISION_HELP),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Describe the machine's kernels and the loaded models: architecture, parameters, bytes, format."""
    from .engine import kernels  # heavy (torch): imported when the command runs
    from .generator import SpeculativeGenerator  # heavy (torch): imported when the command runs

    try:
        gen = SpeculativeGenerator(target, _draft_arg(draft), precision=precision)
    except CascadeError as e:
        _fail(str(e))
    st = kernels.status()
    rows = {"cpu": kernels.cpu_name(), "kernels": st, "target": describe(gen.target)}
    if gen.draft is not None:
        rows["draft"] = describe(gen.draft)
    if as_json:
        typer.echo(json.dumps(rows, indent=2))
        return
    typer.echo(f"cpu     {rows['cpu']}")
    line = f"kernels {st['kernel']} (built: {', '.join(st['built']) or 'none'}; this CPU runs: {', '.join(st['cpu_runs'])})"
    typer.echo(line + (f"; {st['reason']}" if st["reason"] else ""))
    for role in ("target", "draft"):
        if role in rows:
            d = rows[role]
            typer.echo(
                f"{role:7s} {d['architecture']:8s} {d['implementation']:12s} {d['parameters'] / 1e6:8.1f} M params "
                f"{d['bytes'] / 2**20:8.1f} MiB  {d['dtype']}  vocab {d['vocab_size']}  layers {d['layers']}"
                + (f"  ({d['huge_page_bytes'] / 2**20:.0f} MiB in 2 MiB pages)" if d["huge_page_bytes"] else "")
            )


def describe(model) -> dict:
    from .engine import pages  # heavy (torch): imported when the command runs
    from .engine.transformer import Transformer  # heavy (torch): imported when the command runs

    native = isinstance(model, Transformer)
    return {
        "architecture": model.model_type,
        "implementation": "native" if native else "transformers",
        "parameters": model.num_parameters(),
        "bytes": model.nbytes,
        "dtype": getattr(model, "quantized", None) or (model.weight_format if native else "fp32"),
        "vocab_size": model.vocab_size,
        "layers": model.args.n_layers if native else getattr(model.config, "num_hidden_layers", None),
        # weights the system holds in 2 MiB pages (dense float targets ask for them; None: not Linux)
        "huge_page_bytes": pages.huge_bytes(model.layers[0].attention.wqkv.packed.data) if native else None,
    }


@app.command()
def bench(
    prompts: Optional[Path] = typer.Option(None, help="Spec-Bench style JSONL (first turn of each line)."),
    per_category: int = typer.Option(2, "--per-category", help="Prompts per category (0 = all)."),
    max_prompts: int = typer.Option(0, "--max-prompts", help="At most this many of those prompts (0 = all)."),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", "-n"),
    methods: str = typer.Option("hf,ar,spec", help="Comma-separated methods; see --list-methods."),
    target: str = typer.Option("default", "--target", "-t", help=TARGET_HELP),
    precision: str = typer.Option("stored", "--precision", help=PRECISION_HELP),
    draft: str = typer.Option("int8", "--draft", "-d", help="Draft for 'spec' (as in generate)."),
    k: int = typer.Option(TWO_STAGE_K, "--k", "-k", help="Draft tokens per round for 'spec'."),
    cascade: Optional[Path] = typer.Option(None, "--cascade", help="Also bench this cascade file as 'custom'."),
    predict: bool = typer.Option(
        True, "--predict/--no-predict", help="Profile each native method on held-out prompts and print the prediction."
    ),
    sampling_check: int = typer.Option(
        100, "--sampling-check", help="Sampled generations per method for the distribution check (0: off)."
    ),
    chat: bool = typer.Option(True, "--chat/--no-chat"),
    repeats: int = typer.Option(
        3, "--repeats", help="Runs of each method on each prompt (taking turns); each prompt's median run counts."
    ),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the JSON report here."),
    report_dir: Optional[Path] = typer.Option(
        None, "--report", help="Write report.json, report.md and PNG plots into this folder."
    ),
    list_methods: bool = typer.Option(False, "--list-methods", help="List the methods and exit."),
) -> None:
    """Benchmark methods on Spec-Bench prompts: tokens/s, acceptance, greedy identity with 'ar'."""
    from .bench.methods import METHODS  # heavy (torch): imported when the command runs
    from .bench.runner import BenchSettings, run_bench  # heavy (torch): imported when the command runs

    if list_methods:
        for name, cls in METHODS.items():
            typer.echo(f"{name:12s} {cls.description}")
        return
    try:
        settings = BenchSettings(
            methods=[m.strip() for m in methods.split(",") if m.strip()],
            prompts=prompts,
            per_category=per_category,
            max_prompts=max_prompts,
            max_new_tokens=max_new_tokens,
            target=target,
            precision=precision,
            draft=_draft_arg(draft),
            k=k,
            chat=chat,
            cascade=cascade,
            predict=predict,
            sampling_check=sampling_check,
            repeats=repeats,
        )
        report = run_bench(settings)
    except CascadeError as e:
        _fail(str(e))
    if json_path is not None:
        try:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(to_json(report))
        except OSError as e:
            _fail(f"cannot write {json_path}: {e.strerror}")
        typer.echo(f"report written to {json_path}", err=True)
    if report_dir is not None:
        with _user_errors(report_dir):
            files = write(report, report_dir)
        typer.echo(f"report written to {', '.join(str(f) for f in files)}", err=True)


@app.command()
def perplexity(
    target: str = typer.Option("default", "--target", "-t", help=TARGET_HELP),
    precisions: str = typer.Option(
        "stored,int8", "--precision", help="Comma-separated precisions to compare; the first is the baseline."
    ),
    text: Optional[Path] = typer.Option(None, "--text", help="A UTF-8 text file (default: the one shipped)."),
    window: int = typer.Option(512, "--window", help="Tokens scored per forward."),
) -> None:
    """Perplexity of the target on a text at several precisions: what int8 activations cost in quality."""
    from .bench.perplexity import compare  # heavy (torch): imported when the command runs

    wanted = [p.strip() for p in precisions.split(",") if p.strip()]
    if not wanted:
        _fail("--precision: name at least one precision")
    if window < 2:
        _fail("--window must be at least 2")
    body = None
    if text is not None:
        with _user_errors(text):
            body = text.read_text(encoding="utf-8")
    try:
        rows = compare(target, wanted, body, window)
    except (CascadeError, ValueError) as e:
        _fail(str(e))
    typer.echo(f"{'precision':10s} {'weights':28s} {'tokens':>6s} {'perplexity':>11s} {'vs first':>9s}")
    for r in rows:
        typer.echo(f"{r['precision']:10s} {r['format']:28s} {r['tokens']:6d} {r['perplexity']:11.4f} {r['ratio']:9.4f}")


@app.command("bench-serve")
def bench_serve(
    target: str = typer.Option("default", "--target", "-t", help=TARGET_HELP),
    precision: Optional[str] = typer.Option(None, "--precision", help=PRECISION_HELP),
    clients: str = typer.Option("1,4,16,64", "--clients", help="Concurrent clients per level, comma-separated."),
    max_tokens: int = typer.Option(64, "--max-tokens", "-n", help="Tokens per request."),
    max_batch: int = typer.Option(64, "--max-batch", help="The server's --max-batch."),
    n_prompts: int = typer.Option(8, "--prompts", help="Distinct prompts, sent in turn."),
    prompt_set: str = typer.Option(
        "short", "--prompt-set", help="'short' (shipped one-line instructions) or 'spec-bench' (one per category)."
    ),
    modes: str = typer.Option("cascade,plain", "--modes", help="'cascade' (the default cascade) and/or 'plain'."),
    repeats: int = typer.Option(
        3, "--repeats", help="Runs of each mode at each level (the modes take turns); the median run counts."
    ),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write the figures here as JSON."),
    markdown_path: Optional[Path] = typer.Option(None, "--markdown", help="Write the table here as Markdown."),
) -> None:
    """Load a local server with 1, 4, 16, 64 concurrent streaming clients: total tokens/s, with and without the cascade."""
    try:
        from .bench.serving import bench_prompts, markdown, run_serving_bench  # needs the 'serve' extra and openai
        import openai  # noqa: F401  # the client the load is sent with (an optional dependency)
    except ImportError as e:
        _fail(f"bench-serve needs the server's dependencies and the openai client ({e.name} is missing): "
              "pip install 'speculative-cascade[serve]' openai")
    from .engine import kernels  # heavy (torch): imported when the command runs
    from .generator import SpeculativeGenerator  # heavy (torch): imported when the command runs

    with _user_errors():
        levels = tuple(int(x) for x in clients.split(",") if x.strip())
        if not levels or min(levels) < 1:
            raise CascadeError("--clients takes positive integers, e.g. 1,4,16,64")
        chosen = tuple(m.strip() for m in modes.split(",") if m.strip())
        if not chosen or set(chosen) - {"cascade", "plain"}:
            raise CascadeError("--modes takes 'cascade' and/or 'plain'")
        if max_tokens < 1 or max_batch < 1 or n_prompts < 1 or repeats < 1:
            raise CascadeError("--max-tokens, --max-batch, --prompts and --repeats must be >= 1")
        bench_prompts(n_prompts, prompt_set)  # a bad prompt set fails before the model loads
        gen = SpeculativeGenerator(target, max_len=1024, precision=precision)
    kern = kernels.get()
    where = f"{kernels.cpu_name()}, kernels {kern.variant if kern else 'torch'}"
    desc = gen.config.describe() if gen.config is not None else "plain decoding"

    def show(p) -> None:
        typer.echo(
            f"{p.clients:3d} clients {p.mode:8s} {p.tokens_per_s:7.1f} tok/s  TTFT p50 {p.ttft_p50_s:5.2f} s  "
            f"drafted/round {p.drafted_per_round:4.2f}  acceptance {p.acceptance:6.1%}  "
            f"identical {'yes' if p.identical else 'NO'}",
            err=True,
        )

    typer.echo(f"bench-serve on {where}; cascade: {desc}; {max_tokens} tokens per request", err=True)
    points = run_serving_bench(
        gen, clients=levels, max_tokens=max_tokens, max_batch=max_batch, n_prompts=n_prompts, modes=chosen,
        prompt_set=prompt_set, repeats=repeats, progress=show,
    )
    table = markdown(
        points, f"Server throughput ({where}; cascade: {desc}; {prompt_set} prompts, {max_tokens} tokens per request, greedy)"
    )
    typer.echo(table)
    with _user_errors():
        if json_path is not None:
            json_path.write_text(json.dumps({"machine": where, "cascade": desc, "points": [p.to_dict() for p in points]}, indent=1))
        if markdown_path is not None:
            markdown_path.write_text(table + "\n")


@app.command()
def tune(
    target: str = typer.Option("default", "--target", "-t", help=TARGET_HELP),
    prompts: Optional[Path] = typer.Option(None, help="Calibration prompts, one per line (default: 4 shipped ones)."),
    n_prompts: int = typer.Option(4, "--n-prompts", min=1, help="How many calibration prompts to use."),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens", "-n", min=8, help="Tokens per calibration run."),
    drafts: str = typer.Option("int8,int4", help="Neural drafts to consider (comma-separated stage specs)."),
    mag: bool = typer.Option(True, "--mag/--no-mag", help="Also consider MaG in front of each draft."),
    out: Path = typer.Option(Path("cascade.toml"), "--out", "-o", help="Where to write the best configuration."),
    precision: str = typer.Option("stored", "--precision", help=PRECISION_HELP),
) -> None:
    """Measure this machine, predict every configuration with the cost model, write the fastest."""
    from .cost.tune import tune as run_tune  # heavy (torch): imported when the command runs
    from .generator import SpeculativeGenerator  # heavy (torch): imported when the command runs

    with _user_errors(out):
        gen = SpeculativeGenerator(target, None, precision=precision)
        texts = read_prompts(prompts)[:n_prompts]
        chat = bool(getattr(gen.tokenizer, "chat_template", None))
        ids = [gen.encode(t, chat=chat) for t in texts]
        with console_status("calibrating") as step:
            result = run_tune(
                gen.target,
                gen.tokenizer,
                ids,
                max_new_tokens=max_new_tokens,
                max_len=gen.max_len,
                drafts=[d.strip() for d in drafts.split(",") if d.strip()],
                with_mag=mag,
                progress=step,
            )
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(result.to_toml())
    typer.echo(
        f"{'candidate':14s} {'draft ms/token':>14s} {'overhead ms':>11s} {'best k':>6s} {'predicted tok/s':>15s}"
    )
    for c in result.candidates:
        k, rate = max(c.predictions.items(), key=lambda kv: kv[1])
        typer.echo(f"{c.name:14s} {c.token_cost * 1e3:14.2f} {c.overhead * 1e3:11.2f} {k:6d} {rate:15.1f}")
    typer.echo(
        f"{'autoregressive':14s} {result.target_cost(1) * 1e3:14.2f} {'':11s} {'':6s} "
        f"{result.predicted_ar_tokens_per_s:15.1f}"
    )
    if result.config is None:
        typer.echo("no speculation is predicted to beat autoregressive decoding here: use --draft none")
    else:
        typer.echo(
            f"best: {result.config.describe()}, predicted {result.predicted_tokens_per_s:.1f} tok/s "
            f"({result.predicted_tokens_per_s / result.predicted_ar_tokens_per_s:.2f}x autoregressive)"
        )
    typer.echo(f"wrote {out} in {result.seconds:.0f} s; use it with: cascade generate --config {out} PROMPT")
    from .builder import calibration  # heavy (torch): imported when the command runs

    with _user_errors():
        cal = calibration(gen.target)
        before = dict(cal.ratios)
        cal.refine(result.target_cost)
        cal.save()
    changes = ", ".join(
        f"n={n}: {before[n]:.2f} -> {r:.2f}" if n in before else f"n={n}: {r:.2f}" for n, r in sorted(cal.ratios.items())
    )
    typer.echo(f"adaptive calibration {cal.path}: target T(n)/T(1) {changes}")


class console_status:
    """A spinner with the current step on stderr (rich), as a context manager yielding ``step(text)``."""

    def __init__(self, title: str) -> None:
        self.status = Console(stderr=True).status(title)

    def __enter__(self):
        self.status.__enter__()
        return lambda text: self.status.update(f"calibrated {text}")

    def __exit__(self, *exc):
        return self.status.__exit__(*exc)


@app.command()
def distill(
    target: str = typer.Option("default", "--target", "-t", help=TARGET_HELP),
    teacher: str = typer.Option("target", help="Distil from 'target' or from its 'int8' draft."),
    prompts: Optional[Path] = typer.Option(None, help="Prompts, one per line (default: the shipped list)."),
    text: Optional[Path] = typer.Option(None, help="Train on this text instead of the teacher's generations."),
    max_new_tokens: int = typer.Option(192, "--max-new-tokens", "-n", help="Tokens generated per prompt."),
    epochs: int = typer.Option(12, min=1),
    batch_size: int = typer.Option(1024, "--batch-size", min=1),
    lr: float = typer.Option(3e-3, min=0.0),
    seed: int = typer.Option(0),
    out: Path = typer.Option(Path("tiny.safetensors"), "--out", "-o", help="Tiny-model checkpoint to write."),
    bigram_out: Optional[Path] = typer.Option(None, "--bigram-out", help="Also write MaG's bigram table here."),
    work_dir: Path = typer.Option(Path("distill-work"), "--work-dir", help="Sequences and training checkpoints."),
    resume: bool = typer.Option(False, "--resume", help="Continue from the checkpoint in --work-dir."),
) -> None:
    """Train the tiny projection model by distillation (and MaG's bigram table) for a target."""
    from . import distill as D  # heavy (torch): imported when the command runs
    from .generator import SpeculativeGenerator  # heavy (torch): imported when the command runs
    from .stages.mag import BigramTable  # heavy (torch): imported when the command runs
    from .stages.tiny import TinyProjection  # heavy (torch): imported when the command runs

    if teacher not in ("target", "int8"):
        _fail(f"--teacher must be 'target' or 'int8', got {teacher!r}")
    cfg = D.DistillConfig(max_new_tokens=max_new_tokens, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed)
    bar = [TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn()]
    with _user_errors(out):
        work_dir.mkdir(parents=True, exist_ok=True)
        gen = SpeculativeGenerator(target, "int8")
        seq_file = work_dir / "sequences.json"
        with Progress(*bar, transient=False) as progress:
            if resume and seq_file.is_file():
                seqs = json.loads(seq_file.read_text())
            elif text is not None:
                seqs = D.text_sequences(gen.tokenizer, text)
            else:
                plist = read_prompts(prompts)
                task = progress.add_task("teacher generations", total=len(plist))
                seqs = D.generate_sequences(gen, plist, cfg.max_new_tokens, lambda: progress.advance(task))
            seq_file.write_text(json.dumps(seqs))
            train_seqs, hold_seqs = D.split(seqs, cfg.holdout, cfg.seed)
            teacher_model = gen.target if teacher == "target" else gen.draft
            task = progress.add_task("teacher soft labels", total=len(seqs))
            data = D.soft_labels(teacher_model, train_seqs, lambda: progress.advance(task))
            held = D.soft_labels(teacher_model, hold_seqs, lambda: progress.advance(task))
            __import__("torch").manual_seed(cfg.seed)
            tiny = TinyProjection(gen.target.tok_embeddings.weight)
            steps = cfg.epochs * max(1, -(-len(data[0]) // cfg.batch_size))
            task = progress.add_task("training", total=steps)

            def step(epoch, loss):
                progress.update(task, advance=1, description=f"training (epoch {epoch + 1}, loss {loss:.3f})")

            result = D.train(tiny, data, cfg, checkpoint=work_dir / "train.pt", resume=resume, on_step=step)
        fp32_agree = D.agreement(tiny, held[0], held[1])
        tiny.quantize_head()
        int8_agree = D.agreement(tiny, held[0], held[1])
        out.parent.mkdir(parents=True, exist_ok=True)
        tiny.save(out, meta={"teacher": teacher, "positions": len(data[0]), "heldout_agreement": int8_agree})
        table = BigramTable.from_sequences(train_seqs, gen.target.vocab_size)
        bigram_agree = D.bigram_agreement(table, held[0], held[1])
        if bigram_out is not None:
            table.save(bigram_out)
    typer.echo(
        f"trained on {len(data[0])} positions ({len(train_seqs)} sequences) in {result['seconds']:.0f} s; "
        f"held-out greedy agreement with the teacher over {len(held[0])} positions: "
        f"tiny {int8_agree:.1%} (fp32 head {fp32_agree:.1%}), bigram table {bigram_agree:.1%}"
    )
    typer.echo(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB)" + (f" and {bigram_out}" if bigram_out else ""))


def main() -> None:
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
