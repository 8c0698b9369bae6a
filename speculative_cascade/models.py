"""The seed README's import path for its model classes: an alias of :mod:`speculative_cascade.seed.inference`."""

from .seed.inference import DraftModel, TargetModel, TinyModel  # noqa: F401  (re-exported)

__all__ = ["TinyModel", "DraftModel", "TargetModel"]
