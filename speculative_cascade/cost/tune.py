"""``cascade tune``: calibrate the cost model on this machine and pick the fastest configuration.

1. ``t(n, L)`` of the target, measured at a short and a long context (``calibrate.py``);
2. one short calibration generation per candidate drafter (two-stage, and MaG in front
   of each neural draft) and one autoregressive, on a few prompts: per-position acceptance
   by the target, the drafter's cost per token inside the loop, the loop's overhead per
   round (:class:`~.calibrate.RoundProfile`);
3. the closed form over every ``k``; the best configuration wins, and plain decoding wins
   when no configuration is predicted to beat it by ``margin``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..builder import build_round
from ..config import CascadeConfig
from ..decoding import StopChecker, eos_ids
from ..errors import CascadeError
from ..stages.neural import ModelStage
from .analytic import ForwardCost
from .calibrate import RoundProfile, measure_target_cost, profile_round

CALIBRATION_K = 12
K_RANGE = range(2, 17)


@dataclass
class Candidate:
    name: str
    settings: dict  # CascadeConfig settings; the top-level k is what the search sets
    profile: RoundProfile  # measured at k = CALIBRATION_K
    predictions: dict = field(default_factory=dict)  # k -> predicted tokens/s

    @property
    def token_cost(self) -> float:
        return self.profile.token_cost

    @property
    def overhead(self) -> float:
        return self.profile.overhead

    def config(self, k: int) -> CascadeConfig:
        return CascadeConfig.from_dict({**self.settings, "k": [*self.settings["k"][:-1], k]})


@dataclass
class TuneResult:
    config: CascadeConfig | None  # None: plain autoregressive decoding is predicted fastest
    predicted_tokens_per_s: float
    predicted_ar_tokens_per_s: float
    candidates: list[Candidate]
    target_cost: ForwardCost
    seconds: float
    profile: RoundProfile  # the chosen configuration's (plain decoding's when config is None)
    ar_profile: RoundProfile

    def to_toml(self) -> str:
        lines = [
            "# written by `cascade tune`: the fastest configuration the cost model predicts on this machine",
            f"# predicted {self.predicted_tokens_per_s:.1f} tok/s (autoregressive: "
            f"{self.predicted_ar_tokens_per_s:.1f} tok/s)",
        ]
        for c in self.candidates:
            best = max(c.predictions.items(), key=lambda kv: kv[1])
            lines.append(f"#   {c.name:14s} best k {best[0]:2d}: {best[1]:.1f} tok/s")
        lines.append("[cascade]")
        if self.config is None:
            lines.append("stages = []  # no speculation beats autoregressive decoding here: use --draft none")
            return "\n".join(lines) + "\n"
        for key, value in self.config.to_dict().items():
            if value is None or key in ("tree_nodes", "tree_width", "tree_keep") and self.config.mode != "tree":
                continue
            lines.append(f"{key} = {_toml(value)}")
        return "\n".join(lines) + "\n"


def _toml(v) -> str:
    if isinstance(v, bool):  # before numbers: a bool is an int in Python, and TOML spells it lowercase
        return "true" if v else "false"
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


def tune(
    target,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 48,
    max_len: int = 2048,
    drafts=("int8", "int4"),
    with_mag: bool = True,
    margin: float = 0.05,
    progress=None,
    context: float | None = None,
    new_tokens: float | None = None,
) -> TuneResult:
    """Calibrate and search; ``prompts`` are token ids (a handful is enough). ``context`` and
    ``new_tokens``: the workload to predict for (default: the calibration prompts')."""
    if not prompts:
        raise CascadeError("tune needs at least one calibration prompt")
    t0 = time.perf_counter()
    shared: dict = {}
    target_stage = ModelStage(target, max_len, name="target")
    target_cost = measure_target_cost(target_stage, prompts, max_len)
    if progress:
        progress("target forward costs")
    eos = StopChecker(eos_ids(target, tokenizer)).eos
    ar = profile_round(
        "autoregressive", build_round(None, target, max_len)[0], target_stage, prompts, target_cost,
        max_new_tokens=max_new_tokens, eos=eos,
    )
    if progress:
        progress("autoregressive")
    plans = []
    for d in drafts:
        plans.append((f"{d}", {"stages": [d], "k": [CALIBRATION_K]}))
        if with_mag:
            plans.append((f"mag->{d}", {"stages": ["mag:none", d], "k": [3, CALIBRATION_K], "mag_min_ngram": 2}))
    candidates = []
    for name, settings in plans:
        rnd, _ = build_round(CascadeConfig.from_dict(settings), target, max_len, shared=shared)
        profile = profile_round(name, rnd, target_stage, prompts, target_cost, max_new_tokens=max_new_tokens, eos=eos)
        candidates.append(Candidate(name, settings, profile))
        if progress:
            progress(name)
    ar_rate = ar.predict(0, context, new_tokens)["tokens_per_s"]
    best, best_rate = None, ar_rate * (1 + margin)
    for c in candidates:
        for k in K_RANGE:
            rate = c.profile.predict(k, context, new_tokens)["tokens_per_s"]
            c.predictions[k] = rate
            if rate > best_rate:
                best, best_rate = (c, k), rate
    config = best[0].config(best[1]) if best is not None else None
    return TuneResult(
        config,
        best_rate if best else ar_rate,
        ar_rate,
        candidates,
        ar.target_cost,
        time.perf_counter() - t0,
        best[0].profile if best else ar,
        ar,
    )
