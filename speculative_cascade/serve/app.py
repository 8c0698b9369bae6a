"""The OpenAI-compatible HTTP API over a :class:`~.batching.BatchEngine` (FastAPI).

    POST /v1/chat/completions   POST /v1/completions   (streaming: server-sent events, then [DONE])
    GET  /v1/models             GET  /health           GET /metrics (Prometheus)

Errors are OpenAI's JSON shape with a 4xx status for the client's mistakes (400 bad request,
401 missing key, 404 unknown model, 429 queue full with Retry-After, 503 shutting down).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import socket
import threading
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..config import CascadeConfig
from ..decoding import StopChecker, TextStream
from ..errors import CascadeError
from ..prompts import encode_messages
from ..sampling import SamplingParams
from . import protocol as P
from .batching import BatchEngine, Job, QueueFull, ShuttingDown
from .metrics import Metrics, finish_reason

DEFAULT_MAX_TOKENS = 256  # a chat completion without max_tokens (bounded by the context)


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type_, code, param
        self.headers = headers


class Server:
    """The engine, the tokenizer and the served model's name, shared by the routes."""

    def __init__(self, engine: BatchEngine, metrics: Metrics, model_name: str, api_key: str | None) -> None:
        self.engine, self.metrics, self.model_name, self.api_key = engine, metrics, model_name, api_key
        self.tokenizer = engine.tokenizer
        self._round_lock = threading.Lock()

    # -- a request into a job ----------------------------------------------------------------
    def check_model(self, name: str | None) -> None:
        if name is not None and name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {self.model_name!r}",
                           code="model_not_found", param="model")

    def config_for(self, spec) -> CascadeConfig | None:
        if spec is None or spec is True:
            return self.engine.config
        if spec is False:
            return None
        try:
            return CascadeConfig.from_dict(spec)
        except CascadeError as e:
            raise APIError(400, f"speculative: {e}", param="speculative") from None

    def make_round(self, config):
        with self._round_lock:  # the first request naming a new draft builds it once
            return self.engine.make_round(config)

    async def submit(self, req: P.SamplingRequest, ids: list[int]) -> tuple[Job, asyncio.Queue]:
        if req.n != 1:
            raise APIError(400, "n > 1 is not supported: send one request per completion", param="n")
        if not ids:
            raise APIError(400, "the prompt is empty", param="prompt")
        config = self.config_for(req.speculative)
        try:
            rnd = await run_in_threadpool(self.make_round, config)
        except CascadeError as e:
            raise APIError(400, f"speculative: {e}", param="speculative") from None
        max_new = req.new_tokens(DEFAULT_MAX_TOKENS)
        if isinstance(req, P.ChatRequest) and req.max_tokens is None and req.max_completion_tokens is None:
            max_new = max(1, min(max_new, self.engine.max_len - len(ids) - rnd.room))  # fill the context at most
        params = SamplingParams(temperature=req.temperature, top_k=req.top_k, top_p=req.top_p, seed=req.seed)
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def put(item) -> None:
            try:
                loop.call_soon_threadsafe(events.put_nowait, item)
            except RuntimeError:  # the event loop is closed (server stopping)
                pass

        job = Job(
            prompt_ids=ids,
            params=params,
            max_new_tokens=max_new,
            round=rnd,
            stop=StopChecker(self.engine.eos, req.stops, lambda t: self.tokenizer.decode(t)),
            on_tokens=lambda toks: put(("tokens", list(toks))),
            on_done=lambda stats, err: put(("done", (stats, err))),
        )
        try:
            self.engine.submit(job)
        except QueueFull as e:
            raise APIError(429, str(e), type_="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except ShuttingDown as e:
            raise APIError(503, str(e), type_="server_error", code="shutting_down", headers={"Retry-After": "5"}) from None
        except CascadeError as e:
            code = "context_length_exceeded" if "context limit" in str(e) else None
            param = "messages" if isinstance(req, P.ChatRequest) else "prompt"
            raise APIError(400, str(e), code=code, param=param) from None
        return job, events

    def chat_ids(self, req: P.ChatRequest) -> list[int]:
        messages = [{"role": m.role if m.role != "developer" else "system", "content": m.text()} for m in req.messages]
        try:
            return encode_messages(self.tokenizer, messages)
        except CascadeError as e:
            raise APIError(400, str(e), param="messages") from None

    def completion_ids(self, req: P.CompletionRequest) -> list[int]:
        prompt = req.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
            if len(prompt) != 1:
                raise APIError(400, "one prompt per request (a list of prompts is not supported)", param="prompt")
            prompt = prompt[0]
        if isinstance(prompt, str):
            if not prompt.strip():
                raise APIError(400, "the prompt is empty", param="prompt")
            return self.tokenizer.encode(prompt)
        vocab = self.engine.target.vocab_size
        if not all(0 <= t < vocab for t in prompt):  # type: ignore[operator]
            raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
        return list(prompt)  # type: ignore[arg-type]


async def _results(job: Job, events: asyncio.Queue) -> AsyncIterator[tuple[str, object]]:
    """The job's events until it ends; cancels the job if the consumer goes away first."""
    done = False
    try:
        while True:
            kind, payload = await events.get()
            if kind == "done":
                done = True
            yield kind, payload
            if done:
                return
    finally:
        if not done:
            job.cancel()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(engine: BatchEngine, metrics: Metrics, *, model_name: str, api_key: str | None = None,
               drain_timeout: float = 30.0) -> FastAPI:
    server = Server(engine, metrics, model_name, api_key)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        await run_in_threadpool(engine.drain, drain_timeout)  # SIGTERM: finish what runs, admit nothing new

    app = FastAPI(title="speculative_cascade", lifespan=lifespan)
    app.state.server = server

    # -- errors in OpenAI's shape ---------------------------------------------------------------
    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(P.error_body(e.message, e.type, e.param, e.code), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {"loc": (), "msg": "invalid request"}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        where = ".".join(loc)
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, where = "the request body is not valid JSON", ""
        text = f"{where}: {msg}" if where else msg
        return JSONResponse(P.error_body(text, param=where or None), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        return JSONResponse(P.error_body(str(e.detail), "invalid_request_error"), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception):
        return JSONResponse(P.error_body(f"internal error: {type(e).__name__}: {e}", "server_error"), status_code=500)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not secrets.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return JSONResponse(
                    P.error_body("missing or wrong API key (Authorization: Bearer KEY)", code="invalid_api_key"),
                    status_code=401,
                )
        return await call_next(request)

    # -- routes ---------------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.running, "waiting": engine.waiting}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0, "owned_by": "local"}]}

    @app.post("/v1/chat/completions")
    async def chat(req: P.ChatRequest):
        server.check_model(req.model)
        ids = server.chat_ids(req)
        job, events = await server.submit(req, ids)
        return await _respond(server, req, job, events, chat=True)

    @app.post("/v1/completions")
    async def completions(req: P.CompletionRequest):
        server.check_model(req.model)
        ids = server.completion_ids(req)
        job, events = await server.submit(req, ids)
        return await _respond(server, req, job, events, chat=False)

    return app


async def _respond(server: Server, req: P.SamplingRequest, job: Job, events: asyncio.Queue, *, chat: bool):
    rid = P.new_id("chatcmpl" if chat else "cmpl")
    created = P.now()
    obj = "chat.completion" if chat else "text_completion"
    model = server.model_name
    text = TextStream(server.tokenizer, req.stops)

    def finish_fields(stats) -> dict:
        out = {}
        if req.return_metrics and stats is not None:
            out["metrics"] = P.spec_metrics(stats)
        return out

    if not req.stream:
        stats = None
        async for kind, payload in _results(job, events):
            if kind == "tokens":
                text.feed(payload)  # type: ignore[arg-type]
            else:
                stats, err = payload  # type: ignore[misc]
                if err is not None:
                    raise APIError(500, f"generation failed: {err}", type_="server_error")
        content = text.text()
        reason = finish_reason(stats.stop_reason if stats else "")
        choice = (
            {"index": 0, "message": {"role": "assistant", "content": content}, "finish_reason": reason}
            if chat
            else {"index": 0, "text": content, "finish_reason": reason, "logprobs": None}
        )
        body = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice],
                "usage": P.usage(len(job.prompt_ids), len(text.ids)), **finish_fields(stats)}
        return JSONResponse(body)

    chunk_obj = "chat.completion.chunk" if chat else "text_completion"
    include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def chunk(piece: str | None, reason: str | None, first: bool = False) -> dict:
        if chat:
            delta: dict = {"role": "assistant", "content": ""} if first else ({"content": piece} if piece else {})
            choice = {"index": 0, "delta": delta, "finish_reason": reason}
        else:
            choice = {"index": 0, "text": piece or "", "finish_reason": reason, "logprobs": None}
        return {"id": rid, "object": chunk_obj, "created": created, "model": model, "choices": [choice]}

    async def stream():
        if chat:
            yield _sse(chunk(None, None, first=True))
        async for kind, payload in _results(job, events):
            if kind == "tokens":
                piece = text.feed(payload)  # type: ignore[arg-type]
                if piece:
                    yield _sse(chunk(piece, None))
                continue
            stats, err = payload  # type: ignore[misc]
            if err is not None:
                yield _sse(P.error_body(f"generation failed: {err}", "server_error"))
                break
            piece = text.finish()
            if piece:
                yield _sse(chunk(piece, None))
            last = chunk(None, finish_reason(stats.stop_reason if stats else ""))
            last.update(finish_fields(stats))
            yield _sse(last)
            if include_usage:
                yield _sse({"id": rid, "object": chunk_obj, "created": created, "model": model, "choices": [],
                            "usage": P.usage(len(job.prompt_ids), len(text.ids))})
        yield "data: [DONE]\n\n"

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


class LocalServer:
    """``app`` served by uvicorn on a free localhost port, in a thread of this process (the bench, the tests)."""

    def __init__(self, app, timeout: float = 30.0) -> None:
        import uvicorn  # the server itself: an optional 'serve' dependency, not needed by create_app

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.app = app
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="error"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + timeout
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise CascadeError(f"the local server did not start on port {self.port}")
            time.sleep(0.05)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)
