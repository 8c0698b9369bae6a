"""Alias of ``python -m speculative_cascade.seed.compare_methods`` (the seed README's path)."""

from ..seed.benchmarks import run

if __name__ == "__main__":
    run("compare_methods", None)
