"""Runs benchmark methods over Spec-Bench style prompts and builds the report."""

from __future__ import annotations

import math
import platform
import time
from collections import defaultdict
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress
from rich.table import Table

from ..config import CascadeConfig
from ..cost.calibrate import measure_target_cost, profile_round
from ..decoding import StopChecker, generate_tokens
from ..engine import kernels
from ..engine.loader import load_model
from ..engine.transformer import Transformer
from ..errors import CascadeError
from ..prompts import encode as encode_prompt
from ..prompts import held_out, load_prompts, read_prompts
from ..sampling import SamplingParams
from .methods import METHODS, BenchContext

CALIBRATION_TOKENS = 48  # new tokens per calibration prompt
def run_bench(
    *,
    prompts: Path | None,
    per_category: int,
    max_new_tokens: int,
    methods: list[str],
    target: str | None,
    draft,
    precision: str = "stored",
    k: int,
    chat: bool = True,
    max_len: int = 4096,
    quiet: bool = False,
    cascade=None,
    predict: bool = True,
    sampling_check: int = 100,
) -> dict:
    if cascade is not None:
        cascade = CascadeConfig.from_file(cascade)
        if "custom" not in methods:
            methods = list(methods) + ["custom"]
    elif "custom" in methods:
        raise CascadeError("method 'custom' needs --cascade FILE")
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise CascadeError(f"unknown method(s) {unknown or methods}; choose from {', '.join(METHODS)}")
    for m in methods:
        METHODS[m].check()
    if max_new_tokens < 1:
        raise CascadeError("--max-new-tokens must be >= 1")
    if sampling_check < 0:
        raise CascadeError("--sampling-check must be >= 0")
    if k < 1:
        raise CascadeError("--k must be >= 1")
    rows = load_prompts(prompts, per_category)
    console = Console(stderr=True, quiet=quiet)
    loaded = load_model(target, precision=precision)
    tok = loaded.tokenizer
    machine = _machine(loaded.model)
    console.print(
        f"cpu: {machine['cpu']}; kernels: {machine['kernel']}; {machine['threads']} threads; "
        f"streaming read {machine['bandwidth_gb_s']:.1f} GB/s"
        + (
            f"; target {machine['weight_format']} reads {machine['decode_mb']:.0f} MB a token: "
            f"bound {machine['bound_tokens_per_s']:.0f} tok/s"
            if machine.get("decode_mb")
            else ""
        )
    )
    max_len = min(max_len, getattr(loaded.model, "max_position_embeddings", max_len))
    ctx = BenchContext(loaded, draft, k, max_len)
    ctx.custom = cascade

    use_chat = chat and bool(getattr(tok, "chat_template", None))

    def encode(text: str) -> list[int]:
        return encode_prompt(tok, text, use_chat)

    limit = max_len - max_new_tokens - k - 1
    for r in rows:
        r["ids"] = encode(r["prompt"])
    skipped = [r["id"] for r in rows if len(r["ids"]) > limit]
    rows = [r for r in rows if len(r["ids"]) <= limit]
    if skipped:
        console.print(f"skipping {len(skipped)} prompt(s) longer than {limit} tokens: {skipped}")
    if predict or "auto" in methods:
        held = [ids for ids in map(encode, held_out(prompts, rows)) if len(ids) <= limit]
        ctx.calibration_prompts = held or [encode(t) for t in read_prompts(None)[:4]]
        # the workload the predictions are for: the benchmark's mean context while decoding
        ctx.context = sum(len(r["ids"]) + max_new_tokens / 2 for r in rows) / len(rows)
    # 'ar' first: the others are compared with it.
    order = sorted(dict.fromkeys(methods), key=lambda m: m != "ar")
    results: dict[str, list] = {}
    checks: dict[str, dict] = {}
    peak_mb: dict[str, float | None] = {}
    with Progress(console=console, transient=False) as progress:
        for name in order:
            _reset_peak_rss()
            method = METHODS[name](ctx)
            method.run(encode("Hello"), 8)  # warm-up
            if predict and method.round is not None:
                task = progress.add_task(f"{name:6s} calibrating", total=None)
                ctx.predicted[name] = _predict(ctx, method, max_new_tokens)
                progress.remove_task(task)
            task = progress.add_task(f"{name:6s}", total=len(rows))
            results[name] = []
            for r in rows:
                res = method.run(r["ids"], max_new_tokens)
                results[name].append(res)
                progress.advance(task)
            if sampling_check and method.round is not None and name != "ar":
                task = progress.add_task(f"{name:6s} sampling", total=sampling_check)
                checks[name] = _sampling_check(
                    ctx, method, encode(SAMPLING_PROMPT), sampling_check, lambda: progress.advance(task)
                )
            peak_mb[name] = _peak_rss_mb()
            del method
        task = progress.add_task("perplexity", total=len(rows))
        ppl = _perplexities(ctx.target, rows, results, order, lambda: progress.advance(task))
    report = _report(rows, results, order, loaded, ctx, max_new_tokens, chat)
    report["config"].update(machine)
    for name in order:
        report["methods"][name]["peak_rss_mb"] = peak_mb.get(name)
        report["methods"][name]["perplexity"] = ppl[name]
        if name in checks:
            report["methods"][name]["sampling_check"] = checks[name]
    _print_table(console, report, Table)
    _print_stages(console, report, Table)
    return report


