"""`cascade serve`: the OpenAI-compatible server on the embedded model, through the official client.

A server runs in a thread of this process (uvicorn on a free localhost port); the references are
the same model's plain greedy decoding, so every equality below is also a losslessness check of
the batched speculative rounds."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request

import pytest

pytest.importorskip("fastapi", reason="the server's dependencies are not installed (pip install '.[serve]')")
openai = pytest.importorskip("openai", reason="the openai client is not installed (pip install '.[test]')")

from speculative_cascade.generator import SpeculativeGenerator  # noqa: E402
from speculative_cascade.serve import create_app  # noqa: E402
from speculative_cascade.serve.app import LocalServer  # noqa: E402

pytestmark = pytest.mark.slow
MODEL = "SmolLM2-135M-Instruct"
PROMPTS = [
    "Count from one to ten:",
    "Write a haiku about the sea.",
    "What is the capital of France?",
    "Explain photosynthesis in one sentence.",
    "List three colors.",
    "Translate 'good morning' to French.",
    "Give me a fun fact about cats.",
    "What is 12 times 7?",
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Running(LocalServer):
    """The server in a thread, with its engine at hand."""

    @property
    def engine(self):
        return self.app.state.server.engine


@pytest.fixture(scope="module")
def gen():
    return SpeculativeGenerator(max_len=1024, progress=False)


@pytest.fixture(scope="module")
def server(gen):
    s = Running(create_app(gen, model_name=MODEL, max_batch=16, max_queue=128))
    yield s
    s.stop()


@pytest.fixture(scope="module")
def plain(gen):
    """The target's own greedy output (plain decoding), per (prompt, tokens)."""
    ref = SpeculativeGenerator(gen.target, None, gen.tokenizer, max_len=1024, progress=False)
    memo: dict = {}

    def text(prompt: str, n: int) -> str:
        if (prompt, n) not in memo:
            memo[(prompt, n)] = ref.generate(prompt, max_new_tokens=n, chat=True)
        return memo[(prompt, n)]

    return text


def client(server, **kw):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300, **kw)


def post(server, path: str, body, headers=None) -> tuple[int, dict, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(server.url + path, data=data, headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=300) as r:
            return r.status, json.loads(r.read()), dict(r.headers)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read()), dict(e.headers)


def chat(prompt: str, n: int = 48, **kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": prompt}], "max_tokens": n, "temperature": 0, **kw}


# -- the bars -------------------------------------------------------------------------------------


def test_chat_completions_equal_cascade_generate(server):
    """Streaming and non-streaming chat completions (greedy, 48 tokens) return `cascade generate --json`'s text."""
    prompt = PROMPTS[0]
    out = subprocess.run(
        [sys.executable, "-m", "speculative_cascade.cli", "generate", prompt, "-n", "48", "--json"],
        capture_output=True, text=True, timeout=600,
    )
    assert out.returncode == 0, out.stderr
    want = json.loads(out.stdout)["text"]
    c = client(server)
    r = c.chat.completions.create(**chat(prompt))
    assert r.choices[0].message.content == want
    assert r.usage.completion_tokens == 48 and r.choices[0].finish_reason == "length"
    pieces, usage = [], None
    for ch in c.chat.completions.create(**chat(prompt), stream=True, stream_options={"include_usage": True}):
        if ch.choices and ch.choices[0].delta.content:
            pieces.append(ch.choices[0].delta.content)
        usage = ch.usage or usage
    assert "".join(pieces) == want
    assert usage is not None and usage.completion_tokens == 48


def test_a_lone_request_takes_the_one_token_step(server, plain, monkeypatch):
    """Alone in the batch, a greedy request's rounds without drafts are the target's one-token steps
    (as `cascade generate` runs them), and its text is plain decoding's."""
    from speculative_cascade.stages.neural import ModelRunner

    want = plain(PROMPTS[1], 32)  # before counting: plain decoding takes the step too
    taken = []
    real = ModelRunner.greedy_next

    def counted(self, ids):
        token = real(self, ids)
        taken.append(token is not None)
        return token

    monkeypatch.setattr(ModelRunner, "greedy_next", counted)
    status, body, _ = post(server, "/v1/chat/completions", chat(PROMPTS[1], 32))
    assert status == 200 and body["choices"][0]["message"]["content"] == want
    assert sum(taken) >= 16, taken


def test_the_engine_takes_the_forwards_from_the_threads_that_prepare_them(gen, monkeypatch):
    """The thread that builds the engine (and loaded the model) hands its OpenMP workers back, and so
    does one that built a request's round, so that the scheduler thread's pool is the only one (two
    pools on two CPUs: a forward's barriers sleep)."""
    from speculative_cascade.engine import kernels
    from speculative_cascade.serve.batching import BatchEngine

    calls = []
    monkeypatch.setattr(kernels, "release_threads", lambda: calls.append(threading.current_thread()))
    engine = BatchEngine(gen.target, gen.tokenizer, None, max_len=256)
    assert calls == [threading.current_thread()]
    # and so does a thread that built a request's round (building a draft runs parallel work there)
    builder = threading.Thread(target=engine.make_round, args=(None,))
    builder.start()
    builder.join()
    assert calls[1:] == [builder]
    assert engine.drain(10)


def test_async_client_and_text_completions(server, gen):
    async def run():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=300)
        try:
            r = await c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0)
            pieces = []
            stream = await c.completions.create(
                model=MODEL, prompt="The capital of France is", max_tokens=16, temperature=0, stream=True
            )
            async for ch in stream:
                pieces.append(ch.choices[0].text)
            models = await c.models.list()
            return r, "".join(pieces), models
        finally:
            await c.close()

    r, streamed, models = asyncio.run(run())
    ref = SpeculativeGenerator(gen.target, None, gen.tokenizer, max_len=1024, progress=False)
    want = ref.generate("The capital of France is", max_new_tokens=16)
    assert r.choices[0].text == want == streamed
    assert [m.id for m in models.data] == [MODEL]


