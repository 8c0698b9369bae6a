"""The benchmark report: typed, built once from the runs, rendered three ways.

* :class:`BenchReport` (per method a :class:`MethodReport`) - built by :func:`build` from the runs
  of ``runner.run_bench``;
* renderers: :func:`print_terminal` (the short table and the per-stage tables, 80 columns),
  :func:`markdown` (the seed paper's tables: Table 1 - throughput, latency per token, speedup,
  acceptance, memory, quality -, the cost model's predictions, Table 3 - the ablation -, the
  throughput breakdown by stage, tokens/s by Spec-Bench category), and JSON
  (:meth:`BenchReport.to_dict`); :func:`plots` draws the PNGs;
* :func:`stage_table` - the per-stage table, shared with ``cascade generate --stats``.
"""

from __future__ import annotations

import json
import statistics
from collections import defaultdict
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from rich.console import Console
from rich.table import Table

from ..errors import CascadeError

# The seed paper's Table 3 (ablation): (variant, method). The full cascade tiny -> INT8 -> target,
# and what is left without each part; 'No tiny model' and 'Draft only' are both `spec`.
ABLATION = (
    ("Full cascade (tiny -> INT8 -> target)", "full"),
    ("No tiny model (INT8 -> target)", "spec"),
    ("No INT8 quant (tiny -> fp32 draft -> target)", "no-int8"),
    ("Single stage (target alone)", "ar"),
    ("Tiny only (tiny -> target)", "tiny-only"),
    ("Draft only (INT8 -> target)", "spec"),
    ("Vertical cascade (MaG -> INT8 -> target)", "chain"),
)


@dataclass
class StageTotals:
    """One stage's counters summed over the prompts (``StageStats``), with conditional acceptance."""

    name: str
    forwards: int = 0
    tokens_in: int = 0
    proposed: int = 0
    accepted: int = 0
    seconds: float = 0.0
    acceptance_rate: float | None = None  # g_{i+1|i}: this stage's proposals accepted by the next
    time_share: float | None = None  # of the decoding time


@dataclass
class Prediction:
    """The cost model's prediction for a native method (``runner._predict``)."""

    decode_tokens_per_s: float
    tokens_per_round: float
    round_ms: float
    draft_ms: float
    verify_ms: float
    overhead_ms: float
    calibration_tokens_per_s: float


