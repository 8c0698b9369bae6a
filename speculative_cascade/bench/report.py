"""The benchmark report as Markdown tables and PNG plots (from the JSON report of ``runner.run_bench``).

Tables follow the seed paper's: Table 1 (throughput, latency per token, speedup, acceptance,
memory, quality), the throughput breakdown by stage, and tokens/s by Spec-Bench category.
"""

from __future__ import annotations

import json
from pathlib import Path

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



def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def markdown(report: dict) -> str:
    cfg, methods = report["config"], report["methods"]
    out = [
        "# Benchmark report",
        "",
        f"{cfg['prompts']} prompts, {cfg['max_new_tokens']} new tokens, greedy, target `{cfg['target']}`, "
        f"{cfg['threads']} threads, torch {cfg['torch']}, {cfg['date']}.",
        "",
        "## Table 1: throughput, latency, speedup, acceptance, memory, quality",
        "",
        "| method | tok/s | decode tok/s | predicted | latency ms/token | vs ar | accepted | tokens/round "
        "| peak RSS MB | PPL | = ar | sampling p |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | :---: | ---: |",
    ]
    for name, m in methods.items():
        dec = m.get("decode_tokens_per_s")
        out.append(
            f"| {name} | {m['tokens_per_s']:.1f} | {_fmt(dec, '.1f')} | "
            f"{_fmt(m.get('predicted_decode_tokens_per_s'), '.1f')} | {_fmt(1000 / dec if dec else None, '.1f')} | "
            f"{_fmt(m.get('speedup_vs_ar'), '.2f')}x | {_fmt(m.get('acceptance_rate'), '.1%')} | "
            f"{_fmt(m.get('mean_accepted_length'), '.2f')} | {_fmt(m.get('peak_rss_mb'), '.0f')} | "
            f"{_fmt(m.get('perplexity'), '.4f')} | {dict([(True, 'yes'), (False, 'NO')]).get(m.get('identical_to_ar'), '-')} | "
            f"{_fmt(m.get('sampling_check', {}).get('p_value'), '.2g')} |"
        )
    out += [
        "",
        "Latency per token = 1 / decode tok/s. `= ar`: greedy output identical to `ar` on every prompt. "
        "PPL: perplexity of the generated tokens under the target. `sampling p`: chi-square p-value of the "
        "first sampled token (temperature 1) against the target's exact distribution (`--sampling-check` "
        "samples); a lossless method gives p spread over (0, 1), a broken sampler p near 0.",
    ]
    cascades = cfg.get("cascades") or {}
    if cascades:
        out += ["", "Configurations: " + "; ".join(f"`{n}`: {d}" for n, d in cascades.items()) + "."]
    out += _prediction_table(methods) + _ablation_table(methods)
    for name, m in methods.items():
        stages = m.get("stages") or []
        if len(stages) < 2:
            continue
        out += [
            "",
            f"## Throughput breakdown: {name}",
            "",
            "| stage | forwards | tokens in | proposed | accepted by next | rate | time s | share |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for i, st in enumerate(stages):
            up = i < len(stages) - 1
            out.append(
                f"| {st['name']} | {st['forwards']} | {st['tokens_in']} | {st['proposed'] if up else '-'} | "
                f"{st['accepted'] if up else '-'} | {_fmt(st['acceptance_rate'] if up else None, '.1%')} | "
                f"{st['seconds']:.2f} | {_fmt(st.get('time_share'), '.0%')} |"
            )
    cats = sorted({c for m in methods.values() for c in m["by_category"]})
    out += [
        "",
        "## Tokens/s by category",
        "",
        "| method | " + " | ".join(cats) + " |",
        "| --- | " + " | ".join("---:" for _ in cats) + " |",
    ]
    for name, m in methods.items():
        out.append(f"| {name} | " + " | ".join(_fmt(m["by_category"].get(c), ".1f") for c in cats) + " |")
    out += [
        "",
        "Plots: `speedup.png` (speedup over ar by method and category), `acceptance.png` "
        "(acceptance by draft position), `predicted.png` (predicted vs measured decode tok/s).",
    ]
    return "\n".join(out) + "\n"


def _prediction_table(methods: dict) -> list[str]:
    rows = [(n, m) for n, m in methods.items() if m.get("predicted")]
    if not rows:
        return []
    out = [
        "",
        "## Cost model: predicted vs measured decode tok/s",
        "",
        "Each method's rounds profiled on held-out prompts of the same file (one per category, 48 new tokens), "
        "predicted for this run's mean context and length (docs/cost-model.md).",
        "",
        "| method | predicted | measured | error | tokens/round | draft ms | verify ms | overhead ms |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for n, m in rows:
        p = m["predicted"]
        out.append(
            f"| {n} | {p['decode_tokens_per_s']:.1f} | {_fmt(m.get('decode_tokens_per_s'), '.1f')} | "
            f"{_fmt(m.get('prediction_error'), '+.1%')} | {p['tokens_per_round']:.2f} | {p['draft_ms']:.1f} | "
            f"{p['verify_ms']:.1f} | {p['overhead_ms']:.2f} |"
        )
    return out


def _ablation_table(methods: dict) -> list[str]:
    rows = [(v, n, methods[n]) for v, n in ABLATION if n in methods]
    if len(rows) < 2:
        return []
    full = methods.get("full", {}).get("decode_tokens_per_s")
    out = [
        "",
        "## Table 3: ablation",
        "",
        "| variant | method | decode tok/s | accepted by target | peak RSS MB | vs ar | vs full |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for variant, n, m in rows:
        dec = m.get("decode_tokens_per_s")
        vs_full = dec / full - 1 if dec and full else None
        out.append(
            f"| {variant} | `{n}` | {_fmt(dec, '.1f')} | {_fmt(m.get('acceptance_rate'), '.1%')} | "
            f"{_fmt(m.get('peak_rss_mb'), '.0f')} | {_fmt(m.get('speedup_vs_ar'), '.2f')}x | {_fmt(vs_full, '+.1%')} |"
        )
    return out


def plots(report: dict, folder: Path) -> list[Path]:
    """Write the PNG plots; returns their paths."""
    try:
        import matplotlib  # optional extra (.[report]); plots only

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # optional extra, as above
    except ImportError as e:
        raise CascadeError("plots need matplotlib: pip install matplotlib") from e
    methods = report["methods"]
    ar = methods.get("ar")
    written = []

    if ar:  # speedup over ar, by method and category
        cats = sorted(ar["by_category"])
        names = [n for n in methods if n != "ar"]
        fig, ax = plt.subplots(figsize=(max(8, 0.9 * len(cats) + 3), 4.5))
        width = 0.8 / max(1, len(names))
        colours = plt.get_cmap("tab20").colors
        for i, n in enumerate(names):
            ys = [methods[n]["by_category"].get(c, 0) / ar["by_category"][c] for c in cats]
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

    fig, ax = plt.subplots(figsize=(7, 4.5))  # acceptance by position
    colours = plt.get_cmap("tab20").colors
    for i, (n, m) in enumerate(methods.items()):
        acc = m.get("acceptance_by_position")
        if acc:
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
        (n, m["predicted_decode_tokens_per_s"], m["decode_tokens_per_s"])
        for n, m in methods.items()
        if m.get("predicted_decode_tokens_per_s") and m.get("decode_tokens_per_s")
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


def write(report: dict, folder: Path) -> list[Path]:
    """report.json, report.md and the plots into ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "report.json").write_text(json.dumps(report, indent=2))
    (folder / "report.md").write_text(markdown(report))
    return [folder / "report.json", folder / "report.md", *plots(report, folder)]
