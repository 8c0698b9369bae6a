"""The generate loop shared by every method, its statistics, stop handling and streamed text.

The loop prefills the target, then runs *rounds* until enough tokens are out: a round
(``cascade.ChainRound`` or ``cascade.TreeRound``) drafts, lets the target verify in one
forward, and returns a :class:`~.cascade.RoundResult`: the accepted tokens plus one
recovered/bonus token, and what it drafted. The loop alone writes :class:`GenerationStats`;
each stage alone writes its own :class:`~.stages.base.StageStats`. Plain autoregressive
decoding is a chain round without a drafter.
"""

from __future__ import annotations

import contextlib
import gc
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from .cascade import ChainRound, Round, RoundResult
from .errors import CascadeError
from .sampling import SamplingParams
from .stages.base import StageStats
from .stages.neural import ModelStage


@dataclass
class GenerationStats:
    """Per-call statistics. ``mean_accepted_length`` counts the recovered/bonus token."""

    prompt_tokens: int = 0
    new_tokens: int = 0
    rounds: int = 0  # target forwards after the prefill
    drafted: int = 0  # draft tokens proposed
    accepted: int = 0  # draft tokens accepted
    accepted_by_position: list[int] = field(default_factory=list)  # accepted[i]: drafts at position i accepted
    drafted_by_position: list[int] = field(default_factory=list)
    budgeted_by_position: list[int] = field(default_factory=list)  # rounds whose token budget allowed position i
    rounds_by_draft_length: list[int] = field(default_factory=list)  # [k]: rounds that verified k drafted tokens
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    stop_reason: str = ""
    stages: list[StageStats] = field(default_factory=list)  # drafting stages, smallest first, then the target

    def record(self, res: RoundResult) -> None:
        """One round: ``res.drafted`` positions verified, ``res.accepted`` of them accepted, out of
        ``res.budget`` the round could have drafted (a drafter may propose fewer)."""
        positions, accepted = res.drafted, res.accepted
        budget = max(positions, res.budget)
        self.rounds_by_draft_length.extend([0] * (positions + 1 - len(self.rounds_by_draft_length)))
        self.rounds_by_draft_length[positions] += 1
        self.draft_s += res.draft_s
        self.verify_s += res.verify_s
        self.rounds += 1
        self.drafted += positions
        self.accepted += accepted
        for counts in (self.drafted_by_position, self.accepted_by_position, self.budgeted_by_position):
            counts.extend([0] * (budget - len(counts)))
        for i in range(budget):
            self.budgeted_by_position[i] += 1
            self.drafted_by_position[i] += i < positions
            self.accepted_by_position[i] += i < accepted

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    @property
    def rounds_without_drafting(self) -> float:
        """Share of the rounds that verified no drafted token (plain decoding steps)."""
        return self.rounds_by_draft_length[0] / self.rounds if self.rounds and self.rounds_by_draft_length else 0.0

    @property
    def mean_accepted_length(self) -> float:
        return self.new_tokens / self.rounds if self.rounds else 0.0

    @property
    def tokens_per_s(self) -> float:
        """New tokens per second of decoding (prefill excluded)."""
        t = self.total_s - self.prefill_s
        return self.new_tokens / t if t > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["stages"] = [s.to_dict() for s in self.stages]
        d.update(
            acceptance_rate=self.acceptance_rate,
            mean_accepted_length=self.mean_accepted_length,
            rounds_without_drafting=self.rounds_without_drafting,
            tokens_per_s=self.tokens_per_s,
        )
        return d


def eos_ids(model, tokenizer=None) -> set[int]:
    """End-of-sequence ids: the model config's and the tokenizer's."""
    ids = set(getattr(model, "eos_token_ids", ()) or ())
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    return ids


def check_context(prompt_len: int, max_new_tokens: int, k: int, max_len: int) -> None:
    if prompt_len == 0:
        raise CascadeError("the prompt is empty")
    if max_new_tokens < 1:
        raise CascadeError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    need = prompt_len + max_new_tokens + k + 1
    if need > max_len:
        raise CascadeError(
            f"prompt ({prompt_len} tokens) + max_new_tokens ({max_new_tokens}) + draft room ({k + 1}) "
            f"= {need} exceeds the context limit of {max_len} tokens"
        )


class StopChecker:
    """EOS ids and stop strings; ``stop_strings`` need a ``decode`` function."""

    def __init__(self, eos_ids, stop_strings=(), decode: Callable[[list[int]], str] | None = None) -> None:
        self.eos = set(eos_ids or ())
        self.stop_strings = [s for s in (stop_strings or ()) if s]
        if self.stop_strings and decode is None:
            raise CascadeError("stop strings need a tokenizer")
        self.decode: Callable[[list[int]], str] = decode or (lambda ids: "")

    def cut(self, generated: list[int], start: int) -> tuple[int, str] | None:
        """If a stop occurs in ``generated[start:]``, return (length to keep, reason).

        An EOS token is dropped; a stop string is kept, as transformers does."""
        found = None
        for i in range(start, len(generated)):
            if generated[i] in self.eos:
                found = (i, "eos")
                break
        end = found[0] if found else len(generated)
        if self.stop_strings and any(s in self.decode(generated[:end]) for s in self.stop_strings):
            for n in range(max(start, 1), end + 1):  # the shortest prefix reaching a stop string
                if any(s in self.decode(generated[:n]) for s in self.stop_strings):
                    return n, "stop_string"
        return found


