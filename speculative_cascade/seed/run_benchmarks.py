"""``python -m speculative_cascade.seed.run_benchmarks``: every method, as ``cascade bench``."""

from .benchmarks import ALL_METHODS, run

if __name__ == "__main__":
    run("run_benchmarks", ALL_METHODS)
