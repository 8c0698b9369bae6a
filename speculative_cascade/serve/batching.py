"""Continuous batching of speculative rounds: many sequences, one target forward per round.

A scheduler thread owns the target. Each request is a :class:`~..decoding.Decoder` (its own
round, its own KV cache of the target, taken from a pool) and moves through

    waiting --(admitted at a round boundary, prefilled)--> running --(stop, length, cancel)--> done

Every round, each running sequence's chain round proposes its draft (MaG's lookup, or a neural
draft's own forwards), then *one* target forward scores every sequence's last token and draft
(``stages.neural.score_batch``: each weight is read once for all of them), then each sequence
accepts its own prefix (ragged acceptance: its own cursor) and settles. A sequence whose round
is a tree runs its round by itself. With the C kernels a token's logits do not depend on what
it was batched with, so each sequence's greedy output equals its output alone.

The adaptive round (``adaptive.py``) is told its share of the batch's forward,
``T_batch * (k + 1) / tokens in the batch``: as the batch grows, verification stops being free
and the round's ``k`` shrinks (see docs/serving.md).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from ..builder import build_round
from ..cascade import ChainRound, Proposal, Round, accept, verify_chain
from ..config import CascadeConfig
from ..decoding import Decoder, GenerationStats, StopChecker, check_context, eos_ids
from ..engine import kernels
from ..errors import CascadeError
from ..sampling import SamplingParams
from ..stages.neural import ModelStage, prefill_batch, score_batch


PREFILL_TOKENS = 2048  # most prompt tokens prefilled in one forward (bounds its scratch memory)


class QueueFull(CascadeError):
    """The waiting queue is full; the client should retry later."""


class ShuttingDown(CascadeError):
    """The engine is draining and admits no new request."""


@dataclass
class Job:
    """One request: its prompt, settings, and where its tokens go.

    ``on_tokens(tokens)`` receives the final tokens of each round; ``on_done(stats, error)`` is
    called once, from the scheduler thread, when the job ends (``error`` is None, or the
    exception that ended it). Both must be quick (they hand over to another thread)."""

    prompt_ids: list[int]
    params: SamplingParams
    max_new_tokens: int
    round: Round
    stop: StopChecker
    on_tokens: Callable[[list[int]], None]
    on_done: Callable[[GenerationStats | None, BaseException | None], None]
    cancelled: bool = False
    queued_at: float = field(default_factory=time.perf_counter)
    admitted: bool = False  # it got a row and was prefilled
    first_token_at: float | None = None  # when its first token was final (metrics)
    last_token_at: float | None = None

    def cancel(self) -> None:
        """Stop generating at the next round boundary and free the row (any thread)."""
        self.cancelled = True


class BatchEngine:
    """The scheduler: admits, prefills, and runs rounds of up to ``max_batch`` sequences at once.

    ``config``: the cascade every request runs unless it names its own (None: plain decoding).
    ``max_queue``: most requests waiting for a row; beyond it :meth:`submit` raises QueueFull.
    ``observer``: an object with the hooks of :class:`EngineObserver` (metrics); ``shared``: models
    already built for the target (a generator's ``shared_models``), reused instead of built again."""

    def __init__(
        self,
        target,
        tokenizer,
        config: CascadeConfig | None,
        *,
        max_len: int = 2048,
        max_batch: int = 16,
        max_queue: int = 256,
        observer: "EngineObserver | None" = None,
        shared: dict | None = None,
    ) -> None:
        if max_batch < 1:
            raise CascadeError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise CascadeError(f"max_queue must be >= 0, got {max_queue}")
        self.target, self.tokenizer, self.config = target, tokenizer, config
        self.max_len, self.max_batch, self.max_queue = max_len, max_batch, max_queue
        self.observer = observer or EngineObserver()
        self.eos = eos_ids(target, tokenizer)
        self._shared: dict = shared if shared is not None else {}  # models every request's round shares (the INT8 copy)
        self._pool: list[ModelStage] = []  # the target with a KV cache, one per row; reused
        self._waiting: deque[Job] = deque()
        self._running: list[Row] = []
        self._cv = threading.Condition()
        self._closing = False
        # The scheduler thread runs every forward from here on: this thread (which loaded the model)
        # hands its OpenMP workers back, or the runtime, seeing two pools on as many CPUs as one
        # needs, makes every barrier of a forward sleep (a lone request decoded at half speed).
        kernels.release_threads()
        self._thread = threading.Thread(target=self._loop, name="cascade-scheduler", daemon=True)
        self._thread.start()

    # -- requests --------------------------------------------------------------------------
    def make_round(self, config: CascadeConfig | None) -> Round:
        """A fresh round for one request (its stages' caches are its own; models are shared)."""
        rnd, _ = build_round(config, self.target, self.max_len, shared=self._shared, progress=False)
        kernels.release_threads()  # building a draft (an INT8 copy) ran parallel work in this thread: see __init__
        return rnd

    def check(self, prompt_len: int, max_new_tokens: int, rnd: Round) -> None:
        """Raise CascadeError if the request cannot fit the context."""
        check_context(prompt_len, max_new_tokens, rnd.room - 1, self.max_len)

    def submit(self, job: Job) -> None:
        """Queue ``job``; raises QueueFull or ShuttingDown instead of queueing it."""
        self.check(len(job.prompt_ids), job.max_new_tokens, job.round)
        with self._cv:
            if self._closing:
                raise ShuttingDown("the server is shutting down")
            free_rows = max(0, self.max_batch - len(self._running))
            if len(self._waiting) >= self.max_queue + free_rows:
                raise QueueFull(f"{len(self._waiting)} requests are waiting; retry later")
            self._waiting.append(job)
            self.observer.queued(job)
            self._cv.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return len(self._running)

    def drain(self, timeout: float | None = None) -> bool:
        """Refuse new requests and wait until every admitted one has ended; True if they all did."""
        with self._cv:
            self._closing = True
            self._cv.notify_all()
            end = None if timeout is None else time.monotonic() + timeout
            while self._waiting or self._running:
                left = None if end is None else end - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
        return True

    # -- the scheduler thread ------------------------------------------------------------------
    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._waiting and not self._running:
                    self._cv.wait()
                admitted: list[Job] = []
                while self._waiting and len(self._running) + len(admitted) < self.max_batch:
                    admitted.append(self._waiting.popleft())
            try:
                self._admit(admitted)
                self._step()
            except Exception as e:  # noqa: BLE001 - a bug outside one request's guard: end what runs, keep serving
                for r in list(self._running):
                    self._end(r.job, e, r)
            with self._cv:
                self._cv.notify_all()  # drain() waits on the counts

    def _admit(self, jobs: list[Job]) -> None:
        """Give each new job a row (a pooled cache) and prefill them, PREFILL_TOKENS at most per forward."""
        group: list[Row] = []
        for job in jobs:
            if job.cancelled:
                self._end(job, None)
                continue
            stage = self._pool.pop() if self._pool else ModelStage(self.target, self.max_len, name="target")
            try:
                decoder = Decoder(
                    stage,
                    job.prompt_ids,
                    job.round,
                    max_new_tokens=job.max_new_tokens,
                    params=job.params,
                    stop=job.stop,
                    on_tokens=job.on_tokens,
                )
                decoder.start(prefill=False)
            except Exception as e:  # noqa: BLE001 - one request's failure ends that request only
                self._pool.append(stage)
                self._end(job, e)
                continue
            row = Row(job, stage, decoder)
            if group and sum(len(r.decoder.prefill_ids) for r in group) + len(decoder.prefill_ids) > PREFILL_TOKENS:
                self._prefill(group)
                group = []
            group.append(row)
        if group:
            self._prefill(group)

    def _prefill(self, rows: list[Row]) -> None:
        try:
            prefill_batch([r.stage for r in rows], [r.decoder.prefill_ids for r in rows])
        except Exception as e:  # noqa: BLE001 - the shared forward failed: end these requests, keep serving
            for r in rows:
                self._end(r.job, e, r)
            return
        for r in rows:
            if self._guard(r, r.decoder.prefilled):
                r.job.admitted = True
                self.observer.started(r.job)
                self._running.append(r)

    def _step(self) -> None:
        live: list[Row] = []
        for r in list(self._running):
            if r.job.cancelled:
                self._end(r.job, None, r)
            else:
                live.append(r)
        chain: list[tuple[Row, ChainRound]] = []
        for r in live:
            if isinstance(r.job.round, ChainRound):
                chain.append((r, r.job.round))
            else:  # a tree round verifies by itself
                self._guard(r, r.decoder.step)
        if chain:
            self._chain_step(chain)
        for r in live:
            if r.decoder.done and r in self._running:
                self._end(r.job, None, r)

    def _guard(self, row: Row, fn: Callable[[], object]) -> bool:
        """Run one request's step; if it raises, end that request only."""
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - one request's failure ends that request only
            self._end(row.job, e, row)
            return False

    def _chain_step(self, rows: list[tuple[Row, ChainRound]]) -> None:
        """One round of every chain sequence, their target forwards fused into one."""
        props: dict[int, Proposal] = {}
        for r, rnd in rows:
            d = r.decoder
            self._guard(r, lambda: props.__setitem__(id(r), rnd.propose(d.ids, d.budget, d.params, d.generator)))
        rows = [(r, rnd) for r, rnd in rows if id(r) in props]
        if not rows:
            return
        t0 = time.perf_counter()
        review: tuple[int, int] | None = None  # alone: its review
        logits: list = [None]  # each sequence's scores (alone: none)
        try:
            if len(rows) == 1:  # alone: its round as a decoding loop runs it (greedy, nothing drafted: one kernel call)
                alone = rows[0][0]
                d, prop = alone.decoder, props[id(alone)]
                review = verify_chain(alone.stage, d.ids, prop.tokens, prop.q, d.params, d.generator)
            else:
                logits = score_batch(
                    [r.stage for r, _ in rows], [r.decoder.ids for r, _ in rows], [props[id(r)].tokens for r, _ in rows]
                )
        except Exception as e:  # noqa: BLE001 - the shared forward failed: end these requests, keep serving
            for r, _ in rows:
                self._end(r.job, e, r)
            return
        elapsed = time.perf_counter() - t0
        total = sum(len(props[id(r)].tokens) + 1 for r, _ in rows)
        self.observer.forward(len(rows), total, elapsed)
        for (r, rnd), lg in zip(rows, logits):
            prop = props[id(r)]
            share = elapsed * (len(prop.tokens) + 1) / total  # this sequence's part of the shared forward

            def finish_round(r=r, rnd=rnd, prop=prop, lg=lg, share=share) -> None:
                d = r.decoder
                n, nxt = review if review is not None else accept(prop.tokens, lg, prop.q, d.params, d.generator)
                rnd.settle(prop, n, share)
                res = prop.result(n, nxt, share)
                self.observer.round(r.job, res)
                d.absorb(res)

            self._guard(r, finish_round)

    def _end(self, job: Job, error: BaseException | None, row: Row | None = None) -> None:
        stats = None
        if row is not None:
            if row in self._running:
                self._running.remove(row)
            self._pool.append(row.stage)
            if error is None:
                try:
                    _, stats = row.decoder.finish()
                except Exception as e:  # noqa: BLE001 - reported to this request only
                    error = e
        self.observer.ended(job, stats, error)
        try:
            job.on_done(stats, error)
        except Exception:  # noqa: BLE001 - a broken callback must not stop the scheduler
            pass


@dataclass
class Row:
    """A running request: its job, the target stage holding its KV cache, and its decoding state."""

    job: Job
    stage: ModelStage
    decoder: Decoder


class EngineObserver:
    """Hooks the engine calls from its thread (metrics implement them); each must be quick."""

    def queued(self, job: Job) -> None: ...

    def started(self, job: Job) -> None: ...

    def forward(self, sequences: int, tokens: int, seconds: float) -> None: ...

    def round(self, job: Job, res) -> None: ...

    def ended(self, job: Job, stats: GenerationStats | None, error: BaseException | None) -> None: ...
