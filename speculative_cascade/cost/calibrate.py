"""Short measurements that calibrate the cost model on this machine.

* :func:`measure_forward_cost` - ``t(n, L)`` of a model stage, timed directly;
* :func:`profile_round` - what one configuration's rounds cost and yield, from a few
  generations on calibration prompts (:class:`RoundProfile`), and its prediction at any
  ``k``, context length and generation length.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

from ..cascade import Round, TreeRound
from ..decoding import GenerationStats, StopChecker, generate_tokens
from ..errors import CascadeError
from ..stages.base import Reviewer
from ..stages.neural import ModelStage
from .analytic import Acceptance, ForwardCost, at_context, generation_rate


def measure_forward_cost(
    stage: Reviewer, context: list[int], ns=(1, 2, 3, 5, 9, 17), reps: int = 7, long_context: list[int] | None = None
) -> ForwardCost:
    """``t(n)`` of a :class:`~..stages.neural.ModelStage` (or any stage with ``score``): the median of
    ``reps`` forwards over ``n`` new tokens after ``context`` (cached once, rolled back each time).
    With ``long_context``, also measured after it: the difference per context token is the slope."""

    def at(ctx: list[int]) -> dict[int, float]:
        stage.score(ctx[:-1], [])  # the context is in the cache; every timed call rolls back to it
        filler = ctx[-1:]
        times: dict[int, list[float]] = {n: [] for n in ns}
        for _ in range(reps):  # interleaved, so drifts of the machine hit every n alike
            for n in ns:
                times[n].append(_one_token(stage, ctx) if n == 1 else _timed(stage, ctx, filler * (n - 1)))
        return {n: statistics.median(v) for n, v in times.items()}

    short = at(context)
    slope = ()
    if long_context is not None and len(long_context) > len(context):
        long = at(long_context)
        extra = len(long_context) - len(context)
        slope = tuple((n, max(long[n] - short[n], 0.0) / extra) for n in ns)
    return ForwardCost(getattr(stage, "name", "stage"), tuple(short.items()), len(context), slope)


def _timed(stage: Reviewer, ctx: list[int], draft: list[int]) -> float:
    t0 = time.perf_counter()
    stage.score(ctx, draft)
    return time.perf_counter() - t0


def _one_token(stage: Reviewer, ctx: list[int]) -> float:
    """A one-token forward after ``ctx`` as a greedy round without drafts runs it: the stage's one-token
    step where it has one (``greedy_next``), else ``score``."""
    step, commit = getattr(stage, "greedy_next", None), getattr(stage, "commit", None)
    if step is not None and commit is not None:
        commit(len(ctx) - 1)  # the cache holds ctx[:-1]: what the step starts from
    t0 = time.perf_counter()
    if step is None or commit is None or step(ctx) is None:
        stage.score(ctx, [])
    return time.perf_counter() - t0


def measure_target_cost(
    target_stage: ModelStage, prompts: list[list[int]], max_len: int, short: int = 64, long: int = 768
) -> ForwardCost:
    """The target's ``t(n, L)`` for the cost model: ``n`` up to 17, at a ``short`` and a ``long`` context
    (token ids taken from the prompts; what they say does not change the cost)."""
    pool = [t for ids in prompts for t in ids] or [0]
    long = min(long, max_len - 32)
    ids = (pool * (long // len(pool) + 1))[:long]
    return measure_forward_cost(target_stage, ids[:short], ns=(1, 2, 3, 5, 9, 13, 17), reps=5, long_context=ids)


@dataclass
class RoundProfile:
    """One configuration's rounds on this machine, measured on calibration prompts.

    The prediction (:meth:`predict`) is the closed form of ``model.py``: a round drafts
    ``m(k)`` tokens at ``token_cost`` each (tree: the measured drafting time per round), the
    target verifies them in one forward ``t_T(m(k) + 1, L)``, the loop adds ``overhead``; it
    yields ``E(k) = 1 + sum_{i<k} P_i`` tokens. Forwards of self-drafts (INT8/4-bit copies,
    the same attention as the target) grow with the context as the target's do."""

    name: str
    tree: bool
    k: int  # positions a full round may draft (tree: its node budget)
    accept: Acceptance  # P_i: positions 0..i drafted and accepted by the target (tree: path depth)
    drafts: Acceptance  # D_i: position i drafted (a drafter may propose fewer than k)
    token_cost: float  # drafting seconds per drafted token
    draft_per_round: float
    verify_per_round: float
    overhead: float  # seconds per round outside drafting and verification
    context_forwards: float  # per drafted token (tree: per round): forwards whose cost grows with the context
    context_tokens: float  # tokens per such forward
    context: float  # mean context length while decoding
    new_tokens: float  # mean new tokens per prompt
    measured_tokens_per_s: float  # decode speed of the calibration runs
    target_cost: ForwardCost  # the target's t(n, L), scaled to match the verification inside the loop

    def drafted(self, k: int) -> float:
        """``m(k)``: tokens a full round of ``k`` drafts on average."""
        return sum(self.drafts._p(i) for i in range(k))

    def predict(self, k: int | None = None, context: float | None = None, new_tokens: float | None = None) -> dict:
        """Predicted decode tokens/s (and its parts) at ``k`` drafted positions per round, a mean
        context of ``context`` tokens and generations of ``new_tokens`` tokens (defaults: as calibrated)."""
        k = self.k if k is None or self.tree else k
        context = self.context if context is None else context
        new_tokens = self.new_tokens if new_tokens is None else new_tokens
        slope = self.target_cost.slope_at(self.context_tokens)
        if self.tree:
            draft = at_context(self.draft_per_round, self.context_forwards * slope, context, self.context)
            verify = at_context(self.verify_per_round, slope, context, self.context)
        else:
            m = self.drafted(k)
            draft = m * at_context(self.token_cost, self.context_forwards * slope, context, self.context)
            verify = self.target_cost(m + 1, context)
        tokens = self.accept.expected_tokens(k)
        round_s = draft + verify + self.overhead
        return {
            "tokens_per_s": generation_rate(tokens, round_s, new_tokens),
            "tokens_per_round": tokens,
            "round_s": round_s,
            "draft_s": draft,
            "verify_s": verify,
            "overhead_s": self.overhead,
        }


