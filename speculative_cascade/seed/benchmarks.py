"""The seed README's benchmark entry points, as aliases of ``cascade bench``::

python -m speculative_cascade.seed.run_benchmarks --output results/
python -m speculative_cascade.seed.compare_methods --methods cascade,standard --sequences 26
"""

from __future__ import annotations

import argparse
import sys

from ..cli import main

# The seed papers' method names -> this project's bench methods.
ALIASES = {"cascade": "chain", "standard": "spec", "speculative": "spec", "autoregressive": "ar", "baseline": "ar"}
UNSUPPORTED = {"medusa", "eagle"}
ALL_METHODS = "hf,hf-pld,hf-assisted,ar,spec,spec4,mag,chain,tree,csd,auto"


# The seed's data sets that are not on this machine (nothing is downloaded): the Spec-Bench prompts instead.
OFFLINE_DATASETS = {"pg19", "cnn_dailymail", "cnn-dailymail", "xsum", "gsm8k", "humaneval", "mt-bench", "mt_bench"}


def bench_argv(args: argparse.Namespace, methods: str) -> list[str]:
    names, skipped = [], []
    for m in (x.strip().lower() for x in methods.split(",") if x.strip()):
        if m in UNSUPPORTED:
            skipped.append(m)
            continue
        names.append(ALIASES.get(m, m))
    if skipped and not names:
        raise SystemExit(f"error: method(s) {', '.join(skipped)} need trained heads this project does not ship")
    for m in skipped:
        print(f"note: skipping {m!r}: it needs trained heads this project does not ship", file=sys.stderr)
    if "ar" not in names:  # the reference every other method's speed and output are compared with
        names.insert(0, "ar")
    argv = ["bench", "--methods", ",".join(names), "--max-new-tokens", str(args.max_new_tokens)]
    if args.dataset is not None and args.dataset.lower() in OFFLINE_DATASETS:
        print(f"note: {args.dataset} is not on this machine; using the Spec-Bench prompts", file=sys.stderr)
    elif args.dataset not in (None, "spec_bench", "spec-bench"):
        argv += ["--prompts", args.dataset]
    if args.sequences:  # fewer than the 13 categories: that many prompts, one category each
        argv += ["--per-category", str(max(1, args.sequences // 13))]
        if args.sequences < 13:
            argv += ["--max-prompts", str(args.sequences)]
    if args.output:
        argv += ["--json", f"{args.output.rstrip('/')}/report.json"]
    if args.target:
        argv += ["--target", args.target]
    return argv


def parser(prog: str, default_methods: str | None) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description="Alias of `cascade bench` (see `cascade bench --help`).")
    p.add_argument("--dataset", default=None, help="Spec-Bench JSONL file (default: the Spec-Bench prompts)")
    p.add_argument("--methods", default=default_methods, required=default_methods is None)
    p.add_argument("--sequences", type=int, default=0, help="about this many prompts (13 categories)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--output", default=None, help="folder for report.json")
    p.add_argument("--target", default=None)
    p.add_argument("--hardware", default=None, help="accepted for compatibility; the machine is measured")
    return p


def run(prog: str, default_methods: str | None, argv: list[str] | None = None) -> None:
    args = parser(prog, default_methods).parse_args(argv)
    sys.argv = ["cascade", *bench_argv(args, args.methods)]
    main()
