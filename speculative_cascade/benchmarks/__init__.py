"""The seed README's benchmark commands (``python -m speculative_cascade.benchmarks.run_benchmarks``,
``...compare_methods``): aliases of :mod:`speculative_cascade.seed`'s, which run ``cascade bench``."""
