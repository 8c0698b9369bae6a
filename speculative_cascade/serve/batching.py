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
from ..cascade import ChainRound, Round, accept
from ..config import CascadeConfig
from ..decoding import Decoder, GenerationStats, StopChecker, check_context, eos_ids
from ..errors import CascadeError
from ..sampling import SamplingParams
from ..stages.neural import ModelStage, score_batch


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
    decoder: Decoder | None = None
    stage: ModelStage | None = None
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
    ``observer``: an object with the hooks of :class:`EngineObserver` (metrics)."""

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
    ) -> None:
        if max_batch < 1:
            raise CascadeError(f"max_batch must be >= 1, got {max_batch}")
        if max_queue < 0:
            raise CascadeError(f"max_queue must be >= 0, got {max_queue}")
        self.target, self.tokenizer, self.config = target, tokenizer, config
        self.max_len, self.max_batch, self.max_queue = max_len, max_batch, max_queue
        self.observer = observer or EngineObserver()
        self.eos = eos_ids(target, tokenizer)
        self._shared: dict = {}  # models shared by every request's round (the INT8 copy)
        self._pool: list[ModelStage] = []  # the target with a KV cache, one per row; reused
        self._waiting: deque[Job] = deque()
        self._running: list[Job] = []
        self._cv = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._loop, name="cascade-scheduler", daemon=True)
        self._thread.start()

    # -- requests --------------------------------------------------------------------------
    def make_round(self, config: CascadeConfig | None) -> Round:
        """A fresh round for one request (its stages' caches are its own; models are shared)."""
        rnd, _ = build_round(config, self.target, self.max_len, shared=self._shared, progress=False)
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
                admitted = []
                while self._waiting and len(self._running) + len(admitted) < self.max_batch:
                    admitted.append(self._waiting.popleft())
            for job in admitted:
                self._admit(job)
            self._step()
            with self._cv:
                self._cv.notify_all()  # drain() waits on the counts

    def _admit(self, job: Job) -> None:
        if job.cancelled:
            self._end(job, None, admitted=False)
            return
        try:
            job.stage = self._pool.pop() if self._pool else ModelStage(self.target, self.max_len, name="target")
            job.decoder = Decoder(
                job.stage,
                job.prompt_ids,
                job.round,
                max_new_tokens=job.max_new_tokens,
                params=job.params,
                stop=job.stop,
                on_tokens=job.on_tokens,
            )
            job.decoder.start()
        except Exception as e:  # noqa: BLE001 - one request's failure ends that request only
            self._end(job, e)
            return
        job.admitted = True
        self.observer.started(job)
        self._running.append(job)

    def _step(self) -> None:
        live = []
        for job in self._running:
            if job.cancelled:
                self._end(job, None)
            else:
                live.append(job)
        chain = [j for j in live if isinstance(j.round, ChainRound)]
        for job in live:
            if not isinstance(job.round, ChainRound):
                self._guard(job, lambda j=job: j.decoder.step())
        if chain:
            self._chain_step(chain)
        for job in live:
            if job.decoder is not None and job.decoder.done and job in self._running:
                self._end(job, None)

    def _guard(self, job: Job, fn) -> bool:
        try:
            fn()
            return True
        except Exception as e:  # noqa: BLE001 - one request's failure ends that request only
            self._end(job, e)
            return False

    def _chain_step(self, jobs: list[Job]) -> None:
        """One round of every chain sequence, their target forwards fused into one."""
        props = {}
        for job in jobs:
            d = job.decoder
            assert d is not None and isinstance(job.round, ChainRound)
            rnd: ChainRound = job.round
            self._guard(job, lambda: props.__setitem__(id(job), rnd.propose(d.ids, d.budget, d.params, d.generator)))
        jobs = [j for j in jobs if id(j) in props]
        if not jobs:
            return
        t0 = time.perf_counter()
        try:
            logits = score_batch(
                [j.stage for j in jobs],  # type: ignore[misc]
                [j.decoder.ids for j in jobs],  # type: ignore[union-attr]
                [props[id(j)].tokens for j in jobs],
            )
        except Exception as e:  # noqa: BLE001 - the shared forward failed: end these requests, keep serving
            for job in jobs:
                self._end(job, e)
            return
        elapsed = time.perf_counter() - t0
        total = sum(len(props[id(j)].tokens) + 1 for j in jobs)
        self.observer.forward(len(jobs), total, elapsed)
        for job, lg in zip(jobs, logits):
            prop, d = props[id(job)], job.decoder
            assert d is not None and isinstance(job.round, ChainRound)
            share = elapsed * (len(prop.tokens) + 1) / total

            def finish_round(job=job, prop=prop, d=d, lg=lg, share=share, rnd=job.round):
                n, nxt = accept(prop.tokens, lg, prop.q, d.params, d.generator)
                rnd.settle(prop, n, share)
                res = prop.result(n, nxt, share)
                self.observer.round(job, res)
                d.absorb(res)

            self._guard(job, finish_round)

    def _end(self, job: Job, error: BaseException | None, admitted: bool = True) -> None:
        if job in self._running:
            self._running.remove(job)
        stats = None
        if job.decoder is not None and error is None:
            try:
                _, stats = job.decoder.finish()
            except Exception as e:  # noqa: BLE001
                error = e
        if job.stage is not None:
            self._pool.append(job.stage)
            job.stage = None
        self.observer.ended(job, stats, error)
        try:
            job.on_done(stats, error)
        except Exception:  # noqa: BLE001 - a broken callback must not stop the scheduler
            pass


class EngineObserver:
    """Hooks the engine calls from its thread (metrics implement them); each must be quick."""

    def queued(self, job: Job) -> None: ...

    def started(self, job: Job) -> None: ...

    def forward(self, sequences: int, tokens: int, seconds: float) -> None: ...

    def round(self, job: Job, res) -> None: ...

    def ended(self, job: Job, stats: GenerationStats | None, error: BaseException | None) -> None: ...
