"""Analytical cost model of speculative cascades (``model.py``) and its calibration on the user's machine
(``calibrate.py``)."""

from .analytic import Acceptance, ForwardCost, predict_chain

__all__ = ["Acceptance", "ForwardCost", "predict_chain"]
