"""``python -m speculative_cascade.benchmarks.compare_methods --methods ...``: the named methods, as ``cascade bench``."""

from . import run

if __name__ == "__main__":
    run("compare_methods", None)