def _machine(target) -> dict:
    """The CPU, the kernel variant, the streaming read bandwidth, and the bound it puts on decoding."""
    k = kernels.get()
    out = {"cpu": kernels.cpu_name(), "kernel": k.variant if k else "torch", "threads": torch.get_num_threads()}
    if k is not None:
        out["bandwidth_gb_s"] = k.stream_bandwidth() / 1e9
    else:  # PyTorch's own reduction as the probe
        buf = torch.ones(128 * 2**20)
        t0 = time.perf_counter()
        for _ in range(3):
            buf.sum()
        out["bandwidth_gb_s"] = 3 * buf.numel() * 4 / (time.perf_counter() - t0) / 1e9
    if isinstance(target, Transformer):
        out["weight_format"] = target.weight_format
        out["decode_mb"] = target.decode_bytes / 1e6
        out["bound_tokens_per_s"] = out["bandwidth_gb_s"] * 1e3 / out["decode_mb"]
    return out


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


def _predict(ctx, method, max_new_tokens: int) -> dict:
    """The cost model's prediction for a native method: its rounds profiled on the calibration
    prompts (never the benchmarked ones), predicted for the benchmark's context and length."""
    if ctx.target_cost is None:
        ctx.target_cost = measure_target_cost(method.target_stage, ctx.calibration_prompts, ctx.max_len)
    tuned = method.tuned
    if tuned is not None:  # 'auto': the profile tune chose, at the k it chose
        profile, k = tuned.profile, (tuned.config.k[-1] if tuned.config is not None else 0)
    else:
        profile = profile_round(
            method.name,
            method.round,
            method.target_stage,
            ctx.calibration_prompts,
            ctx.target_cost,
            max_new_tokens=CALIBRATION_TOKENS,
            eos=ctx.eos_ids(),
        )
        k = None
    p = profile.predict(k, ctx.context, max_new_tokens)
    return {
        "decode_tokens_per_s": p["tokens_per_s"],
        "tokens_per_round": p["tokens_per_round"],
        "round_ms": p["round_s"] * 1e3,
        "draft_ms": p["draft_s"] * 1e3,
        "verify_ms": p["verify_s"] * 1e3,
        "overhead_ms": p["overhead_s"] * 1e3,
        "calibration_tokens_per_s": profile.measured_tokens_per_s,
    }


