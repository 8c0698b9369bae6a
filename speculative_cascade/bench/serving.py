"""The server under load: total tokens/s at several numbers of concurrent clients, with the cascade
and with plain decoding, through the OpenAI client against a server on localhost (``cascade bench-serve``).

Each client sends one streaming chat completion (greedy); a level's figure is every client's
completion tokens over the wall time from the first request to the last token. At each level the
modes take turns (who goes first rotates), ``repeats`` times each, and each mode's median run
counts, so that the cascade and plain decoding are measured side by side. Beside it: the
median time to first token, the drafted tokens the target verified per sequence and round (the
adaptive round shrinks it as the batch grows: verification stops being free), the acceptance, and
whether every output equals the same prompt's output at the lowest level, in either mode (batching
invariance and losslessness).
"""

from __future__ import annotations

import asyncio
import statistics
import time
from dataclasses import asdict, dataclass

from ..errors import CascadeError
from ..prompts import default_prompt_file, load_prompts, read_prompts, SHIPPED_PROMPTS


@dataclass
class ServingPoint:
    clients: int
    mode: str  # "cascade" (the server's cascade) or "plain" (speculative: false)
    tokens: int
    seconds: float
    tokens_per_s: float
    ttft_p50_s: float
    drafted_per_round: float  # drafted tokens verified per sequence and round
    acceptance: float
    identical: bool  # every output equals its prompt's first output (fewest clients; cascade and plain alike)
    runs: int = 1  # runs of this mode at this level; the median one's figures (counters: all runs)

    def to_dict(self) -> dict:
        return asdict(self)


def bench_prompts(n: int, prompt_set: str = "short") -> list[str]:
    """``short``: the shipped one-line instructions; ``spec-bench``: one Spec-Bench prompt per category
    (long ones among them: summaries, RAG), where prefill is a large part of each request."""
    if prompt_set == "spec-bench":
        texts = [r["prompt"] for r in load_prompts(default_prompt_file(), 1)]
    elif prompt_set == "short":
        texts = read_prompts(SHIPPED_PROMPTS)
    else:
        raise CascadeError(f"unknown prompt set {prompt_set!r}: 'short' or 'spec-bench'")
    return texts[:n]