@dataclass
class _Totals:
    """Sums over the calibration generations of one configuration."""

    draft_s: float = 0.0
    verify_s: float = 0.0
    other_s: float = 0.0  # decoding time outside drafting and verification
    decode_s: float = 0.0
    drafted: int = 0
    rounds: int = 0
    new_tokens: int = 0
    context: float = 0.0  # sum over rounds of the context length
    context_forwards: int = 0  # forwards of drafting stages that attend over the context
    context_tokens: int = 0  # tokens fed to those forwards

    def add(self, st: GenerationStats, prompt_len: int) -> None:
        decode = st.total_s - st.prefill_s
        self.draft_s += st.draft_s
        self.verify_s += st.verify_s
        self.other_s += decode - st.draft_s - st.verify_s
        self.decode_s += decode
        self.drafted += st.drafted
        self.rounds += st.rounds
        self.new_tokens += st.new_tokens
        self.context += st.rounds * (prompt_len + st.new_tokens / 2)
        for s in st.stages[:-1]:  # the drafting stages (the last is the target)
            if s.attends:
                self.context_forwards += s.forwards
                self.context_tokens += s.tokens_in


class RoundProfiler:
    """Profiles one configuration's rounds a generation at a time (so that its calibration
    generations can take turns with other work); :meth:`result` summarises them.

    ``target_cost``: the target's standalone ``t(n, L)``; it is scaled so that it matches the
    verification time measured here."""

    def __init__(self, name: str, rnd: Round, target_cost: ForwardCost) -> None:
        self.name, self.rnd, self.target_cost = name, rnd, target_cost
        self.tree = isinstance(rnd, TreeRound)
        k = rnd.k
        self.acc, self.dr, self.bud = [0] * k, [0] * k, [0] * k
        self.tot = _Totals()
        self.prompts = 0

    def run(self, target_stage: ModelStage, ids: list[int], *, max_new_tokens: int = 48, eos=()) -> None:
        """One calibration generation of ``max_new_tokens`` tokens after ``ids``."""
        _, st = generate_tokens(target_stage, ids, round=self.rnd, max_new_tokens=max_new_tokens, stop=StopChecker(eos))
        for i in range(min(self.rnd.k, len(st.budgeted_by_position))):
            self.acc[i] += st.accepted_by_position[i]
            self.dr[i] += st.drafted_by_position[i]
            self.bud[i] += st.budgeted_by_position[i]
        self.tot.add(st, len(ids))
        self.prompts += 1

    def result(self) -> RoundProfile:
        tot, tree = self.tot, self.tree
        if not tot.rounds or not tot.decode_s:
            raise CascadeError(f"calibration of {self.name} generated nothing")
        context = tot.context / tot.rounds
        per_round_verify = tot.verify_s / tot.rounds
        mean_verified = tot.drafted / tot.rounds + 1
        # tree-masked forwards take another code path: their time per round is used as measured
        scale = 1.0 if tree else per_round_verify / max(self.target_cost(mean_verified, context), 1e-9)
        unit = tot.rounds if tree else max(tot.drafted, 1)
        return RoundProfile(
            name=self.name,
            tree=tree,
            k=self.rnd.k,
            accept=Acceptance.from_counts(self.acc, self.bud),
            drafts=Acceptance.from_counts(self.dr, self.bud),
            token_cost=tot.draft_s / max(tot.drafted, 1),
            draft_per_round=tot.draft_s / tot.rounds,
            verify_per_round=per_round_verify,
            overhead=tot.other_s / tot.rounds,
            context_forwards=tot.context_forwards / unit,
            context_tokens=tot.context_tokens / tot.context_forwards if tot.context_forwards else 1.0,
            context=context,
            new_tokens=tot.new_tokens / max(self.prompts, 1),
            measured_tokens_per_s=tot.new_tokens / tot.decode_s,
            target_cost=self.target_cost.scaled(scale),
        )


def profile_round(
    name: str,
    rnd: Round,
    target_stage: ModelStage,
    prompts: list[list[int]],
    target_cost: ForwardCost,
    *,
    max_new_tokens: int = 48,
    eos=(),
) -> RoundProfile:
    """Run ``rnd`` (a chain or tree round) on ``prompts`` and summarise its rounds (:class:`RoundProfiler`)."""
    profiler = RoundProfiler(name, rnd, target_cost)
    for ids in prompts:
        profiler.run(target_stage, ids, max_new_tokens=max_new_tokens, eos=eos)
    return profiler.result()
