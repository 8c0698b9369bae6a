"""``python -m speculative_cascade.benchmarks.run_benchmarks``: every method, as ``cascade bench``."""

from . import ALL_METHODS, run

if __name__ == "__main__":
    run("run_benchmarks", ALL_METHODS)
