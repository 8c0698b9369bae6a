"""``python -m speculative_cascade.seed.compare_methods --methods ...``: the named methods, as ``cascade bench``."""

from .benchmarks import run

if __name__ == "__main__":
    run("compare_methods", None)