@dataclass
class MethodReport:
    """One method's figures; None where the method has no such figure (left out of the JSON)."""

    tokens: int
    seconds: float
    tokens_per_s: float
    decode_tokens_per_s: float | None
    by_category: dict[str, float]  # tok/s by Spec-Bench category (basis: by_category_basis)
    by_category_basis: str = "wall"  # "decode": prefill excluded; "wall": the whole call
    acceptance_rate: float | None = None
    mean_accepted_length: float | None = None
    acceptance_by_position: list[float] | None = None
    time_draft_s: float | None = None
    time_verify_s: float | None = None
    rounds_by_draft_length: list[int] | None = None  # [k]: rounds that verified k drafted tokens
    rounds_without_drafting: float | None = None  # share of the rounds (an adaptive method's plain steps)
    stages: list[StageTotals] | None = None
    rounds: int | None = None  # verification rounds, summed over the prompts
    decode_seconds: float | None = None  # decoding time (prefill excluded), summed over the prompts
    predicted: Prediction | None = None
    predicted_decode_tokens_per_s: float | None = None
    prediction_error: float | None = None
    prediction_terms: dict | None = None  # the measured counterpart of each predicted term, and the largest miss
    identical_to_ar: bool | None = None
    prompts_differing_from_ar: list | None = None
    agreement_with_ar: float | None = None  # share of ar's tokens matched before the first difference
    speedup_vs_ar: float | None = None
    speedup_vs_hf: float | None = None
    peak_rss_mb: float | None = None
    perplexity: float | None = None
    sampling_check: dict | None = None

    ALWAYS = ("tokens", "seconds", "tokens_per_s", "decode_tokens_per_s", "by_category", "peak_rss_mb", "perplexity")

    def to_dict(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.name not in self.ALWAYS:
                continue
            if f.name == "stages":
                v = [asdict(s) for s in v]
            elif f.name == "predicted":
                v = asdict(v)
            out[f.name] = v
        return out


@dataclass
class BenchReport:
    config: dict  # the run's settings and the machine (cpu, kernel, bandwidth, bound)
    methods: dict[str, MethodReport] = field(default_factory=dict)
    prompts: list[dict] = field(default_factory=list)  # per prompt: id, category, tokens and seconds per method

    def to_dict(self) -> dict:
        return {
            "config": self.config,
            "methods": {n: m.to_dict() for n, m in self.methods.items()},
            "prompts": self.prompts,
        }


# -- building ------------------------------------------------------------------------------------


def method_report(rows: list[dict], results: list, ref: list | None) -> MethodReport:
    """One method's report from its runs (``methods.Result`` per prompt) and the reference ``ar`` runs."""
    tokens = sum(len(r.token_ids) for r in results)
    seconds = sum(r.seconds for r in results)
    decode = [r.decode_seconds for r in results]
    by_decode = all(d for d in decode)  # decode tok/s by category where the method tells prefill apart
    by_cat: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for row, r in zip(rows, results):
        by_cat[row["category"]][0] += len(r.token_ids)
        by_cat[row["category"]][1] += r.decode_seconds if by_decode else r.seconds
    m = MethodReport(
        tokens=tokens,
        seconds=seconds,
        tokens_per_s=tokens / seconds if seconds else 0.0,
        decode_tokens_per_s=tokens / sum(decode) if by_decode else None,
        by_category={c: (t / s if s else 0.0) for c, (t, s) in by_cat.items()},
        by_category_basis="decode" if by_decode else "wall",
    )
    stats = [r.stats for r in results if r.stats]
    if stats and any(s.get("drafted") for s in stats):
        _add_acceptance(m, stats)
    if ref is not None:
        same = [r.token_ids == a.token_ids for r, a in zip(results, ref)]
        m.identical_to_ar = all(same)
        m.prompts_differing_from_ar = [row["id"] for row, s in zip(rows, same) if not s]
        m.agreement_with_ar = _agreement([r.token_ids for r in results], [a.token_ids for a in ref])
    return m


def _add_acceptance(m: MethodReport, stats: list[dict]) -> None:
    drafted = sum(s["drafted"] for s in stats)
    m.acceptance_rate = sum(s["accepted"] for s in stats) / drafted if drafted else 0.0
    rounds = sum(s["rounds"] for s in stats)
    m.mean_accepted_length = sum(s["new_tokens"] for s in stats) / rounds if rounds else 0.0
    width = max(len(s["accepted_by_position"]) for s in stats)

    def summed(key: str) -> list[int]:
        return [sum(s[key][i] for s in stats if i < len(s[key])) for i in range(width)]

    acc, dr = summed("accepted_by_position"), summed("drafted_by_position")
    while dr and not dr[-1]:  # positions the token budget allowed but nothing drafted
        dr.pop()
    m.acceptance_by_position = [a / d if d else 0.0 for a, d in zip(acc, dr)]
    lengths = [s.get("rounds_by_draft_length", []) for s in stats]
    m.rounds_by_draft_length = [sum(c[i] for c in lengths if i < len(c)) for i in range(max(map(len, lengths)))]
    m.rounds_without_drafting = m.rounds_by_draft_length[0] / rounds if rounds and m.rounds_by_draft_length else None
    m.time_draft_s = sum(s["draft_s"] for s in stats)
    m.time_verify_s = sum(s["verify_s"] for s in stats)
    m.rounds = rounds
    m.decode_seconds = sum(s["total_s"] - s["prefill_s"] for s in stats)
    m.stages = stage_totals(stats)


def stage_totals(stats: list[dict]) -> list[StageTotals]:
    """Per-stage counters summed over generations (``GenerationStats.to_dict()``), smallest stage first."""
    totals: dict[str, StageTotals] = {}
    for s in stats:
        for st in s.get("stages", []):
            t = totals.setdefault(st["name"], StageTotals(st["name"]))
            t.forwards += st["forwards"]
            t.tokens_in += st["tokens_in"]
            t.proposed += st["proposed"]
            t.accepted += st["accepted"]
            t.seconds += st["seconds"]
    decode = sum(s["total_s"] - s["prefill_s"] for s in stats)
    for t in totals.values():
        t.acceptance_rate = t.accepted / t.proposed if t.proposed else None
        t.time_share = t.seconds / decode if decode else None
    return list(totals.values())


def add_speedups(report: BenchReport) -> None:
    base = report.methods["ar"].tokens_per_s if "ar" in report.methods else None
    hf = report.methods["hf"].tokens_per_s if "hf" in report.methods else None
    for m in report.methods.values():
        if base:
            m.speedup_vs_ar = m.tokens_per_s / base
        if hf:
            m.speedup_vs_hf = m.tokens_per_s / hf


def add_prediction(m: MethodReport, p: Prediction) -> None:
    m.predicted = p
    m.predicted_decode_tokens_per_s = p.decode_tokens_per_s
    if m.decode_tokens_per_s:
        m.prediction_error = p.decode_tokens_per_s / m.decode_tokens_per_s - 1
    m.prediction_terms = prediction_terms(m, p)


def prediction_terms(m: MethodReport, p: Prediction) -> dict | None:
    """Each term of the prediction (tokens a round, draft, verify and overhead ms a round) beside
    what the run measured, and each term's share of the error in decode tok/s: the predicted rate is
    tokens/round over round time, so a term's miss is its relative error (tokens a round) or its
    excess over the measured round time (the three times). ``largest`` names the worst."""
    if not m.rounds or not m.decode_seconds or m.time_draft_s is None or m.time_verify_s is None:
        return None
    per = 1e3 / m.rounds
    measured = {
        "tokens_per_round": m.mean_accepted_length or 0.0,
        "draft_ms": m.time_draft_s * per,
        "verify_ms": m.time_verify_s * per,
        "overhead_ms": (m.decode_seconds - m.time_draft_s - m.time_verify_s) * per,
    }
    if not measured["tokens_per_round"]:
        return None
    round_ms = m.decode_seconds * per
    miss = {
        "acceptance": p.tokens_per_round / measured["tokens_per_round"] - 1,
        "draft": (measured["draft_ms"] - p.draft_ms) / round_ms,
        "verify": (measured["verify_ms"] - p.verify_ms) / round_ms,
        "overhead": (measured["overhead_ms"] - p.overhead_ms) / round_ms,
    }
    return {"measured": measured, "miss": miss, "largest": max(miss, key=lambda k: abs(miss[k]))}


# -- shared formatting ---------------------------------------------------------------------------


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def _yes(v: bool | None, agreement: float | None = None) -> str:
    if v is False and agreement is not None:
        return f"NO ({agreement:.0%})"
    return {True: "yes", False: "NO"}.get(v, "-")


def _agreement(outs: list[list[int]], refs: list[list[int]]) -> float:
    """The share of the reference's tokens that an output matches before its first difference."""
    same = total = 0
    for o, r in zip(outs, refs):
        n = 0
        while n < min(len(o), len(r)) and o[n] == r[n]:
            n += 1
        same += n
        total += len(r)
    return same / total if total else 1.0


STAGE_COLUMNS = ("stage", "forwards", "tokens in", "proposed", "accepted", "gamma", "rate", "time s", "share")


def stage_table(stages: list[StageTotals], decode_s: float | None = None) -> list[tuple[str, ...]]:
    """Rows of the per-stage table (:data:`STAGE_COLUMNS`), smallest stage first, the target last.

    ``rate`` is the seed paper's conditional acceptance ``gamma`` g_{i+1|i}: stage i's proposals
    accepted by stage i + 1. With ``decode_s`` (the decoding time), an ``(other)`` row holds the time outside
    the stages (the loop, verification bookkeeping)."""
    rows = []
    for i, st in enumerate(stages):
        up = i < len(stages) - 1
        rows.append(
            (
                st.name,
                str(st.forwards),
                str(st.tokens_in),
                str(st.proposed) if up else "-",
                str(st.accepted) if up else "-",
                f"g_{{{i + 1}|{i}}}" if up else "-",
                _fmt(st.acceptance_rate if up else None, ".1%"),
                f"{st.seconds:.2f}",
                _fmt(st.time_share, ".0%"),
            )
        )
    if decode_s:
        other = decode_s - sum(st.seconds for st in stages)
        rows.append(("(other)", "", "", "", "", "", "", f"{other:.2f}", f"{other / decode_s:.0%}"))
    return rows


def rich_stage_table(title: str, rows: list[tuple[str, ...]]) -> Table:
    t = Table(title=title, box=None, pad_edge=False)
    for col in STAGE_COLUMNS:
        t.add_column(col, justify="left" if col == "stage" else "right", no_wrap=True)
    for row in rows:
        t.add_row(*row)
    return t


# -- terminal ------------------------------------------------------------------------------------

TERMINAL_COLUMNS = ("method", "tok/s", "dec/s", "pred", "vs ar", "accept", "tok/rd", "=ar", "samp p")


def print_terminal(report: BenchReport, console: Console) -> None:
    """One line per method in 80 columns (perplexity and peak memory are in the JSON and Markdown),
    the bandwidth bound, then a per-stage table for each cascade of three or more stages."""
    cfg = report.config
    t = Table(title=f"{cfg['prompts']} prompts, {cfg['max_new_tokens']} new tokens", box=None, pad_edge=False)
    for col in TERMINAL_COLUMNS:
        t.add_column(col, justify="left" if col == "method" else "right", no_wrap=True)
    for name, m in report.methods.items():
        pred = (
            f"{m.predicted_decode_tokens_per_s:.0f}({m.prediction_error:+.0%})"
            if m.predicted_decode_tokens_per_s is not None and m.prediction_error is not None
            else "-"
        )
        t.add_row(
            name,
            f"{m.tokens_per_s:.1f}",
            _fmt(m.decode_tokens_per_s, ".1f"),
            pred,
            f"{m.speedup_vs_ar:.2f}x" if m.speedup_vs_ar is not None else "-",
            _fmt(m.acceptance_rate, ".1%"),
            _fmt(m.mean_accepted_length, ".2f"),
            _yes(m.identical_to_ar, m.agreement_with_ar),
            _fmt((m.sampling_check or {}).get("p_value"), ".2g"),
        )
    console.print(t)
    for line in machine_lines(cfg):
        console.print(line.rstrip())
    misses = [
        f"{n} {m.prediction_terms['largest']} {m.prediction_terms['miss'][m.prediction_terms['largest']]:+.0%}"
        for n, m in report.methods.items()
        if m.prediction_error is not None and abs(m.prediction_error) > 0.1 and m.prediction_terms
    ]
    if misses:
        console.print("predictions off by more than 10%, largest term: " + ", ".join(misses))
    above = categories_vs_ar(report)
    if above:
        console.print("categories at or above ar (tok/s by category): " + ", ".join(
            f"{n} {a}/{t}" for n, (a, t) in above.items()))
    for name, m in report.methods.items():
        if m.stages and len(m.stages) >= 3:
            title = f"{name}: per stage (gamma g_{{i+1|i}}: stage i's proposals accepted by stage i+1)"
            console.print(rich_stage_table(title, stage_table(m.stages)))


def machine_lines(cfg: dict) -> list[str]:
    """The machine, the bandwidth bound on decoding and the target's 9-token forward against its one-token one."""
    out = []
    if "bound_tokens_per_s" in cfg:
        read = f"{cfg['bandwidth_gb_s']:.1f} GB/s streaming read"
        if cfg.get("bandwidth_samples", 1) > 1:
            lo, hi = cfg["bandwidth_range_gb_s"]
            read += f" (median of {cfg['bandwidth_samples']} readings through the run, {lo:.1f}-{hi:.1f})"
        line = (
            f"{cfg['cpu']}, kernels {cfg['kernel']}: {read}; the target reads {cfg['decode_mb']:.0f} MB a token, "
            f"so decoding is bound by {cfg['bound_tokens_per_s']:.0f} tok/s"
        )
        ar = (cfg.get("ar_decode_tokens_per_s") or 0) / cfg["bound_tokens_per_s"]
        out.append(line + (f"; `ar` decodes at {ar:.0%} of it.  " if ar else ".  "))
    if "forward_9_over_1" in cfg:
        ms = {int(n): t for n, t in cfg["target_forward_ms"].items()}  # JSON keys are strings
        out.append(
            f"The target's forward after {cfg['target_forward_context']} tokens (medians): 1 token {ms[1]:.1f} ms, "
            f"9 tokens {ms[9]:.1f} ms ({cfg['forward_9_over_1']:.2f}x).  "
        )
    return out + [""] if out else out


def categories_vs_ar(report: BenchReport) -> dict[str, tuple[int, int]]:
    """Per method other than ar: in how many categories its tok/s is at least ar's (same basis)."""
    ar = report.methods.get("ar")
    if ar is None or len(ar.by_category) < 2:
        return {}
    out = {}
    for name, m in report.methods.items():
        if name != "ar" and m.by_category_basis == ar.by_category_basis:
            out[name] = (sum(m.by_category.get(c, 0.0) >= v for c, v in ar.by_category.items()), len(ar.by_category))
    return out


def paired_vs_ar(report: BenchReport) -> dict[str, dict[str, tuple[float, float, float]]]:
    """Per method other than ar, per category: its decode tok/s over ar's, turn by turn (the
    runs of one turn follow each other, so a slow spell of a shared machine falls on both): the
    median over turns, and the lowest and highest turn (a category's prompts summed in each turn;
    a prompt's tokens are the same in every turn of a method). Empty without ar, decode times
    or turns."""
    ar_runs = [p.get("runs", {}).get("ar") for p in report.prompts]
    if not report.prompts or any(not r for r in ar_runs):
        return {}
    out: dict[str, dict[str, tuple[float, float, float]]] = {}
    for name in report.methods:
        if name == "ar":
            continue
        # category -> per turn [ar's tokens, ar's s, the method's tokens, its s]
        sums: dict[str, list[list[float]]] = defaultdict(list)
        usable = True
        for p, ar in zip(report.prompts, ar_runs):
            mine = p["runs"].get(name)
            tokens = p.get("new_tokens", {})
            if not mine or len(mine) != len(ar) or any(t.get("decode_s") is None for t in (*mine, *ar)) \
                    or name not in tokens or "ar" not in tokens:
                usable = False
                break
            turns = sums[p["category"]]
            if not turns:
                turns.extend([0.0, 0.0, 0.0, 0.0] for _ in ar)
            for turn, a, b in zip(turns, ar, mine):
                turn[0] += tokens["ar"]
                turn[1] += a["decode_s"]
                turn[2] += tokens[name]
                turn[3] += b["decode_s"]
        if usable:
            out[name] = {}
            for c, turns in sums.items():
                r = [(n / s) / (na / sa) for na, sa, n, s in turns if s > 0 and sa > 0 and na > 0]
                if r:
                    out[name][c] = (statistics.median(r), min(r), max(r))
    return out


# -- Markdown ------------------------------------------------------------------------------------


def _md_table(header: tuple[str, ...], align: tuple[str, ...], rows) -> list[str]:
    return ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"] + [
        "| " + " | ".join(r) + " |" for r in rows
    ]