def run_serving_bench(
    generator,
    *,
    clients: tuple[int, ...] = (1, 4, 16, 64),
    max_tokens: int = 64,
    max_batch: int = 64,
    n_prompts: int = 8,
    modes: tuple[str, ...] = ("cascade", "plain"),
    prompt_set: str = "short",
    repeats: int = 3,
    progress=None,
) -> list[ServingPoint]:
    """Start a server for ``generator`` on a free localhost port and load it; see the module docstring."""
    import openai  # the official client: what a user's code sends (an optional dependency)

    from ..serve import create_app  # noqa: I001 - fastapi, through the serve package
    from ..serve.app import LocalServer  # noqa: I001 - fastapi and uvicorn, the serve extra

    prompts = bench_prompts(n_prompts, prompt_set)
    modes = tuple(dict.fromkeys(modes))  # each mode once, in the order given
    app = create_app(generator, model_name="bench", max_batch=max_batch, max_queue=max(max(clients), 1) * 2)
    server = LocalServer(app)
    metrics = app.state.server.metrics
    url = server.url + "/v1"

    def sample(name: str) -> float:
        return metrics.registry.get_sample_value(name) or 0.0

    async def level(n: int, mode: str) -> tuple[list[str], list[int], list[float], float]:
        c = openai.AsyncOpenAI(base_url=url, api_key="none", max_retries=0, timeout=3600)
        t0 = time.perf_counter()

        async def one(i: int):
            ttft = None
            pieces = []
            tokens = 0
            stream = await c.chat.completions.create(
                model="bench",
                messages=[{"role": "user", "content": prompts[i % len(prompts)]}],
                max_tokens=max_tokens,
                temperature=0,
                stream=True,
                stream_options={"include_usage": True},
                extra_body={"speculative": None if mode == "cascade" else False},
            )
            async for ch in stream:
                if ch.choices and ch.choices[0].delta.content:
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    pieces.append(ch.choices[0].delta.content)
                if ch.usage:
                    tokens = ch.usage.completion_tokens
            return "".join(pieces), tokens, ttft if ttft is not None else time.perf_counter() - t0

        try:
            res = await asyncio.gather(*[one(i) for i in range(n)])
        finally:
            await c.close()
        return [r[0] for r in res], [r[1] for r in res], [r[2] for r in res], time.perf_counter() - t0

    points: list[ServingPoint] = []
    try:
        # warm-up at the largest level: first-use costs stay out of the figures, the rows' KV caches
        # among them (a level that first runs n sequences allocated n caches and faulted their pages
        # in: after a one-client warm-up, whichever mode ran first came out 10-40% slower at 4-64 clients)
        asyncio.run(level(max(clients), modes[0]))
        first: dict[int, str] = {}  # prompt -> its output at the lowest level, either mode
        turn = 0
        for n in clients:
            runs: dict[str, list[tuple[float, int, list[float]]]] = {m: [] for m in modes}
            counts = {m: dict.fromkeys(_COUNTERS, 0.0) for m in modes}
            same = dict.fromkeys(modes, True)
            for _ in range(repeats):
                for mode in modes[turn % len(modes):] + modes[: turn % len(modes)]:
                    before = {k: sample(k) for k in _COUNTERS}
                    texts, tokens, ttfts, wall = asyncio.run(level(n, mode))
                    for k, v in before.items():
                        counts[mode][k] += sample(k) - v
                    for i, t in enumerate(texts):  # the first output seen for a prompt is its reference
                        same[mode] &= first.setdefault(i % len(prompts), t) == t
                    runs[mode].append((wall, sum(tokens), ttfts))
                turn += 1
            for mode in modes:
                wall, tokens, ttfts = sorted(runs[mode], key=lambda r: r[0])[(len(runs[mode]) - 1) // 2]
                d = counts[mode]
                rounds = d["cascade:batch_sequences_sum"]
                drafted = d["cascade:spec_decode_num_draft_tokens_total"]
                points.append(
                    ServingPoint(
                        clients=n,
                        mode=mode,
                        tokens=tokens,
                        seconds=wall,
                        tokens_per_s=tokens / wall,
                        ttft_p50_s=statistics.median(ttfts),
                        drafted_per_round=drafted / rounds if rounds else 0.0,
                        acceptance=d["cascade:spec_decode_num_accepted_tokens_total"] / drafted if drafted else 0.0,
                        identical=same[mode],
                        runs=len(runs[mode]),
                    )
                )
                if progress is not None:
                    progress(points[-1])
        points.sort(key=lambda p: modes.index(p.mode))  # the table: each mode's levels together
    finally:
        server.stop()
    return points


_COUNTERS = (
    "cascade:batch_sequences_sum",
    "cascade:spec_decode_num_draft_tokens_total",
    "cascade:spec_decode_num_accepted_tokens_total",
)


def markdown(points: list[ServingPoint], header: str) -> str:
    lines = [
        header,
        "",
        "| clients | mode | tokens | seconds | total tok/s | vs 1 client | vs plain | TTFT p50 (s) | drafted/round | acceptance | identical |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    base = {p.mode: p.tokens_per_s for p in points if p.clients == min(q.clients for q in points)}
    plain = {p.clients: p.tokens_per_s for p in points if p.mode == "plain"}
    for p in points:
        vs_plain = f"{p.tokens_per_s / plain[p.clients]:.2f}x" if p.mode != "plain" and p.clients in plain else "-"
        lines.append(
            f"| {p.clients} | {p.mode} | {p.tokens} | {p.seconds:.1f} | {p.tokens_per_s:.1f} | "
            f"{p.tokens_per_s / base[p.mode]:.2f}x | {vs_plain} | {p.ttft_p50_s:.2f} | {p.drafted_per_round:.2f} | "
            f"{p.acceptance:.1%} | {'yes' if p.identical else 'NO'} |"
        )
    return "\n".join(lines)
