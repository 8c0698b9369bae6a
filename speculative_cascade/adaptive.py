"""The adaptive round: before each verification it chooses how many drafted tokens the target
checks (``k``, 0 = plain decoding), from what this generation has measured so far.

The choice maximises the expected rate of one round (the cost model's closed form,
``cost/analytic.py``): ``E(k) / (D(k) + T(k + 1))``, where

* ``E(k) = 1 + sum_{i<k} P_i`` (``P_i``: positions ``0..i`` all accepted), from this generation's
  acceptance by position over a prior (Beta(1, 1) for the first position, each later one starting
  from the one before it, since acceptance falls slowly with the position); a lookup drafter that
  says how far back each copied token's match reaches (MaG's ``kinds``) is judged token by token
  by its reach class (``reach_class``);
* ``D(k)`` is the drafting time (a lookup such as MaG proposes first, almost free, and ``k`` is
  chosen among its tokens);
* ``T(n)`` is the target's forward over ``n`` tokens, measured in the loop, else the one-token time
  times the calibrated ``T(n) / T(1)``, its excess over 1 scaled to this context (``excess_scale``).

Losslessness: ``k`` is chosen from tokens already emitted and from timings, never from the target's
scores of the tokens it is about to verify, and verification is unchanged; greedy output is the
target's, and sampled tokens keep the target's distribution (the stopping rule does not look ahead).

The calibration cache (:class:`Calibration`) keeps, per model, CPU and kernel variant, the target's
``T(n) / T(1)`` and each drafter's acceptance by position, for later runs; each generation updates it.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path


from .cascade import ChainRound, Proposal, draft_tokens
from .stages.base import Drafter

PRIOR_SLOPE = 0.25  # T(n) / T(1) = 1 + PRIOR_SLOPE (n - 1) before anything is measured
PRIOR_ACCEPT = (1.0, 1.0)  # Beta(a, b) prior of the first position's acceptance; a later position's prior
# has the same weight (a + b pseudo-counts) and the previous position's estimate as its mean
PRIOR_WEIGHT = 16.0  # most pseudo-counts a cached acceptance carries into a new generation
EMA = 0.2  # weight of a new timing of the drafter in its running mean
TIMINGS = 9  # the target's cost at n tokens: the median of its last this many forwards over n
PROBE_EVERY = 16  # rounds without drafting after which one token is verified anyway (to keep learning);
# the wait doubles after each probe that is rejected (up to PROBE_MOST) and is back to this after one
# that is accepted: in an answer where the drafter has nothing, a probe costs an extra verified token
# (~1/3 of a one-token forward of the 4-bit target) for nothing
PROBE_MOST = 256
TABLE_EVERY = 8  # rounds between refreshes of the table of T(n) the choice reads (and whenever the forwards
# over some n become measured): the choice runs once a round beside a forward that has just evicted the
# interpreter's data from the caches, where each step of it costs several times what it costs warm
SCALE_RANGE = (0.2, 10.0)  # bounds of excess_scale (one odd timing moves it little further)
REACH_PRIOR_WEIGHT = 4.0  # most pseudo-counts a cached reach class carries into a generation: few, since
# a class's acceptance varies with the text (3-token matches: ~0.3 accepted in a math answer, ~0.6 overall)
REACH_KEY = "#reach"  # a drafter's acceptance by reach class, in the calibration cache: its name + this


def reach_class(reach: int) -> int:
    """The acceptance class of a proposed token whose match reaches ``reach`` tokens back (0: no
    match): 0-4 each their own, then 5-7, 8-15 and 16 or more."""
    return reach if reach <= 4 else 5 if reach < 8 else 8 if reach < 16 else 16


def prior_ratio(n: int) -> float:
    """``T(n) / T(1)`` before anything was measured on this machine."""
    return 1.0 + PRIOR_SLOPE * (n - 1)


@dataclass
class Calibration:
    """What this machine measured for one target: ``ratios[n] = T(n) / T(1)`` and, per drafter, the
    accepted and tried counts by position. Stored as JSON under the cache directory."""

    key: str
    ratios: dict[int, float] = field(default_factory=dict)
    acceptance: dict[str, list[list[float]]] = field(default_factory=dict)  # drafter -> [[accepted, tried], ...]
    t1: float | None = None  # the target's one-token forward, seconds
    draft_token_s: dict[str, float] = field(default_factory=dict)  # drafter -> seconds per drafted token
    path: Path | None = None

    @staticmethod
    def key_for(target, cpu: str, kernel: str) -> str:
        """The cache key: the model (its shape, weight format and bytes) and the machine (CPU, kernels)."""
        args = getattr(target, "args", None)
        ident = {
            "model": repr(args) if args is not None else type(target).__name__,
            "format": getattr(target, "weight_format", ""),
            "bytes": int(getattr(target, "decode_bytes", 0) or 0),
            "vocab": int(getattr(target, "vocab_size", 0) or 0),
            "cpu": cpu,
            "kernel": kernel,
        }
        return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:16]

    @classmethod
    def load(cls, folder: Path, key: str) -> "Calibration":
        path = folder / f"adaptive-{key}.json"
        try:
            data = json.loads(path.read_text())
            if data.get("key") != key:
                raise ValueError("key")
            ratios = {int(n): float(r) for n, r in data.get("ratios", {}).items() if float(r) > 0}
            acc = {
                str(name): [[float(a), float(t)] for a, t in rows]
                for name, rows in data.get("acceptance", {}).items()
            }
            t1 = float(data["t1"]) if data.get("t1") else None
            per = {str(k): float(v) for k, v in data.get("draft_token_s", {}).items()}
            return cls(key, ratios, acc, t1, per, path)
        except (OSError, ValueError, TypeError, KeyError, AttributeError):
            return cls(key, path=path)  # none yet, or unreadable: start from the prior

    def save(self) -> None:
        if self.path is None:
            return
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp = self.path.with_name(self.path.name + f".tmp{os.getpid()}")
            body = {
                "key": self.key,
                "ratios": self.ratios,
                "acceptance": self.acceptance,
                "t1": self.t1,
                "draft_token_s": self.draft_token_s,
            }
            tmp.write_text(json.dumps(body, indent=1))
            tmp.replace(self.path)
        except OSError:
            pass  # a read-only cache directory only costs the next run its head start

    def refine(self, cost) -> None:
        """Take the target's ``T(n) / T(1)`` and ``T(1)`` from a calibrated ``cost.analytic.ForwardCost``."""
        t1 = cost(1)
        if t1 > 0:
            self.t1 = t1
            self.ratios.update({n: cost(n) / t1 for n, _ in cost.points if n > 1})

    def ratio(self, n: int) -> float:
        if n <= 1:
            return 1.0
        if n in self.ratios:
            return self.ratios[n]
        known = sorted(self.ratios)
        if known:  # linear in n through the largest measured point
            m = known[-1] if known[-1] < n else min(k for k in known if k > n)
            return 1.0 + (self.ratios[m] - 1.0) * (n - 1) / (m - 1)
        return prior_ratio(n)


