"""speculative_cascade: lossless speculative decoding with a cascade of drafters.

Public API:

* :class:`SpeculativeGenerator` and :func:`generate` - speculative decoding with an INT8
  draft or any cascade (:class:`CascadeConfig`);
* :class:`CascadeInference`, :class:`TinyModel`, :class:`DraftModel`, :class:`TargetModel` and
  :func:`csd` - the seed papers' APIs (``speculative_cascade.seed``);
* :func:`load_model`, :func:`quantize_int8` - the native decoder and its INT8 drafts;
* :class:`SamplingParams`, :class:`GenerationStats`, :class:`CascadeError`.

Imports are lazy so that ``import speculative_cascade`` stays cheap.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "SpeculativeGenerator": ".generator",
    "CascadeInference": ".seed.inference",
    "TinyModel": ".seed.inference",
    "DraftModel": ".seed.inference",
    "TargetModel": ".seed.inference",
    "csd": ".seed.csd",
    "CascadeConfig": ".config",
    "generate": ".generator",
    "load_model": ".engine.loader",
    "quantize_int8": ".engine.quant",
    "SamplingParams": ".sampling",
    "GenerationStats": ".decoding",
    "CascadeError": ".errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