def _report(rows, results, order, loaded, ctx, max_new_tokens, chat) -> dict:
    ref = results.get("ar")
    out = {
        "config": {
            "target": loaded.name,
            "draft": ctx.draft_spec or "none",
            "k": ctx.k,
            "cascades": {n: (c.describe() if c is not None else "autoregressive") for n, c in ctx.cascades.items()},
            "max_new_tokens": max_new_tokens,
            "chat_template": chat,
            "prompts": len(rows),
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "machine": platform.machine(),
            "processor": platform.processor() or platform.machine(),
            "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        },
        "methods": {},
        "prompts": [],
    }
    for name in order:
        res = results[name]
        tokens = sum(len(r.token_ids) for r in res)
        seconds = sum(r.seconds for r in res)
        decode = [r.decode_seconds for r in res]
        by_cat: dict[str, list] = defaultdict(lambda: [0, 0.0])
        for row, r in zip(rows, res):
            by_cat[row["category"]][0] += len(r.token_ids)
            by_cat[row["category"]][1] += r.seconds
        m = {
            "tokens": tokens,
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds else 0.0,
            "decode_tokens_per_s": tokens / sum(decode) if all(d for d in decode) else None,
            "by_category": {c: (t / s if s else 0.0) for c, (t, s) in by_cat.items()},
        }
        stats = [r.stats for r in res if r.stats]
        if stats and any(s.get("drafted") for s in stats):
            drafted = sum(s["drafted"] for s in stats)
            m["acceptance_rate"] = sum(s["accepted"] for s in stats) / drafted if drafted else 0.0
            rounds = sum(s["rounds"] for s in stats)
            m["mean_accepted_length"] = sum(s["new_tokens"] for s in stats) / rounds if rounds else 0.0
            width = max(len(s["accepted_by_position"]) for s in stats)
            acc = [
                sum(s["accepted_by_position"][i] for s in stats if i < len(s["accepted_by_position"]))
                for i in range(width)
            ]
            dr = [
                sum(s["drafted_by_position"][i] for s in stats if i < len(s["drafted_by_position"]))
                for i in range(width)
            ]
            while dr and not dr[-1]:  # positions the token budget allowed but nothing drafted
                dr.pop()
            m["acceptance_by_position"] = [a / d if d else 0.0 for a, d in zip(acc, dr)]
            m["time_draft_s"] = sum(s["draft_s"] for s in stats)
            m["time_verify_s"] = sum(s["verify_s"] for s in stats)
            m["stages"] = _stage_totals(stats)
        if name in ctx.predicted:
            m["predicted"] = ctx.predicted[name]
            m["predicted_decode_tokens_per_s"] = ctx.predicted[name]["decode_tokens_per_s"]
            if m.get("decode_tokens_per_s"):
                m["prediction_error"] = m["predicted_decode_tokens_per_s"] / m["decode_tokens_per_s"] - 1
        if ref is not None:
            same = [r.token_ids == a.token_ids for r, a in zip(res, ref)]
            m["identical_to_ar"] = all(same)
            m["prompts_differing_from_ar"] = [row["id"] for row, s in zip(rows, same) if not s]
        out["methods"][name] = m
    base = out["methods"].get("ar", {}).get("tokens_per_s")
    hf = out["methods"].get("hf", {}).get("tokens_per_s")
    for m in out["methods"].values():
        if base:
            m["speedup_vs_ar"] = m["tokens_per_s"] / base
        if hf:
            m["speedup_vs_hf"] = m["tokens_per_s"] / hf
    for i, row in enumerate(rows):
        out["prompts"].append(
            {
                "id": row["id"],
                "category": row["category"],
                "prompt_tokens": len(row["ids"]),
                "new_tokens": {n: len(results[n][i].token_ids) for n in order},
                "seconds": {n: results[n][i].seconds for n in order},
            }
        )
    return out


def _stage_totals(stats: list[dict]) -> list[dict]:
    """Per-stage counters summed over prompts, smallest stage first, with conditional acceptance."""
    totals: dict[str, dict] = {}
    for s in stats:
        for st in s.get("stages", []):
            t = totals.setdefault(st["name"], {k: 0 for k in ("forwards", "tokens_in", "proposed", "accepted")})
            t.setdefault("seconds", 0.0)
            for key in ("forwards", "tokens_in", "proposed", "accepted", "seconds"):
                t[key] += st[key]
    decode = sum(s["total_s"] - s["prefill_s"] for s in stats)
    out = []
    for name, t in totals.items():
        t = {"name": name, **t}
        t["acceptance_rate"] = t["accepted"] / t["proposed"] if t["proposed"] else None
        t["time_share"] = t["seconds"] / decode if decode else None
        out.append(t)
    return out


def _print_stages(console, report, Table) -> None:
    for name, m in report["methods"].items():
        stages = m.get("stages") or []
        if len(stages) < 3:
            continue
        t = Table(title=f"{name}: per stage (g_{{i+1|i}}: stage i's proposals accepted by stage i+1)", box=None)
        for col in ("stage", "forwards", "in", "proposed", "g", "accepted", "s", "share"):
            t.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
        for i, st in enumerate(stages):
            up = i < len(stages) - 1
            t.add_row(
                st["name"],
                str(st["forwards"]),
                str(st["tokens_in"]),
                str(st["proposed"]) if up else "-",
                f"{st['acceptance_rate']:.1%}" if up and st["acceptance_rate"] is not None else "-",
                str(st["accepted"]) if up else "-",
                f"{st['seconds']:.2f}",
                f"{st['time_share']:.0%}" if st["time_share"] is not None else "-",
            )
        console.print(t)


def _print_table(console, report, Table) -> None:
    """One line per method, short columns (80 wide); perplexity and peak memory are in the JSON and report."""
    cfg = report["config"]
    t = Table(title=f"{cfg['prompts']} prompts, {cfg['max_new_tokens']} new tokens", box=None, pad_edge=False)
    cols = ("method", "tok/s", "dec/s", "pred", "vs ar", "accept", "tok/rd", "=ar", "samp p")
    for col in cols:
        t.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for name, m in report["methods"].items():
        t.add_row(
            name,
            f"{m['tokens_per_s']:.1f}",
            f"{m['decode_tokens_per_s']:.1f}" if m.get("decode_tokens_per_s") else "-",
            f"{m['predicted_decode_tokens_per_s']:.0f}({m['prediction_error']:+.0%})" if "prediction_error" in m else "-",
            f"{m['speedup_vs_ar']:.2f}x" if "speedup_vs_ar" in m else "-",
            f"{m['acceptance_rate']:.1%}" if "acceptance_rate" in m else "-",
            f"{m['mean_accepted_length']:.2f}" if "mean_accepted_length" in m else "-",
            {True: "yes", False: "NO"}.get(m.get("identical_to_ar"), "-"),
            f"{m['sampling_check']['p_value']:.2g}" if "sampling_check" in m else "-",
        )
    console.print(t)
    if "bound_tokens_per_s" in cfg:
        console.print(
            f"{cfg['cpu']}, kernels {cfg['kernel']}: {cfg['bandwidth_gb_s']:.1f} GB/s streaming read; the target "
            f"reads {cfg['decode_mb']:.0f} MB a token, so decoding is bound by {cfg['bound_tokens_per_s']:.0f} tok/s"
        )