class TextStream:
    """The text of a growing list of token ids, handed out in pieces that never need taking back:
    incomplete UTF-8 and anything that may still become a stop string are held back, and the
    text ends before the first stop string (OpenAI leaves it out)."""

    def __init__(self, tokenizer, stops: list[str]) -> None:
        self.tokenizer, self.stops = tokenizer, stops
        self.ids: list[int] = []
        self.sent = 0
        self.hold = max((len(s) for s in stops), default=1) - 1

    def text(self) -> str:
        t = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        cuts = [i for i in (t.find(s) for s in self.stops) if i >= 0]
        return t[: min(cuts)] if cuts else t

    def feed(self, ids: list[int]) -> str:
        self.ids.extend(ids)
        t = self.text()
        if t.endswith("\ufffd"):
            return ""
        end = max(self.sent, len(t) - self.hold)
        piece, self.sent = t[self.sent : end], end
        return piece

    def finish(self) -> str:
        t = self.text()
        piece, self.sent = t[self.sent :], max(self.sent, len(t))
        return piece


class Decoder:
    """One sequence's decoding, a round at a time: the state of :func:`generate_tokens`'s loop.

    ``start()`` prefills the target; then, until ``done``, a round over ``ids`` with ``budget``
    is run (``round.run``, or several sequences' chain rounds sharing one target forward, see
    ``serve/batching.py``) and its result handed to :meth:`absorb`; ``finish()`` returns the
    new token ids and the statistics."""

    def __init__(
        self,
        target: ModelStage,
        prompt_ids: list[int],
        round: Round | None = None,
        *,
        max_new_tokens: int = 128,
        params: SamplingParams = SamplingParams(),
        stop: StopChecker | None = None,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> None:
        self.round = round if round is not None else ChainRound()
        check_context(len(prompt_ids), max_new_tokens, self.round.room - 1, target.max_len)
        self.target, self.params, self.max_new_tokens, self.on_tokens = target, params, max_new_tokens, on_tokens
        self.stop = stop or StopChecker(getattr(target.model, "eos_token_ids", ()))
        self.generator = None
        if not params.greedy:
            seed = params.seed if params.seed is not None else torch.seed()
            self.generator = torch.Generator().manual_seed(seed)
        self.stats = GenerationStats(prompt_tokens=len(prompt_ids))
        self.ids = list(prompt_ids)
        self.out: list[int] = []
        self.done = False
        self._t0 = 0.0

    def start(self, prefill: bool = True) -> None:
        """Prefill: the whole prompt but its last token, which every round feeds first.

        ``prefill=False``: the caller feeds ``prefill_ids`` into the target's cache itself (several
        sequences in one forward) and then calls :meth:`prefilled`."""
        self._t0 = time.perf_counter()
        self.target.reset()
        self.round.reset()
        if prefill:
            if self.prefill_ids:
                self.target.prefill(self.prefill_ids)
            self.prefilled()

    @property
    def prefill_ids(self) -> list[int]:
        return self.ids[:-1]

    def prefilled(self) -> None:
        """The target's cache holds :attr:`prefill_ids`."""
        if len(self.ids) > 1:
            self.round.after_prefill(self.target, len(self.ids) - 1)
        self.stats.prefill_s = time.perf_counter() - self._t0

    @property
    def budget(self) -> int:
        """Most positions the next round may draft (its recovered/bonus token is one more)."""
        return self.max_new_tokens - len(self.out) - 1

    def step(self) -> list[int]:
        """One round on this sequence alone; returns the tokens it made final."""
        return self.absorb(self.round.run(self.target, self.ids, self.budget, self.params, self.generator))

    def absorb(self, res: RoundResult) -> list[int]:
        """Record a round's result, fix up the caches, apply stops; return the tokens made final."""
        self.stats.record(res)
        new = res.tokens
        start = len(self.out)
        self.out.extend(new)
        self.ids.extend(new)
        # The target saw ids up to the last accepted draft; its cache keeps exactly that.
        self.target.commit(len(self.ids) - 1)
        self.round.commit(len(self.ids) - 1)
        cut = self.stop.cut(self.out, start)
        if cut is not None:
            keep, self.stats.stop_reason = cut
            del self.out[keep:]
            self.done = True
        elif len(self.out) >= self.max_new_tokens:
            del self.out[self.max_new_tokens :]
            self.stats.stop_reason = "length"
            self.done = True
        final = self.out[start:]
        if self.on_tokens and final:
            self.on_tokens(final)
        return final

    def finish(self) -> tuple[list[int], GenerationStats]:
        self.stats.new_tokens = len(self.out)
        self.stats.total_s = time.perf_counter() - self._t0
        self.stats.stages = self.round.stage_stats() + [self.target.stats]
        self.round.finish()
        return self.out, self.stats


def generate_tokens(
    target: ModelStage,
    prompt_ids: list[int],
    *,
    round: Round | None = None,
    max_new_tokens: int = 128,
    params: SamplingParams = SamplingParams(),
    stop: StopChecker | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> tuple[list[int], GenerationStats]:
    """Generate up to ``max_new_tokens`` after ``prompt_ids``; return (new token ids, stats).

    ``target``: the target model with its KV cache (its size bounds prompt + new tokens + draft
    room); ``round``: a :class:`~.cascade.ChainRound` or :class:`~.cascade.TreeRound` (None:
    autoregressive decoding). ``on_tokens`` receives the new tokens of every round as they are final.
    """
    dec = Decoder(target, prompt_ids, round, max_new_tokens=max_new_tokens, params=params, stop=stop, on_tokens=on_tokens)
    with gc_paused():
        dec.start()
        while not dec.done:
            dec.step()
    return dec.finish()


@contextlib.contextmanager
def gc_paused():
    """Python's cyclic garbage collector off for the duration (as it was before, after): a decoding
    loop makes few cycles, and a collection walks every object of the loaded models (measured:
    ~6% of an INT8 draft's one-token forwards). Reference counting still frees everything else."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()
