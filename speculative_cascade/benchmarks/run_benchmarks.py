"""Alias of ``python -m speculative_cascade.seed.run_benchmarks`` (the seed README's path)."""

from ..seed.benchmarks import ALL_METHODS, run

if __name__ == "__main__":
    run("run_benchmarks", ALL_METHODS)
