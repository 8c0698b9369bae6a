"""``cascade tune``: calibrate the cost model on this machine and pick the fastest configuration.

1. ``t(n)`` of the target and of each neural draft, measured (``calibrate.py``);
2. one short calibration generation per candidate drafter (two-stage, and MaG in front
   of each neural draft) on a few prompts: per-position acceptance by the target, the
   drafter's cost per token inside the loop, and the loop's overhead per round;
3. the closed form of ``model.py`` over every ``k``; the best configuration wins, and plain
   decoding wins when no configuration is predicted to beat it by ``margin``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..config import CascadeConfig, build_round
from ..errors import CascadeError
from .calibrate import measure_forward_cost
from .model import Acceptance, ForwardCost, predict_autoregressive

CALIBRATION_K = 12
K_RANGE = range(2, 17)


@dataclass
class Candidate:
    name: str
    settings: dict  # CascadeConfig settings without the top-level k
    token_cost: float  # seconds per drafted token, measured inside the loop
    accept: Acceptance
    overhead: float  # seconds per round outside the draft and verify forwards
    verify_per_round: float  # seconds of the target's verification per round (at k = CALIBRATION_K)
    measured_tokens_per_s: float  # decode speed of the calibration run (at k = CALIBRATION_K)
    correction: float = 1.0  # measured / closed form at k = CALIBRATION_K
    predictions: dict = field(default_factory=dict)  # k -> tokens/s


@dataclass
class TuneResult:
    config: CascadeConfig | None  # None: plain autoregressive decoding is predicted fastest
    predicted_tokens_per_s: float
    predicted_ar_tokens_per_s: float
    candidates: list[Candidate]
    target_cost: ForwardCost
    seconds: float

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
    if isinstance(v, str):
        return f'"{v}"'
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return repr(v)


def _calibrate_candidate(name, settings, target, tokenizer, prompts, max_new_tokens, max_len, shared, target_stage):
    from ..decoding import StopChecker, generate_tokens

    cfg = CascadeConfig.from_dict({**settings, "k": [*settings.get("k", [])[:-1], CALIBRATION_K]})
    rnd, stages = build_round(cfg, target, tokenizer, max_len, cache=shared)
    acc, dr = [0] * CALIBRATION_K, [0] * CALIBRATION_K
    draft_s = drafted = rounds = other = verify_s = new = decode_s = 0.0
    for ids in prompts:
        _, st = generate_tokens(
            target,
            ids,
            round=rnd,
            max_new_tokens=max_new_tokens,
            stop=StopChecker(()),
            max_len=max_len,
            target_stage=target_stage,
        )
        for i in range(min(CALIBRATION_K, len(st.accepted_by_position))):
            acc[i] += st.accepted_by_position[i]
            dr[i] += st.drafted_by_position[i]
        draft_s += st.draft_s
        verify_s += st.verify_s
        new += st.new_tokens
        decode_s += st.total_s - st.prefill_s
        drafted += st.drafted
        rounds += st.rounds
        other += (st.total_s - st.prefill_s) - st.draft_s - st.verify_s
    if not drafted:
        raise CascadeError(f"calibration of {name} drafted nothing")
    return Candidate(
        name,
        settings,
        token_cost=draft_s / drafted,
        accept=Acceptance.from_counts(acc, dr),
        overhead=other / rounds,
        verify_per_round=verify_s / rounds,
        measured_tokens_per_s=new / decode_s,
    )


def tune(
    target,
    tokenizer,
    prompts: list[list[int]],
    *,
    max_new_tokens: int = 64,
    max_len: int = 2048,
    drafts=("int8", "int4"),
    with_mag: bool = True,
    margin: float = 0.05,
    progress=None,
) -> TuneResult:
    """Calibrate and search; ``prompts`` are token ids (a handful is enough)."""
    from ..stages.model import ModelStage

    if not prompts:
        raise CascadeError("tune needs at least one calibration prompt")
    t0 = time.perf_counter()
    shared: dict = {}
    target_stage = ModelStage(target, max_len, name="target")
    context = max(prompts, key=len)
    target_cost = measure_forward_cost(target_stage, context, ns=(1, 2, 3, 5, 9, 13, 17), reps=5)
    if progress:
        progress("target forward costs")
    plans = []
    for d in drafts:
        plans.append((f"{d}", {"stages": [d], "k": [CALIBRATION_K]}))
        if with_mag:
            plans.append((f"mag->{d}", {"stages": ["mag:none", d], "k": [3, CALIBRATION_K], "mag_min_ngram": 2}))
    candidates = []
    for name, settings in plans:
        candidates.append(
            _calibrate_candidate(
                name, settings, target, tokenizer, prompts, max_new_tokens, max_len, shared, target_stage
            )
        )
        if progress:
            progress(name)
    # The standalone measurement of t(n) and the same forwards inside the loop differ by a
    # steady factor (caches, the CPU's clock): scale t(n) so t(k + 1) matches the loop's verify time.
    scale = sum(c.verify_per_round for c in candidates) / len(candidates) / target_cost(CALIBRATION_K + 1)
    target_cost = ForwardCost(target_cost.name, tuple((n, t * scale) for n, t in target_cost.points))
    ar = predict_autoregressive(target_cost)
    best, best_rate = None, ar * (1 + margin)
    for c in candidates:

        def closed_form(k: int) -> float:
            return c.accept.expected_tokens(k) / (k * c.token_cost + target_cost(k + 1) + c.overhead)

        # What the closed form misses (end-of-generation rounds, the loop's own bookkeeping) is taken
        # as a steady factor: the one that makes it match the calibration run at its k.
        c.correction = c.measured_tokens_per_s / closed_form(CALIBRATION_K)
        for k in K_RANGE:
            rate = closed_form(k) * c.correction
            c.predictions[k] = rate
            if rate > best_rate:
                best, best_rate = (c, k), rate
    config = None
    if best is not None:
        c, k = best
        s = dict(c.settings)
        s["k"] = [*s["k"][:-1], k]
        config = CascadeConfig.from_dict(s)
    return TuneResult(config, best_rate if best else ar, ar, candidates, target_cost, time.perf_counter() - t0)