def test_concurrent_streams_equal_their_single_outputs(server, plain):
    """64 concurrent streaming chat completions of 32 tokens over 8 prompts: no error, each output
    equal to the prompt's output alone (batching invariance), and the batch really formed."""

    async def run():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)

        async def one(i):
            stream = await c.chat.completions.create(**chat(PROMPTS[i % 8], 32), stream=True)
            return "".join([ch.choices[0].delta.content or "" async for ch in stream if ch.choices])

        try:
            return await asyncio.gather(*[one(i) for i in range(64)])
        finally:
            await c.close()

    outs = asyncio.run(run())
    for i, text in enumerate(outs):
        assert text == plain(PROMPTS[i % 8], 32), f"request {i} ({PROMPTS[i % 8]!r}) differs from its output alone"
    metrics = urllib.request.urlopen(server.url + "/metrics").read().decode()
    batches = [line for line in metrics.splitlines() if line.startswith('cascade:batch_sequences_bucket{le="8.0"}')]
    total = [line for line in metrics.splitlines() if line.startswith("cascade:batch_sequences_count")]
    assert float(batches[0].split()[-1]) < float(total[0].split()[-1]), "no forward ever held more than 8 sequences"


def test_metrics_expose_acceptance_and_the_response_carries_it(server):
    status, body, _ = post(server, "/v1/chat/completions", chat("Repeat after me: red green blue red green blue", 32, return_metrics=True))
    assert status == 200
    spec = body["metrics"]["speculative_decoding"]
    assert spec["num_draft_tokens"] >= spec["num_accepted_tokens"] >= 0
    text = urllib.request.urlopen(server.url + "/metrics").read().decode()
    for name in (
        "cascade:spec_decode_num_drafts_total",
        "cascade:spec_decode_num_draft_tokens_total",
        "cascade:spec_decode_num_accepted_tokens_total",
        "cascade:num_requests_running",
        "cascade:time_to_first_token_seconds_bucket",
        'cascade:stage_forwards_total{stage="target"}',
    ):
        assert name in text, name


def test_per_request_cascades_are_lossless(server, plain):
    """A request may name its own cascade (an INT8 draft, batched; a tree, run alone) or none."""
    want = plain(PROMPTS[2], 24)
    for spec in ({"stages": ["int8"], "k": [4]}, {"stages": ["tiny", "int8"], "mode": "tree"}, False):
        status, body, _ = post(server, "/v1/chat/completions", chat(PROMPTS[2], 24, speculative=spec))
        assert status == 200, body
        assert body["choices"][0]["message"]["content"] == want, spec


def test_stop_strings_are_left_out(server, plain):
    full = plain(PROMPTS[0], 48)
    stop = full[10:14]
    status, body, _ = post(server, "/v1/chat/completions", chat(PROMPTS[0], 48, stop=[stop]))
    assert status == 200
    assert body["choices"][0]["message"]["content"] == full[: full.index(stop)]
    assert body["choices"][0]["finish_reason"] == "stop"


