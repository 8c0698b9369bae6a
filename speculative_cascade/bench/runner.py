"""Runs benchmark methods over Spec-Bench style prompts and builds the report."""

from __future__ import annotations

import ctypes
import gc
import math
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from ..config import TWO_STAGE_K, CascadeConfig
from ..cost.calibrate import RoundProfiler, measure_target_cost
from ..decoding import StopChecker, generate_tokens
from ..engine import kernels, pages
from ..engine.loader import load_model
from ..engine.transformer import Transformer
from ..errors import CascadeError
from ..prompts import encode as encode_prompt
from ..prompts import held_out, load_prompts, read_prompts
from ..sampling import SamplingParams
from .methods import METHODS, BenchContext, Method, Result
from .report import BenchReport, Prediction, add_prediction, add_speedups, method_report, print_terminal

CALIBRATION_TOKENS = 48  # new tokens per calibration prompt
@dataclass
class BenchSettings:
    """What ``cascade bench`` was asked to run (its options)."""

    methods: list[str]
    prompts: Path | None = None  # Spec-Bench JSONL (None: the shared Spec-Bench questions)
    per_category: int = 2
    max_new_tokens: int = 128
    target: str | None = None
    precision: str = "stored"
    draft: str | None = "int8"  # the draft of 'spec'
    k: int = TWO_STAGE_K  # draft tokens per round of 'spec'
    chat: bool = True
    max_len: int = 4096
    cascade: Path | None = None  # a cascade file, benched as 'custom'
    predict: bool = True
    sampling_check: int = 100
    repeats: int = 3  # runs of each method on each prompt, taking turns; the median run counts
    max_prompts: int = 0  # at most this many prompts after the per-category choice (0: all)

    def check(self) -> None:
        """Every mistake in the options, before anything is loaded."""
        if self.cascade is None and "custom" in self.methods:
            raise CascadeError("method 'custom' needs --cascade FILE")
        if self.cascade is not None and "custom" not in self.methods:
            self.methods = list(self.methods) + ["custom"]
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown or not self.methods:
            raise CascadeError(f"unknown method(s) {unknown or self.methods}; choose from {', '.join(METHODS)}")
        for m in self.methods:
            METHODS[m].check()
        if self.max_new_tokens < 1:
            raise CascadeError("--max-new-tokens must be >= 1")
        if self.sampling_check < 0:
            raise CascadeError("--sampling-check must be >= 0")
        if self.repeats < 1:
            raise CascadeError("--repeats must be >= 1")
        if self.k < 1:
            raise CascadeError("--k must be >= 1")


@dataclass
class MethodRun:
    """What running one method measured."""

    results: list[Result]  # per prompt: the median of its runs
    tries: list[list[tuple]] = field(default_factory=list)  # per prompt: (decode s, wall s) of every run
    profiler: RoundProfiler | None = None  # the cost model's profile of its rounds, generation by generation
    prediction: Prediction | None = None
    sampling_check: dict | None = None
    peak_rss_mb: float | None = None


