"""Closed-form cost model of a chain cascade.

Notation: a round at level ``l`` drafts ``k`` tokens with the level below and verifies
them with one forward of stage ``l`` over ``k + 1`` tokens.

* ``t_l(n)`` - seconds for one forward of stage ``l`` over ``n`` new tokens
  (:class:`ForwardCost`): measured points, or the roofline
  ``max(W / B, n F / R) + c`` (weight bytes over memory bandwidth, FLOPs over compute
  rate, plus a fixed per-call overhead; Williams et al., "Roofline", CACM 2009). The seed
  paper's equation 5 charges the same two terms per stage.
* ``P_i`` - probability that the first ``i + 1`` drafted tokens of a round are all accepted
  (:class:`Acceptance`, measured per position: ``accepted_by_position[i] / drafted_by_position[i]``).
  A round of ``k`` then yields ``E(k) = 1 + sum_{i < k} P_i`` tokens: the accepted ones plus the
  recovered/bonus token. With a constant acceptance ``a`` this is Leviathan et al. (2023), eq. 1:
  ``E = (1 - a^(k+1)) / (1 - a)``.
* The cost of one token produced by level ``l`` is ``c_l = (k_{l-1} c_{l-1} + t_l(k_{l-1} + 1)) / E_l(k_{l-1})``;
  a leaf stage drafts autoregressively, ``c_0 = t_0(1)``. The target's rate is
  ``E_T(k) / (k c_top + t_T(k + 1) + o)`` tokens per second, ``o`` the per-round overhead of the loop.
"""

from __future__ import annotations

from bisect import bisect_left
from dataclasses import dataclass

from ..errors import CascadeError


def _interp(pts: tuple[tuple[int, float], ...], n: int) -> float:
    """Linear interpolation in sorted ``(n, value)`` points; linear extrapolation beyond the last two."""
    if len(pts) == 1 or n <= pts[0][0]:
        return pts[0][1]
    ns = [p[0] for p in pts]
    i = bisect_left(ns, n)
    if i < len(ns) and ns[i] == n:
        return pts[i][1]
    (n0, t0), (n1, t1) = (pts[i - 1], pts[i]) if i < len(ns) else (pts[-2], pts[-1])
    return t0 + (t1 - t0) * (n - n0) / (n1 - n0)


def at_context(t: float, slope: float, context: float, measured_at: float) -> float:
    """A cost ``t`` measured after ``measured_at`` cached tokens, moved to ``context`` along
    ``slope`` (seconds per context token). At a shorter context the part that shrinks is at most
    all of ``t`` (the cost is at least ``t * context / measured_at``): a slope measured while the
    machine was busy can exceed ``t / measured_at``, and a cost must not go to zero or below."""
    moved = t + slope * (context - measured_at)
    if context < measured_at and measured_at > 0:
        moved = max(moved, t * max(context, 0.0) / measured_at)
    return moved


@dataclass(frozen=True)
class ForwardCost:
    """``t(n, L)``: seconds for one forward over ``n`` new tokens after ``L`` cached ones.

    ``points`` are measured ``(n, seconds)`` at context ``context``: linear interpolation
    between them, linear extrapolation from the last two (compute-bound regime). ``slope``
    (``(n, seconds per context token)``, measured at a second, longer context) adds the part
    that grows with the context - attention reads ``L`` cached keys and values for each of the
    ``n`` tokens: ``t(n, L) = t(n) + slope(n) (L - context)``."""

    name: str
    points: tuple[tuple[int, float], ...]
    context: int = 0
    slope: tuple[tuple[int, float], ...] = ()

    def __post_init__(self) -> None:
        if not self.points:
            raise CascadeError(f"no cost points for {self.name}")
        object.__setattr__(self, "points", tuple(sorted((int(n), float(t)) for n, t in self.points)))
        object.__setattr__(self, "slope", tuple(sorted((int(n), float(s)) for n, s in self.slope)))

    def __call__(self, n: float, context: float | None = None) -> float:
        t = _interp(self.points, n)
        if context is not None and self.slope:
            t = at_context(t, _interp(self.slope, n), context, self.context)
        return max(t, 0.0)

    def slope_at(self, n: float) -> float:
        """Seconds per context token of a forward over ``n`` tokens (0 when not measured)."""
        return _interp(self.slope, n) if self.slope else 0.0

    def scaled(self, factor: float) -> "ForwardCost":
        return ForwardCost(
            self.name,
            tuple((n, t * factor) for n, t in self.points),
            self.context,
            tuple((n, s * factor) for n, s in self.slope),
        )

    @classmethod
    def roofline(
        cls,
        name: str,
        weight_bytes: float,
        bandwidth: float,
        flops_per_token: float,
        flops_rate: float,
        overhead: float = 0.0,
        max_n: int = 64,
    ) -> "ForwardCost":
        """``t(n) = max(weight_bytes / bandwidth, n * flops_per_token / flops_rate) + overhead``."""
        pts = tuple(
            (n, max(weight_bytes / bandwidth, n * flops_per_token / flops_rate) + overhead) for n in range(1, max_n + 1)
        )
        return cls(name, pts)

    @classmethod
    def on_mesh(
        cls,
        name: str,
        weight_bytes: float,
        bandwidth: float,
        flops_per_token: float,
        flops_rate: float,
        *,
        model: int,
        collectives: int,
        collective_s: float,
        max_n: int = 64,
    ) -> "ForwardCost":
        """A target split tensor-parallel over ``model`` devices (the JAX backend's ``model`` axis): each
        device reads and computes ``1 / model`` of it (``bandwidth``, ``flops_rate``: one device's), and
        each forward waits for ``collectives`` all-reduces of ``collective_s`` each (two per block)."""
        return cls.roofline(
            name, weight_bytes / model, bandwidth, flops_per_token / model, flops_rate,
            overhead=collectives * collective_s if model > 1 else 0.0, max_n=max_n,
        )

    @classmethod
    def free(cls, name: str) -> "ForwardCost":
        return cls(name, ((1, 0.0), (2, 0.0)))