def _damped(a: float, t: float, weight: float = PRIOR_WEIGHT) -> list[float]:
    """A cached (accepted, tried) count carried into a new generation with at most ``weight`` tries."""
    w = min(1.0, weight / t) if t > 0 else 0.0
    return [a * w, t * w]


class AdaptiveRound(ChainRound):
    """A chain round whose draft length is chosen before each verification (see the module docstring).

    ``k_max``: most tokens a round verifies; ``lookup``: the drafter costs a lookup (MaG), so it
    proposes ``k_max`` first and ``k`` is chosen among its proposal; otherwise ``k`` is chosen first
    and the drafter drafts exactly that many."""

    def __init__(
        self, drafter: Drafter, k_max: int, *, lookup: bool, name: str = "draft", calibration: Calibration | None = None
    ) -> None:
        super().__init__(drafter, k_max)
        self.source: Drafter = drafter
        self.lookup, self.name = lookup, name
        self.calibration = calibration
        self._reset_estimates()

    def _reset_estimates(self) -> None:
        self.times: dict[int, deque] = {}  # n -> the target's last forwards over n tokens (seconds)
        cal = self.calibration
        self.draft_token_s: float | None = cal.draft_token_s.get(self.name) if cal else None  # seconds a token
        self.t1_prior = cal.t1 if cal else None  # the target's one-token forward, until measured here
        prior = cal.acceptance.get(self.name, []) if cal else []
        self.acc = [[0.0, 0.0] for _ in range(self.k)]  # position -> [accepted, tried]
        for i, (a, t) in enumerate(prior[: self.k]):
            self.acc[i] = _damped(a, t)
        by_reach = cal.acceptance.get(self.name + REACH_KEY, []) if cal else []
        # reach class -> [accepted, tried]
        self.by_reach = {c: _damped(a, t, REACH_PRIOR_WEIGHT) for c, (a, t) in enumerate(by_reach) if t > 0}
        self.kinds: list[int] | None = None  # the reach classes of the proposal being judged, if its drafter says
        self.idle = 0  # rounds since the last one that drafted
        self.probe_after = PROBE_EVERY  # idle rounds before the next probe
        self.probing = False  # this round's one token is a probe
        self._costs: list[float] | None = None  # T(1..k + 1) as the choice reads them (``_cost_table``)
        self._least = 0.0  # the least acceptance of a first token for which some k > 0 might pay
        self._age = 0  # rounds since the table was made

    # -- the round interface ------------------------------------------------------------------
    def reset(self) -> None:
        super().reset()
        self._reset_estimates()

    def finish(self) -> None:
        """The generation ended: fold what it measured into the calibration cache."""
        cal = self.calibration
        if cal is None:
            return
        med = self._medians()
        t1 = self.measured(1, medians=med)
        if t1:
            cal.t1 = t1
            for n in self.times:
                tn = self.measured(n, medians=med)
                if n > 1 and tn:
                    cal.ratios[n] = tn / t1
        rows = cal.acceptance.setdefault(self.name, [])
        rows.extend([0.0, 0.0] for _ in range(len(self.acc) - len(rows)))
        for i, (a, t) in enumerate(self.acc):
            rows[i] = [a, t]
        if self.by_reach:
            top = max(self.by_reach) + 1
            cal.acceptance[self.name + REACH_KEY] = [list(self.by_reach.get(c, [0.0, 0.0])) for c in range(top)]
        if self.draft_token_s is not None:
            cal.draft_token_s[self.name] = self.draft_token_s
        cal.save()

    # -- the choice ---------------------------------------------------------------------------
    def _medians(self) -> dict[int, tuple[float, int]]:
        """``n -> (median, count)`` of the target's last forwards over ``n`` tokens (one snapshot for
        a table of costs, which reads each several times)."""
        return {n: (statistics.median(times), len(times)) for n, times in self.times.items() if times}

    def measured(self, n: int, least: int = 3, medians: dict | None = None) -> float | None:
        """The target's forward over ``n`` tokens: the median of the last ones, once there are ``least``."""
        med = (medians if medians is not None else self._medians()).get(n)
        return med[0] if med is not None and med[1] >= least else None

    def _ratio(self, n: int) -> float:
        return self.calibration.ratio(n) if self.calibration else prior_ratio(n)

    def excess_scale(self, medians: dict | None = None) -> float:
        """How much more (or less) the target's extra tokens cost in this generation than the cached
        ratios say: the mean over this generation's forwards over ``m > 1`` tokens of
        ``(T(m) / T(1) - 1) / (ratio(m) - 1)``, weighted by their count; 1 until one is measured.
        An extra token's cost grows with the context (its attention reads every cached key: at
        660 tokens of context a 2-token forward of the 4-bit target took 1.4-1.85x a one-token
        one where the cache, measured at ~60, said ~1.2x)."""
        med = medians if medians is not None else self._medians()
        t1 = self.measured(1, least=1, medians=med)
        if t1 is None:
            return 1.0
        num = den = 0.0
        for m, (tm, count) in med.items():
            r = self._ratio(m) - 1.0 if m > 1 else 0.0
            if r > 1e-3:
                num += count * (tm / t1 - 1.0) / r
                den += count
        return min(max(num / den, SCALE_RANGE[0]), SCALE_RANGE[1]) if den else 1.0

    def target_cost(self, n: int, scale: float | None = None, medians: dict | None = None) -> float:
        """``T(n)``: measured in this generation (the median of its last forwards over ``n``), else
        ``T(1)`` times the cached ratio's excess over 1 scaled by :meth:`excess_scale` (``scale``:
        its value, where the caller has it)."""
        med = medians if medians is not None else self._medians()
        tn = self.measured(n, medians=med)
        if tn is not None:
            return tn
        t1 = self.measured(1, least=1, medians=med) or self.t1_prior
        if t1 is None:  # nothing measured yet: in units of T(1)
            t1 = 1.0
        if n <= 1:
            return t1
        return t1 * (1.0 + (self.excess_scale(med) if scale is None else scale) * (self._ratio(n) - 1.0))

    def acceptances(self, k: int) -> list[float]:
        """Posterior means of positions ``0..k-1``'s acceptance, each given the positions before it
        were accepted; position ``i``'s prior mean is position ``i - 1``'s estimate. For a proposal
        whose tokens' reach classes are known: each class's posterior mean."""
        if self.kinds is not None:
            return [self._class_acceptance(c) for c in self.kinds[:k]]
        weight = PRIOR_ACCEPT[0] + PRIOR_ACCEPT[1]
        out, prior = [], PRIOR_ACCEPT[0] / weight
        for a, t in self.acc[:k]:
            prior = (a + weight * prior) / (t + weight)
            out.append(prior)
        return out

    def _class_acceptance(self, kind: int) -> float:
        """Posterior mean of the acceptance of a token of reach class ``kind``."""
        a, t = self.by_reach.get(kind, (0.0, 0.0))
        return (a + PRIOR_ACCEPT[0]) / (t + PRIOR_ACCEPT[0] + PRIOR_ACCEPT[1])

    def acceptance(self, i: int) -> float:
        """Posterior mean of position ``i``'s acceptance, given the positions before it were accepted."""
        return self.acceptances(i + 1)[i]

    def _cost_table(self) -> list[float]:
        """``T(1..k + 1)`` from one snapshot of the timings (kept for ``TABLE_EVERY`` rounds), and with
        it the least first-token acceptance ``p`` for which a lookup's round of any ``k > 0`` can beat
        plain decoding: a round's expected tokens are at most ``1 + k p`` (each later token survives
        only if the first does), so below ``min_k (T(k + 1) / T(1) - 1) / k`` no ``k`` pays."""
        if self._costs is None:
            med = self._medians()
            scale = self.excess_scale(med)
            self._costs = costs = [self.target_cost(n, scale, med) for n in range(1, self.k + 2)]
            self._least = min(((costs[k] / costs[0] - 1.0) / k for k in range(1, self.k + 1)), default=0.0)
            self._age = 0
        return self._costs

    def _rates(self, most: int) -> list[float]:
        """Expected tokens per second of rounds verifying ``0..most`` drafted tokens (one pass over the
        acceptances for all of them)."""
        costs = self._cost_table()
        per_token = 0.0 if self.lookup else (self.draft_token_s or 0.0)
        rates, tokens, survive = [], 1.0, 1.0
        accs = self.acceptances(most)
        for k in range(most + 1):
            if k:
                survive *= accs[k - 1]
                tokens += survive
            rates.append(tokens / (k * per_token + costs[k]))
        return rates

    def expected_rate(self, k: int) -> float:
        """Expected tokens per second of a round verifying ``k`` drafted tokens."""
        return self._rates(k)[k]

    def choose(self, most: int) -> int:
        """The ``k`` in ``0..most`` of the highest expected rate (the smallest of equals); one token
        now and then after long idling."""
        rates = self._rates(most)
        best = max(range(most + 1), key=lambda k: (rates[k], -k))
        return self._probe(most) if best == 0 else best

    def _probe(self, most: int) -> int:
        """Plain decoding was chosen: 1 if this round verifies one token anyway (a probe), else 0."""
        self.probing = most > 0 and self.idle >= self.probe_after
        return 1 if self.probing else 0

    def _first_cannot_pay(self, kind: int) -> bool:
        """A lookup proposal whose first token comes from reach class ``kind``: whether its acceptance
        is too low for any ``k > 0`` to beat plain decoding (the bound of :meth:`_cost_table`, so
        the choice is the one :meth:`choose` makes, without reading the rest of the proposal)."""
        self._cost_table()
        return self._class_acceptance(kind) <= self._least

    # -- one round ----------------------------------------------------------------------------
    def propose(self, ids, budget, params, generator) -> Proposal:
        most = min(self.k, budget)
        if most <= 0:
            return Proposal([], None, max(most, 0))
        draft: list[int] = []
        q = None
        t1 = time.perf_counter()
        if self.lookup:  # propose, then choose among the proposal
            k = None
            if hasattr(self.source, "kinds"):  # its first token first: often it settles the round
                draft, q = draft_tokens(self.source, ids, 1, params, generator)
                first = self.source.kinds
                if not draft:  # nothing to verify
                    k = self._probe(0)
                elif len(first) == 1 and self._first_cannot_pay(reach_class(first[0])):
                    k, self.kinds = self._probe(most), [reach_class(first[0])]
            if k is None:  # the whole proposal, and the choice among it
                draft, q = draft_tokens(self.source, ids, most, params, generator)
                kinds = getattr(self.source, "kinds", None)
                self.kinds = [reach_class(r) for r in kinds] if kinds is not None and len(kinds) == len(draft) else None
                k = self.choose(len(draft))
            draft, q = draft[:k], (q[:k] if q is not None else None)
        else:  # choose, then draft that many
            k = self.choose(most)
            if k:
                draft, q = draft_tokens(self.source, ids, k, params, generator)
        draft_s = time.perf_counter() - t1
        if draft and not self.lookup:
            per = draft_s / len(draft)
            self.draft_token_s = per if self.draft_token_s is None else (1 - EMA) * self.draft_token_s + EMA * per
        return Proposal(draft, q, most, draft_s)

    def settle(self, proposal: Proposal, accepted: int, verify_s: float) -> None:
        self._learn(len(proposal.tokens), accepted, verify_s)
        super().settle(proposal, accepted, verify_s)

    def _learn(self, k: int, accepted: int, verify_s: float) -> None:
        times = self.times.get(k + 1)
        if times is None:
            times = self.times[k + 1] = deque(maxlen=TIMINGS)
        times.append(verify_s)
        self._age += 1
        if self._age >= TABLE_EVERY or len(times) <= 3:  # stale, or T(k + 1) was not measured before
            self._costs = None
        for i in range(min(k, accepted + 1)):  # positions tried: up to the first rejection
            self.acc[i][1] += 1
            self.acc[i][0] += i < accepted
            if self.kinds is not None:
                row = self.by_reach.setdefault(self.kinds[i], [0.0, 0.0])
                row[1] += 1
                row[0] += i < accepted
        self.kinds = None
        self.idle = 0 if k else self.idle + 1
        if self.probing:
            self.probe_after = PROBE_EVERY if accepted else min(2 * self.probe_after, PROBE_MOST)
            self.probing = False