def run_bench(settings: BenchSettings, *, quiet: bool = False) -> BenchReport:
    """Run every method over the prompts, print the tables, and return the report."""
    settings.check()
    custom = CascadeConfig.from_file(settings.cascade) if settings.cascade is not None else None
    rows = load_prompts(settings.prompts, settings.per_category)
    if settings.max_prompts < 0:
        raise CascadeError("--max-prompts must be >= 0")
    rows = rows[: settings.max_prompts or None]
    console = Console(stderr=True, quiet=quiet)
    loaded = load_model(settings.target, precision=settings.precision)
    machine = _machine(loaded.model)
    console.print(_machine_line(machine))
    max_len = min(settings.max_len, getattr(loaded.model, "max_position_embeddings", settings.max_len))
    ctx = BenchContext(loaded, settings.draft, settings.k, max_len)
    ctx.custom = custom
    use_chat = settings.chat and bool(getattr(loaded.tokenizer, "chat_template", None))

    def encode(text: str) -> list[int]:
        return encode_prompt(loaded.tokenizer, text, use_chat)

    limit = max_len - settings.max_new_tokens - settings.k - 1  # longest prompt that leaves room to generate
    rows = _encode_rows(rows, encode, limit, console)
    if settings.predict or "auto" in settings.methods:
        held = [ids for ids in map(encode, held_out(settings.prompts, rows)) if len(ids) <= limit]
        ctx.calibration_prompts = held or [encode(t) for t in read_prompts(None)[:4]]
        # the workload the predictions are for: the benchmark's mean context while decoding
        ctx.context = sum(len(r["ids"]) + settings.max_new_tokens / 2 for r in rows) / len(rows)
    order = sorted(dict.fromkeys(settings.methods), key=lambda m: m != "ar")  # 'ar' first: the reference
    runs: dict[str, MethodRun] = {}
    with Progress(console=console, transient=False) as progress:
        methods = {}
        for name in order:
            methods[name], runs[name] = _prepare_method(name, ctx, settings, encode, progress)
        # the methods take turns on each prompt (who starts rotates), so that a machine whose speed
        # drifts during the run slows them alike and their ratios are measured side by side; each
        # runs each prompt `repeats` times and its median run counts (one slow spell of a shared
        # machine then moves no figure). The cost model's profiling generations (held-out
        # prompts) take turns with them, so that prediction and measurement see the same machine.
        profiled = [n for n in order if runs[n].profiler is not None]
        cal = ctx.calibration_prompts if profiled else []
        task = progress.add_task("prompts", total=len(rows) * len(order) * settings.repeats + len(cal) * len(profiled))
        turn, done, eos = 0, 0, ctx.eos_ids()
        bandwidth = [machine["bandwidth_gb_s"]]
        for i, r in enumerate(rows):
            tries: dict[str, list[Result]] = {name: [] for name in order}
            for _ in range(settings.repeats):
                for name in _rotated(order, turn):
                    tries[name].append(methods[name].run(r["ids"], settings.max_new_tokens))
                    progress.advance(task)
                turn += 1
            bandwidth.append(_bandwidth())  # the probe again between prompts: a shared machine's varies
            for name in order:
                runs[name].results.append(median_run(tries[name]))
                runs[name].tries.append([(t.decode_seconds, t.seconds) for t in tries[name]])
            for ids in cal[done : (i + 1) * len(cal) // len(rows)]:  # this prompt's share of the profiling
                for name in _rotated(profiled, turn):
                    runs[name].profiler.run(methods[name].target_stage, ids, max_new_tokens=CALIBRATION_TOKENS, eos=eos)
                    progress.advance(task)
                done += 1
        for name in order:
            if runs[name].profiler is not None:
                runs[name].prediction = _predict(ctx, runs[name].profiler.result(), None, settings.max_new_tokens)
            elif settings.predict and methods[name].round is not None and methods[name].tuned is not None:
                tuned = methods[name].tuned
                k = tuned.config.k[-1] if tuned.config is not None else 0
                runs[name].prediction = _predict(ctx, tuned.profile, k, settings.max_new_tokens)
        for name in order:
            _sampling(name, methods[name], ctx, settings, encode, progress, runs[name])
        task = progress.add_task("perplexity", total=len(rows))
        ppl = _perplexities(ctx.target, rows, {n: r.results for n, r in runs.items()}, order,
                            lambda: progress.advance(task))
        methods.clear()  # the methods' drafts and caches go, then each is measured alone
        ctx.release()
        _let_go()
        longest = max(rows, key=lambda r: len(r["ids"]))["ids"]
        task = progress.add_task("memory", total=len(order))
        for name in order:
            runs[name].peak_rss_mb = _peak_memory(name, ctx, longest, settings.max_new_tokens)
            progress.advance(task)
    _bandwidth_over_run(machine, bandwidth)
    report = _build_report(settings, loaded.name, ctx, machine, rows, runs, ppl)
    print_terminal(report, console)
    return report


def _rotated(names: list[str], turn: int) -> list[str]:
    """``names`` starting from the ``turn``-th (who goes first rotates from turn to turn)."""
    k = turn % len(names)
    return names[k:] + names[:k]


def median_run(tries: list[Result]) -> Result:
    """The run of median decoding time (wall time where the method cannot tell its prefill apart;
    the faster middle one of an even number)."""
    def key(r: Result) -> float:
        return r.decode_seconds if r.decode_seconds is not None else r.seconds

    return sorted(tries, key=key)[(len(tries) - 1) // 2]


def _machine_line(machine: dict) -> str:
    line = (
        f"cpu: {machine['cpu']}; kernels: {machine['kernel']}; {machine['threads']} threads; "
        f"streaming read {machine['bandwidth_gb_s']:.1f} GB/s"
    )
    if machine.get("decode_mb"):
        line += (
            f"; target {machine['weight_format']} reads {machine['decode_mb']:.0f} MB a token: "
            f"bound {machine['bound_tokens_per_s']:.0f} tok/s"
        )
    return line


def _encode_rows(rows: list[dict], encode, limit: int, console: Console) -> list[dict]:
    for r in rows:
        r["ids"] = encode(r["prompt"])
    skipped = [r["id"] for r in rows if len(r["ids"]) > limit]
    if skipped:
        console.print(f"skipping {len(skipped)} prompt(s) longer than {limit} tokens: {skipped}")
    return [r for r in rows if len(r["ids"]) <= limit]


def _prepare_method(name: str, ctx: BenchContext, settings: BenchSettings, encode, progress) -> tuple[Method, MethodRun]:
    """Build and warm up one method; its results (and its profile's generations) come later."""
    task = progress.add_task(f"{name:6s} setting up", total=None)
    method = METHODS[name](ctx)
    method.run(encode("Hello"), 8)  # warm-up
    run = MethodRun([])
    if settings.predict and method.round is not None:
        if ctx.target_cost is None:
            ctx.target_cost = measure_target_cost(method.target_stage, ctx.calibration_prompts, ctx.max_len)
        if method.tuned is None:  # 'auto' predicts from the profile its tune measured
            run.profiler = RoundProfiler(method.name, method.round, ctx.target_cost)
    progress.remove_task(task)
    return method, run


def _sampling(name: str, method: Method, ctx: BenchContext, settings: BenchSettings, encode, progress, run) -> None:
    """The sampling check of a speculative native method: its tokens' distribution against the target's."""
    if settings.sampling_check and method.round is not None and name != "ar":
        task = progress.add_task(f"{name:6s} sampling", total=settings.sampling_check)
        run.sampling_check = _sampling_check(
            ctx, method, encode(SAMPLING_PROMPT), settings.sampling_check, lambda: progress.advance(task)
        )


def _build_report(settings, target_name, ctx, machine, rows, runs: dict[str, MethodRun], ppl) -> BenchReport:
    report = BenchReport(
        config={
            "target": target_name,
            "draft": ctx.draft_spec or "none",
            "k": ctx.k,
            "cascades": {n: (c.describe() if c is not None else "autoregressive") for n, c in ctx.cascades.items()},
            "max_new_tokens": settings.max_new_tokens,
            "chat_template": settings.chat,
            "prompts": len(rows),
            "repeats": settings.repeats,
            **_forward_costs(ctx.target_cost),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            **machine,
        }
    )
    ref = runs["ar"].results if "ar" in runs else None
    for name, run in runs.items():
        m = method_report(rows, run.results, ref)
        if run.prediction is not None:
            add_prediction(m, run.prediction)
        m.peak_rss_mb = run.peak_rss_mb
        m.perplexity = ppl[name]
        m.sampling_check = run.sampling_check
        report.methods[name] = m
    add_speedups(report)
    ar = report.methods.get("ar")
    if ar is not None and ar.decode_tokens_per_s and machine.get("bound_tokens_per_s"):
        report.config["ar_decode_tokens_per_s"] = ar.decode_tokens_per_s
        report.config["ar_share_of_bound"] = ar.decode_tokens_per_s / machine["bound_tokens_per_s"]
    for i, row in enumerate(rows):
        report.prompts.append(
            {
                "id": row["id"],
                "category": row["category"],
                "prompt_tokens": len(row["ids"]),
                "new_tokens": {n: len(r.results[i].token_ids) for n, r in runs.items()},
                "seconds": {n: r.results[i].seconds for n, r in runs.items()},
                "decode_seconds": {n: r.results[i].decode_seconds for n, r in runs.items()},
                "runs": {n: [{"decode_s": d, "s": w} for d, w in r.tries[i]] for n, r in runs.items()},
            }
        )
    return report


def _forward_costs(cost) -> dict:
    """The target's measured forward over n tokens (medians, the short context) and t(9) / t(1)."""
    if cost is None:
        return {}
    ms = {n: t * 1e3 for n, t in cost.points}
    out = {"target_forward_ms": ms, "target_forward_context": cost.context}
    if 1 in ms and 9 in ms and ms[1] > 0:
        out["forward_9_over_1"] = ms[9] / ms[1]
    return out


def _machine(target) -> dict:
    """The CPU, the kernel variant, the streaming read bandwidth, and the bound it puts on decoding."""
    k = kernels.get()
    out = {"cpu": kernels.cpu_name(), "kernel": k.variant if k else "torch", "threads": torch.get_num_threads()}
    out["bandwidth_gb_s"] = _bandwidth(megabytes=512, repeats=5)
    if isinstance(target, Transformer):
        out["weight_format"] = target.weight_format
        out["decode_mb"] = target.decode_bytes / 1e6
        out["bound_tokens_per_s"] = out["bandwidth_gb_s"] * 1e3 / out["decode_mb"]
    return out


def _bandwidth(megabytes: int = 256, repeats: int = 3) -> float:
    """The streaming read bandwidth now, GB/s: the best of ``repeats`` reads of a buffer many times
    the caches (the kernels' probe with their threads; PyTorch's own reduction without them)."""
    k = kernels.get()
    if k is not None:
        return k.stream_bandwidth(megabytes, repeats) / 1e9
    buf = pages.block(megabytes * 2**20).view(torch.float32).fill_(1.0)
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        buf.sum()
        best = min(best, time.perf_counter() - t0)
    return buf.numel() * 4 / best / 1e9


def _bandwidth_over_run(machine: dict, samples: list[float]) -> None:
    """The bound the run's figures stand beside: the median of the probe's readings (at the start
    and after each prompt), since on a shared machine the bandwidth there is to take moves during
    a run; the first reading and the range are kept beside it."""
    machine["bandwidth_first_gb_s"] = samples[0]
    machine["bandwidth_range_gb_s"] = [min(samples), max(samples)]
    machine["bandwidth_samples"] = len(samples)
    machine["bandwidth_gb_s"] = statistics.median(samples)
    if "decode_mb" in machine:
        machine["bound_tokens_per_s"] = machine["bandwidth_gb_s"] * 1e3 / machine["decode_mb"]


def _peak_memory(name: str, ctx: BenchContext, prompt_ids: list[int], max_new_tokens: int) -> float | None:
    """The process's peak resident memory while one method, alone (no other method's drafts or
    caches alive), is built and generates for the longest prompt; then it is let go."""
    _reset_peak_rss()
    method = METHODS[name](ctx)
    method.run(prompt_ids, max_new_tokens)
    peak = _peak_rss_mb()
    del method
    ctx.release()
    _let_go()
    return peak


def _let_go() -> None:
    """Collect what nothing refers to any more and hand the C heap's free pages back to the system
    (glibc keeps them otherwise, and they would count in the next method's resident memory)."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> None:
    """Reset the process's peak resident set (Linux: VmHWM), so each method's peak is its own."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def _peak_rss_mb() -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


@torch.inference_mode()
def _perplexities(target, rows, results, order, advance) -> dict[str, float | None]:
    """Perplexity of each method's generated tokens under the target (all methods' outputs pooled
    per method); identical outputs give identical figures, as lossless methods must."""
    memo: dict[tuple, tuple[float, int]] = {}
    totals = {name: [0.0, 0] for name in order}
    for i, row in enumerate(rows):
        for name in order:
            out = results[name][i].token_ids
            if not out:
                continue
            key = (i, tuple(out))
            if key not in memo:
                ids = row["ids"] + out
                logits = target(torch.tensor([ids[:-1]]), target.new_cache(len(ids)))[0]  # (T - 1, V)
                logp = torch.log_softmax(logits[len(row["ids"]) - 1 :].float(), -1)
                nll = -logp.gather(1, torch.tensor(out)[:, None]).sum()
                memo[key] = (float(nll), len(out))
            totals[name][0] += memo[key][0]
            totals[name][1] += memo[key][1]
        advance()
    return {n: (math.exp(t / c) if c else None) for n, (t, c) in totals.items()}


SAMPLING_PROMPT = "Name a colour."


def chi2_test(counts: torch.Tensor, probs: torch.Tensor) -> tuple[float, int, float]:
    """Pearson's chi-square goodness of fit of ``counts`` to ``probs``; cells expected below 5 are
    pooled. Returns (statistic, degrees of freedom, p-value)."""
    n = float(counts.sum())
    expected = probs.double() * n
    small = expected < 5
    obs = torch.cat([counts.double()[~small], counts.double()[small].sum()[None]])
    exp = torch.cat([expected[~small], expected[small].sum()[None]])
    keep = exp > 0
    obs, exp = obs[keep], exp[keep] * n / float(exp[keep].sum())
    stat = float(((obs - exp) ** 2 / exp).sum())
    df = max(int(keep.sum()) - 1, 1)
    p = float(
        torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64), torch.tensor(stat / 2, dtype=torch.float64))
    )
    return stat, df, p


