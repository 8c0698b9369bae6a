"""Prometheus metrics of the server, named as vLLM's where one exists (``cascade:`` for ``vllm:``).

Requests: ``num_requests_running``, ``num_requests_waiting``, ``request_success_total{finished_reason}``,
``request_failure_total``, ``prompt_tokens_total``, ``generation_tokens_total``, histograms
``time_to_first_token_seconds``, ``inter_token_latency_seconds``, ``e2e_request_latency_seconds``.
Speculative decoding (vLLM's spec-decode counters): ``spec_decode_num_drafts_total`` (rounds that
verified at least one drafted token), ``spec_decode_num_draft_tokens_total``,
``spec_decode_num_accepted_tokens_total``, ``spec_decode_num_accepted_tokens_per_pos_total{position}``.
Per cascade stage (``stage`` label, the target included): ``stage_forwards_total``,
``stage_proposed_tokens_total``, ``stage_accepted_tokens_total``, ``stage_seconds_total``.
Batching: ``batch_sequences`` and ``batch_tokens`` histograms (per target forward).
"""

from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from .batching import EngineObserver, Job

P = "cascade:"
LATENCY = (0.005, 0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96)
BATCH = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics(EngineObserver):
    """The engine's observer, writing into its own registry (one per server)."""

    def __init__(self, engine_counts=None) -> None:
        self.registry = r = CollectorRegistry()
        self.running = Gauge(P + "num_requests_running", "Requests in the running batch.", registry=r)
        self.waiting = Gauge(P + "num_requests_waiting", "Requests waiting for a row.", registry=r)
        self.success = Counter(P + "request_success", "Finished requests.", ["finished_reason"], registry=r)
        self.failure = Counter(P + "request_failure", "Requests ended by an error.", registry=r)
        self.prompt_tokens = Counter(P + "prompt_tokens", "Prompt tokens of admitted requests.", registry=r)
        self.generation_tokens = Counter(P + "generation_tokens", "Tokens generated.", registry=r)
        self.ttft = Histogram(P + "time_to_first_token_seconds", "Queueing to first token.", buckets=LATENCY, registry=r)
        self.itl = Histogram(P + "inter_token_latency_seconds", "Time per token after the first.", buckets=LATENCY, registry=r)
        self.e2e = Histogram(P + "e2e_request_latency_seconds", "Queueing to the end.", buckets=LATENCY, registry=r)
        self.drafts = Counter(P + "spec_decode_num_drafts", "Rounds that verified drafted tokens.", registry=r)
        self.draft_tokens = Counter(P + "spec_decode_num_draft_tokens", "Drafted tokens verified.", registry=r)
        self.accepted_tokens = Counter(P + "spec_decode_num_accepted_tokens", "Drafted tokens accepted.", registry=r)
        self.accepted_per_pos = Counter(
            P + "spec_decode_num_accepted_tokens_per_pos", "Accepted drafted tokens by position.", ["position"], registry=r
        )
        self.stage_forwards = Counter(P + "stage_forwards", "Forwards (or lookups) of a stage.", ["stage"], registry=r)
        self.stage_proposed = Counter(P + "stage_proposed_tokens", "Tokens a stage proposed.", ["stage"], registry=r)
        self.stage_accepted = Counter(
            P + "stage_accepted_tokens", "Of those, accepted by the stage above.", ["stage"], registry=r
        )
        self.stage_seconds = Counter(P + "stage_seconds", "Seconds inside a stage's calls.", ["stage"], registry=r)
        self.batch_sequences = Histogram(P + "batch_sequences", "Sequences per target forward.", buckets=BATCH, registry=r)
        self.batch_tokens = Histogram(P + "batch_tokens", "Tokens per target forward.", buckets=BATCH, registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)

    # -- EngineObserver ------------------------------------------------------------------------
    def queued(self, job: Job) -> None:
        self.waiting.inc()

    def started(self, job: Job) -> None:
        self.waiting.dec()
        self.running.inc()
        self.prompt_tokens.inc(len(job.prompt_ids))

    def forward(self, sequences: int, tokens: int, seconds: float) -> None:
        self.batch_sequences.observe(sequences)
        self.batch_tokens.observe(tokens)

    def round(self, job: Job, res) -> None:
        now = time.perf_counter()
        n = len(res.tokens)
        if job.first_token_at is None:
            job.first_token_at = now
            self.ttft.observe(now - job.queued_at)
            n -= 1
        elif job.last_token_at is not None and n:
            for _ in range(n):
                self.itl.observe((now - job.last_token_at) / n)
        job.last_token_at = now
        if res.drafted:
            self.drafts.inc()
            self.draft_tokens.inc(res.drafted)
            self.accepted_tokens.inc(res.accepted)
            for i in range(res.accepted):
                self.accepted_per_pos.labels(position=str(i)).inc()

    def ended(self, job: Job, stats, error) -> None:
        if not job.admitted:
            self.waiting.dec()
        else:
            self.running.dec()
        self.e2e.observe(time.perf_counter() - job.queued_at)
        if error is not None:
            self.failure.inc()
            return
        if stats is None:  # cancelled before admission
            self.success.labels(finished_reason="abort").inc()
            return
        self.success.labels(finished_reason="abort" if job.cancelled else finish_reason(stats.stop_reason)).inc()
        self.generation_tokens.inc(stats.new_tokens)
        for st in stats.stages:
            self.stage_forwards.labels(stage=st.name).inc(st.forwards)
            self.stage_proposed.labels(stage=st.name).inc(st.proposed)
            self.stage_accepted.labels(stage=st.name).inc(st.accepted)
            self.stage_seconds.labels(stage=st.name).inc(st.seconds)


def finish_reason(stop_reason: str) -> str:
    """OpenAI's finish_reason for a decoder's stop reason."""
    return "length" if stop_reason == "length" else "stop"