# -- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"model": MODEL, "messages": "oops", "max_tokens": -1}, 400, None),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": -1}, 400, "max_tokens"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "top_p": 0}, 400, "top_p"),
        ({"model": MODEL, "messages": []}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "wizard", "content": "hi"}]}, 400, None),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "n": 2}, 400, "n"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
        ({"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}, 404, "model"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "speculative": {"stages": ["warp"]}}, 400, "speculative"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "word " * 2000}], "max_tokens": 8}, 400, "messages"),
        ({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5000}, 400, "messages"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, param):
    got, err, _ = post(server, "/v1/chat/completions", body)
    assert got == status, err
    assert set(err) == {"error"} and err["error"]["message"] and err["error"]["type"]
    if param is not None:
        assert err["error"]["param"] is not None and param in err["error"]["param"]
    assert "Traceback" not in json.dumps(err)


def test_malformed_json_and_bad_completion_prompts(server):
    got, err, _ = post(server, "/v1/chat/completions", b'{"model": "x", "messages": [')
    assert got == 400 and "JSON" in err["error"]["message"]
    for prompt in ("", "   ", [1, 2, 10**9], ["a", "b"]):
        got, err, _ = post(server, "/v1/completions", {"model": MODEL, "prompt": prompt})
        assert got == 400 and err["error"]["param"] == "prompt", prompt
    got, err, _ = post(server, "/v1/chat/completions", [1, 2, 3])
    assert got == 400


def test_a_failing_request_does_not_take_down_the_others(server, plain, monkeypatch):
    """A request whose round raises ends with an error; the ones batched with it finish correctly."""
    engine = server.engine
    real = engine.make_round

    def broken(config):
        rnd = real(config)

        def boom(*a, **k):
            raise RuntimeError("a drafter broke")

        rnd.propose = boom
        return rnd

    results = {}

    def run(i, prompt):
        results[i] = post(server, "/v1/chat/completions", chat(prompt, 24))

    monkeypatch.setattr(engine, "make_round", broken)
    bad = threading.Thread(target=run, args=(0, PROMPTS[1]))
    bad.start()
    time.sleep(0.5)
    monkeypatch.setattr(engine, "make_round", real)
    good = [threading.Thread(target=run, args=(i, PROMPTS[i])) for i in (2, 3)]
    for t in good:
        t.start()
    for t in [bad, *good]:
        t.join(300)
    assert results[0][0] == 500 and "a drafter broke" in results[0][1]["error"]["message"]
    for i in (2, 3):
        assert results[i][0] == 200 and results[i][1]["choices"][0]["message"]["content"] == plain(PROMPTS[i], 24)


def test_disconnecting_client_frees_its_row(server):
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    body = json.dumps(chat(PROMPTS[3], 900, stream=True))
    conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    resp.fp.readline()  # the first event: the sequence is running
    deadline = time.time() + 20
    while server.engine.running == 0 and time.time() < deadline:
        time.sleep(0.02)
    assert server.engine.running == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    deadline = time.time() + 20
    while server.engine.running and time.time() < deadline:
        time.sleep(0.05)
    assert server.engine.running == 0, "the disconnected sequence still holds its row"


def test_load_with_random_disconnects_and_memory_settles(server, plain):
    """64 streaming clients, a third of them hanging up at a random point: every other one completes
    with its single-request output; the server's memory after a second wave is what it was after the first."""
    import psutil

    rng = random.Random(0)

    async def wave():
        c = openai.AsyncOpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0, timeout=600)

        async def one(i):
            quit_after = rng.randrange(1, 6) if i % 3 == 0 else None
            stream = await c.chat.completions.create(**chat(PROMPTS[i % 8], 32), stream=True)
            pieces, seen = [], 0
            async for ch in stream:
                seen += 1
                if ch.choices:
                    pieces.append(ch.choices[0].delta.content or "")
                if quit_after is not None and seen >= quit_after:
                    await stream.close()
                    return None
            return "".join(pieces)

        try:
            return await asyncio.gather(*[one(i) for i in range(64)])
        finally:
            await c.close()

    rss = []
    for _ in range(2):
        outs = asyncio.run(wave())
        for i, text in enumerate(outs):
            if text is not None:
                assert text == plain(PROMPTS[i % 8], 32), f"request {i} differs from its output alone"
        deadline = time.time() + 20
        while (server.engine.running or server.engine.waiting) and time.time() < deadline:
            time.sleep(0.05)
        assert server.engine.running == 0 and server.engine.waiting == 0
        rss.append(psutil.Process().memory_info().rss)
    assert rss[1] - rss[0] < 64 * 2**20, f"memory grew by {(rss[1] - rss[0]) / 2**20:.0f} MiB between two equal waves"


# -- limits, keys, shutdown --------------------------------------------------------------------------


def test_full_queue_answers_429_with_retry_after(gen):
    s = Running(create_app(gen, model_name=MODEL, max_batch=1, max_queue=0))
    try:
        results = []

        def run():
            results.append(post(s, "/v1/chat/completions", chat(PROMPTS[0], 200)))

        t = threading.Thread(target=run)
        t.start()
        deadline = time.time() + 20
        while s.engine.running == 0 and time.time() < deadline:
            time.sleep(0.02)
        status, err, headers = post(s, "/v1/chat/completions", chat(PROMPTS[1], 8))
        assert status == 429 and headers.get("retry-after") == "1" and err["error"]["code"] == "queue_full"
        t.join(300)
        assert results[0][0] == 200
    finally:
        s.stop()


def test_api_key(gen):
    s = Running(create_app(gen, model_name=MODEL, api_key="sesame"))
    try:
        status, err, _ = post(s, "/v1/chat/completions", chat(PROMPTS[0], 4))
        assert status == 401 and err["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            client(s).chat.completions.create(**chat(PROMPTS[0], 4))
        r = openai.OpenAI(base_url=s.url + "/v1", api_key="sesame", max_retries=0).chat.completions.create(
            **chat(PROMPTS[0], 4)
        )
        assert r.usage.completion_tokens == 4
        assert urllib.request.urlopen(s.url + "/health").status == 200  # health and metrics stay open
    finally:
        s.stop()


def test_sigterm_drains_running_requests():
    """`cascade serve` on SIGTERM: the running stream completes, then the process exits 0."""
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "speculative_cascade.cli", "serve", "--port", str(port), "--max-len", "512"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        deadline = time.time() + 300
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                break
            except OSError:
                assert proc.poll() is None and time.time() < deadline, proc.stderr.read() if proc.poll() else "no start"
                time.sleep(0.3)
        c = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="none", max_retries=0, timeout=120)
        stream = c.chat.completions.create(**chat(PROMPTS[0], 64), stream=True, stream_options={"include_usage": True})
        first = next(iter(stream))
        assert first.choices[0].delta.role == "assistant"
        proc.send_signal(signal.SIGTERM)
        refused, deadline = False, time.time() + 10
        while not refused and time.time() < deadline:  # new connections are refused while the stream drains
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2)
                time.sleep(0.1)
            except OSError:
                refused = True
        assert refused, "the server still accepted connections after SIGTERM"
        usage, reason = None, None
        for ch in stream:
            usage = ch.usage or usage
            if ch.choices and ch.choices[0].finish_reason:
                reason = ch.choices[0].finish_reason
        assert reason in ("stop", "length") and usage is not None, "the running request was cut off"
        assert proc.wait(60) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal once drained
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_bench_serve_takes_turns_and_reports_the_median_run(gen, monkeypatch):
    """`cascade bench-serve`: at each level the modes alternate (who goes first rotates), each runs
    `repeats` times, and the figures are its median run's; every output equals the lowest level's."""
    from speculative_cascade.bench import serving

    order: list[tuple[int, str]] = []
    real_run = asyncio.run

    def spy(coro):
        frame = coro.cr_frame
        order.append((frame.f_locals["n"], frame.f_locals["mode"]))
        return real_run(coro)

    monkeypatch.setattr(serving.asyncio, "run", spy)
    points = serving.run_serving_bench(gen, clients=(1, 2), max_tokens=6, n_prompts=2, repeats=3)
    assert order[0] == (2, "cascade")  # the warm-up, at the largest level
    assert order[1:] == [(1, "cascade"), (1, "plain"), (1, "plain"), (1, "cascade"), (1, "cascade"), (1, "plain"),
                         (2, "plain"), (2, "cascade"), (2, "cascade"), (2, "plain"), (2, "plain"), (2, "cascade")]
    assert [(p.clients, p.mode, p.runs) for p in points] == [(1, "cascade", 3), (2, "cascade", 3), (1, "plain", 3), (2, "plain", 3)]
    assert all(p.identical and p.tokens == 6 * p.clients and p.tokens_per_s > 0 for p in points)
    md = serving.markdown(points, "title")
    assert "| 1 | cascade |" in md and "| vs plain |" in md and md.count(" - |") >= 2