@torch.inference_mode()
def _sampling_check(ctx, method, prompt_ids: list[int], n: int, advance) -> dict:
    """Is the method's first sampled token distributed as the target's (temperature 1)?

    ``n`` generations of 2 tokens: the first goes through one speculative round (draft,
    then the rejection test or the residual), so a broken verifier shows. Pearson's
    chi-square against the target's exact softmax, cells expected below 5 pooled."""
    target = ctx.target
    probs = torch.softmax(target(torch.tensor([prompt_ids]), target.new_cache(len(prompt_ids)))[0, -1].float(), -1)
    counts = torch.zeros_like(probs)
    for i in range(n):
        out, _ = generate_tokens(
            method.target_stage,
            prompt_ids,
            round=method.round,
            max_new_tokens=2,
            params=SamplingParams(temperature=1.0, seed=1000 + i),
            stop=StopChecker(()),
        )
        counts[out[0]] += 1
        advance()
    stat, df, p_value = chi2_test(counts, probs)
    top = torch.topk(probs, 3)
    return {
        "samples": n,
        "chi2": stat,
        "df": df,
        "p_value": p_value,
        "top_tokens": [
            {"id": int(t), "target_p": float(p), "observed": float(counts[t]) / n}
            for p, t in zip(top.values, top.indices)
        ],
    }


def _predict(ctx: BenchContext, profile, k: int | None, max_new_tokens: int) -> Prediction:
    """The cost model's prediction for a native method from its rounds' profile (calibration
    prompts, never the benchmarked ones), for the benchmark's context and length."""
    p = profile.predict(k, ctx.context, max_new_tokens)
    return Prediction(
        decode_tokens_per_s=p["tokens_per_s"],
        tokens_per_round=p["tokens_per_round"],
        round_ms=p["round_s"] * 1e3,
        draft_ms=p["draft_s"] * 1e3,
        verify_ms=p["verify_s"] * 1e3,
        overhead_ms=p["overhead_s"] * 1e3,
        calibration_tokens_per_s=profile.measured_tokens_per_s,
    )
