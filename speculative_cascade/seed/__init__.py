"""The seed papers' APIs, kept as they wrote them, on top of the project's own modules.

* :mod:`.inference` - the seed README's ``TinyModel``, ``DraftModel``, ``TargetModel`` and
  ``CascadeInference``;
* :mod:`.csd` - Cascade Speculative Drafting's ``csd(draft_list, target_model, ...)`` and
  ``get_mag_model``;
* :mod:`.benchmarks` - the seed README's benchmark commands, as aliases of ``cascade bench``::

    python -m speculative_cascade.seed.run_benchmarks --output results/
    python -m speculative_cascade.seed.compare_methods --methods cascade,standard --sequences 26
"""