@dataclass(frozen=True)
class Acceptance:
    """``survive[i]``: probability that drafted positions ``0..i`` of a round are all accepted."""

    survive: tuple[float, ...]

    def __post_init__(self) -> None:
        s = tuple(float(x) for x in self.survive)
        if any(not 0.0 <= x <= 1.0 for x in s):
            raise CascadeError("acceptance probabilities must be in [0, 1]")
        object.__setattr__(self, "survive", s)

    @classmethod
    def constant(cls, a: float, k: int = 64) -> "Acceptance":
        return cls(tuple(a ** (i + 1) for i in range(k)))

    @classmethod
    def from_counts(cls, accepted_by_position, budgeted_by_position) -> "Acceptance":
        """From ``GenerationStats`` counters: ``accepted[i] / budgeted[i]``, the share of the rounds that
        could draft position ``i`` in which positions ``0..i`` were drafted and accepted (a drafter that
        proposes nothing, as MaG without a match, counts as rejected). Positions never budgeted
        repeat the last measured rate."""
        s = [a / d for a, d in zip(accepted_by_position, budgeted_by_position) if d]
        return cls(tuple(s))

    def rate(self, i: int) -> float:
        """P(position i accepted | positions < i accepted)."""
        p = self._p(i)
        prev = self._p(i - 1) if i > 0 else 1.0
        return p / prev if prev > 0 else 0.0

    def _p(self, i: int) -> float:
        s = self.survive
        if not s:
            return 0.0
        if i < len(s):
            return s[i]
        # beyond the measured positions: keep the last measured conditional rate
        last = s[-1] / s[-2] if len(s) > 1 and s[-2] > 0 else s[-1]
        return s[-1] * last ** (i - len(s) + 1)

    def expected_tokens(self, k: int) -> float:
        """Tokens a round of ``k`` drafted positions yields, the recovered/bonus token included."""
        return 1.0 + sum(self._p(i) for i in range(k))


def token_cost(costs: list[ForwardCost], accept: list[Acceptance], ks: list[int]) -> float:
    """Seconds per token produced by the top drafting stage of a chain.

    costs[l], accept[l], ks[l] for stages smallest first; ``accept[l]`` is stage ``l``'s
    acceptance by the stage above it, ``ks[l]`` the tokens stage ``l`` drafts per review by it."""
    c = costs[0](1)
    for lvl in range(1, len(costs)):
        m = ks[lvl - 1]
        c = (m * c + costs[lvl](m + 1)) / accept[lvl - 1].expected_tokens(m)
    return c


def predict_chain(
    target: ForwardCost,
    costs: list[ForwardCost],
    accept: list[Acceptance],
    ks: list[int],
    overhead: float = 0.0,
) -> dict:
    """Predicted decode speed of the chain ``stages -> target``.

    ``costs``/``ks`` smallest stage first; ``accept[l]`` is stage ``l``'s acceptance by the
    stage above it (the target for the last one). Returns tokens_per_s, round_s,
    tokens_per_round and the draft/verify split."""
    if not (len(costs) == len(accept) == len(ks)) or not costs:
        raise CascadeError("need one cost, acceptance and k per drafting stage")
    if any(k < 1 for k in ks):
        raise CascadeError("every k must be >= 1")
    c = token_cost(costs, accept, ks)
    k = ks[-1]
    draft_s, verify_s = k * c, target(k + 1)
    tokens = accept[-1].expected_tokens(k)
    round_s = draft_s + verify_s + overhead
    return {
        "tokens_per_s": tokens / round_s,
        "round_s": round_s,
        "tokens_per_round": tokens,
        "draft_s": draft_s,
        "verify_s": verify_s,
    }


def predict_autoregressive(target: ForwardCost, overhead: float = 0.0, context: float | None = None) -> float:
    return 1.0 / (target(1, context) + overhead)


def generation_rate(tokens_per_round: float, round_s: float, new_tokens: float | None = None) -> float:
    """Tokens/s of a generation whose rounds yield ``tokens_per_round`` tokens in ``round_s`` seconds.

    Over ``N = new_tokens`` tokens the last round is cut short by the token budget: it costs
    a round but yields on average only half of what a full one does, so ``N / E + (1 - 1/E) / 2``
    rounds (exactly ``N`` for autoregressive decoding, ``E = 1``)."""
    if round_s <= 0 or tokens_per_round <= 0:
        return 0.0
    if not new_tokens:
        return tokens_per_round / round_s
    rounds = new_tokens / tokens_per_round + 0.5 * (1.0 - 1.0 / max(tokens_per_round, 1.0))
    return new_tokens / (rounds * round_s)