def markdown(report: BenchReport) -> str:
    cfg, methods = report.config, report.methods
    out = [
        "# Benchmark report",
        "",
        f"{cfg['prompts']} prompts, {cfg['max_new_tokens']} new tokens, greedy, target `{cfg['target']}`, "
        f"{cfg['threads']} threads, torch {cfg['torch']}, {cfg['date']}.",
        "",
        *machine_lines(cfg),
        "## Table 1: throughput, latency, speedup, acceptance, memory, quality",
        "",
    ]
    rows = []
    for name, m in methods.items():
        dec = m.decode_tokens_per_s
        rows.append(
            (
                name,
                f"{m.tokens_per_s:.1f}",
                _fmt(dec, ".1f"),
                _fmt(m.predicted_decode_tokens_per_s, ".1f"),
                _fmt(1000 / dec if dec else None, ".1f"),
                f"{_fmt(m.speedup_vs_ar, '.2f')}x",
                _fmt(m.acceptance_rate, ".1%"),
                _fmt(m.mean_accepted_length, ".2f"),
                _fmt(m.peak_rss_mb, ".0f"),
                _fmt(m.perplexity, ".4f"),
                _yes(m.identical_to_ar, m.agreement_with_ar),
                _fmt((m.sampling_check or {}).get("p_value"), ".2g"),
            )
        )
    out += _md_table(
        ("method", "tok/s", "decode tok/s", "predicted", "latency ms/token", "vs ar", "accepted", "tokens/round",
         "peak RSS MB", "PPL", "= ar", "sampling p"),
        ("---",) + ("---:",) * 9 + (":---:", "---:"),
        rows,
    )
    out += [
        "",
        "Latency per token = 1 / decode tok/s. `= ar`: greedy output identical to `ar` on every prompt. "
        "Peak RSS: the process's peak resident memory with the method alone (no other method's drafts "
        "or caches), built and generating for the longest prompt. "
        "PPL: perplexity of the generated tokens under the target. `sampling p`: chi-square p-value of the "
        "first sampled token (temperature 1) against the target's exact distribution (`--sampling-check` "
        "samples); a lossless method gives p spread over (0, 1), a broken sampler p near 0.",
    ]
    cascades = cfg.get("cascades") or {}
    if cascades:
        out += ["", "Configurations: " + "; ".join(f"`{n}`: {d}" for n, d in cascades.items()) + "."]
    out += _prediction_table(methods) + _ablation_table(methods)
    for name, m in methods.items():
        if m.stages and len(m.stages) >= 2:
            out += ["", f"## Throughput breakdown: {name}", ""]
            out += _md_table(STAGE_COLUMNS, ("---",) + ("---:",) * 8, stage_table(m.stages))
    cats = sorted({c for m in methods.values() for c in m.by_category})
    decode = all(m.by_category_basis == "decode" for m in methods.values())
    out += ["", "## Decode tokens/s by category" if decode else "## Tokens/s by category", ""]
    above = categories_vs_ar(report)
    out += _md_table(
        ("method", *cats, "at or above ar"),
        ("---",) + ("---:",) * (len(cats) + 1),
        [
            (
                name if decode or m.by_category_basis == "decode" else f"{name} (prefill included)",
                *(_fmt(m.by_category.get(c), ".1f") for c in cats),
                f"{above[name][0]}/{above[name][1]}" if name in above else "-",
            )
            for name, m in methods.items()
        ],
    )
    out += ["", "Prefill excluded" + (" (where a method times it apart)" if not decode else "")
            + f"; each prompt's median of {cfg.get('repeats', 1)} run(s) per method."]
    paired = paired_vs_ar(report)
    if paired and cfg.get("repeats", 1) > 1:
        out += ["", "## Against ar turn by turn, by category", ""]
        out += _md_table(
            ("method", *cats),
            ("---",) + ("---:",) * len(cats),
            [
                (name, *(f"{v[0]:.2f}x ({v[1]:.2f}-{v[2]:.2f})" if (v := by.get(c)) else "-" for c in cats))
                for name, by in paired.items()
            ],
        )
        out += ["", "Each turn runs every method once on a prompt, one after another; per turn, the method's decode "
                "tok/s over ar's (a category's prompts summed): the median over turns, and the lowest and "
                "highest turn. A category whose range straddles 1.00x differs from ar by less than this "
                "machine's variation from turn to turn."]
    out += [
        "",
        "Plots: `speedup.png` (speedup over ar by method and category), `acceptance.png` "
        "(acceptance by draft position), `predicted.png` (predicted vs measured decode tok/s).",
    ]
    return "\n".join(out) + "\n"


def _prediction_table(methods: dict[str, MethodReport]) -> list[str]:
    rows = [(n, m, m.predicted) for n, m in methods.items() if m.predicted is not None]
    if not rows:
        return []
    out = [
        "",
        "## Cost model: predicted vs measured decode tok/s",
        "",
        "Each method's rounds profiled on held-out prompts of the same file (one per category, 48 new tokens), "
        "predicted for this run's mean context and length (docs/cost-model.md). Each term: predicted / "
        "measured in this run, per round; `largest miss`: the term that moved the prediction most (its share "
        "of the error in decode tok/s).",
        "",
    ]

    def pair(m: MethodReport, predicted: float, key: str, spec: str) -> str:
        t = m.prediction_terms
        return f"{predicted:{spec}}" + (f" / {t['measured'][key]:{spec}}" if t else "")

    def largest(m: MethodReport) -> str:
        t = m.prediction_terms
        return f"{t['largest']} {t['miss'][t['largest']]:+.1%}" if t else "-"

    return out + _md_table(
        ("method", "predicted", "measured", "error", "tokens/round", "draft ms", "verify ms", "overhead ms",
         "largest miss"),
        ("---",) + ("---:",) * 7 + ("---",),
        [
            (
                n,
                f"{p.decode_tokens_per_s:.1f}",
                _fmt(m.decode_tokens_per_s, ".1f"),
                _fmt(m.prediction_error, "+.1%"),
                pair(m, p.tokens_per_round, "tokens_per_round", ".2f"),
                pair(m, p.draft_ms, "draft_ms", ".1f"),
                pair(m, p.verify_ms, "verify_ms", ".1f"),
                pair(m, p.overhead_ms, "overhead_ms", ".2f"),
                largest(m),
            )
            for n, m, p in rows
        ],
    )


def _ablation_table(methods: dict[str, MethodReport]) -> list[str]:
    rows = [(v, n, methods[n]) for v, n in ABLATION if n in methods]
    if len(rows) < 2:
        return []
    full = methods["full"].decode_tokens_per_s if "full" in methods else None
    out = ["", "## Table 3: ablation", ""]
    table = []
    for variant, n, m in rows:
        dec = m.decode_tokens_per_s
        vs_full = dec / full - 1 if dec and full else None
        table.append(
            (
                variant,
                f"`{n}`",
                _fmt(dec, ".1f"),
                _fmt(m.acceptance_rate, ".1%"),
                _fmt(m.peak_rss_mb, ".0f"),
                f"{_fmt(m.speedup_vs_ar, '.2f')}x",
                _fmt(vs_full, "+.1%"),
            )
        )
    return out + _md_table(
        ("variant", "method", "decode tok/s", "accepted by target", "peak RSS MB", "vs ar", "vs full"),
        ("---", "---") + ("---:",) * 5,
        table,
    )


# -- plots and files -----------------------------------------------------------------------------


def plots(report: BenchReport, folder: Path) -> list[Path]:
    """Write the PNG plots; returns their paths."""
    try:
        import matplotlib  # optional extra (.[report]); plots only

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional extra, as above
    except ImportError as e:
        raise CascadeError("plots need matplotlib: pip install matplotlib") from e
    methods = report.methods
    ar = methods.get("ar")
    written = []

    names = [n for n in methods if n != "ar"]
    if ar and names:  # speedup over ar, by method and category
        cats = sorted(ar.by_category)
        fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(cats) + 3), 4.5))
        width = 0.8 / max(1, len(names))
        colours = plt.get_cmap("tab20").colors
        for i, n in enumerate(names):
            ys = [methods[n].by_category.get(c, 0) / ar.by_category[c] for c in cats]
            ax.bar([j + i * width for j in range(len(cats))], ys, width, label=n, color=colours[i % len(colours)])
        ax.axhline(1.0, color="black", lw=0.8, ls="--")
        ax.set_xticks([j + width * (len(names) - 1) / 2 for j in range(len(cats))], cats, rotation=30, ha="right")
        ax.set_ylabel("speedup over ar (tok/s ratio)")
        ax.set_title("Speedup by method and Spec-Bench category")
        ax.legend(ncol=min(4, len(names)), fontsize=8)
        fig.tight_layout()
        written.append(folder / "speedup.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    if any(m.acceptance_by_position for m in methods.values()):  # acceptance by position
        fig, ax = plt.subplots(figsize=(7, 4.5))
        colours = plt.get_cmap("tab20").colors
        for i, (n, m) in enumerate(methods.items()):
            if m.acceptance_by_position:
                acc = m.acceptance_by_position
                ax.plot(range(1, len(acc) + 1), acc, marker="o", label=n, color=colours[i % len(colours)])
        ax.set_xlabel("draft position")
        ax.set_ylabel("accepted by the target")
        ax.set_ylim(0, 1.02)
        ax.set_title("Acceptance by draft position")
        ax.legend(fontsize=8)
        fig.tight_layout()
        written.append(folder / "acceptance.png")
        fig.savefig(written[-1], dpi=120)
        plt.close(fig)

    fig, ax = plt.subplots(figsize=(5.5, 5))  # predicted vs measured
    pts = [
        (n, m.predicted_decode_tokens_per_s, m.decode_tokens_per_s)
        for n, m in methods.items()
        if m.predicted_decode_tokens_per_s and m.decode_tokens_per_s
    ]
    hi = max([max(p, q) for _, p, q in pts], default=1.0) * 1.15
    ax.plot([0, hi], [0, hi], color="black", lw=0.8)
    ax.fill_between([0, hi], [0, hi * 0.85], [0, hi * 1.15], color="grey", alpha=0.15, label="within 15%")
    for n, p, q in pts:
        ax.scatter([q], [p])
        ax.annotate(n, (q, p), textcoords="offset points", xytext=(4, 4), fontsize=8)
    ax.set_xlim(0, hi)
    ax.set_ylim(0, hi)
    ax.set_xlabel("measured decode tok/s")
    ax.set_ylabel("predicted decode tok/s")
    ax.set_title("Cost model: predicted vs measured")
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    written.append(folder / "predicted.png")
    fig.savefig(written[-1], dpi=120)
    plt.close(fig)
    return written


def to_json(report: BenchReport) -> str:
    return json.dumps(report.to_dict(), indent=2)


def write(report: BenchReport, folder: Path) -> list[Path]:
    """report.json, report.md and the plots into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(to_json(report))
    (folder / "report.md").write_text(markdown(report))
    return [folder / "report.json", folder / "report.md", *plots(report, folder)]
