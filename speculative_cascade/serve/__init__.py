"""``cascade serve``: an OpenAI-compatible HTTP server with continuous batching of speculative rounds.

* ``batching.py`` - the scheduler: requests join the running batch at round boundaries, and one
  target forward verifies every running sequence's draft;
* ``app.py`` - the HTTP API (FastAPI): chat and text completions, streaming or not, models,
  health, Prometheus metrics; ``protocol.py`` - the request/response shapes;
* ``metrics.py`` - the Prometheus metrics, named as vLLM's.
"""

from __future__ import annotations

from pathlib import Path

from .batching import BatchEngine, Job, QueueFull, ShuttingDown

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"


def model_name_for(target: str) -> str:
    """The name clients use for ``target``: the embedded model's, a file's stem, or the hub id."""
    if target in ("default", ""):
        return DEFAULT_MODEL_NAME
    p = Path(target)
    return p.name.removesuffix(".gguf") if p.exists() else target


def create_app(generator, *, model_name: str, max_batch: int = 16, max_queue: int = 256, api_key: str | None = None,
               drain_timeout: float = 30.0):
    """The FastAPI app serving ``generator``'s target, tokenizer and cascade (``generator.config``)."""
    from .app import create_app as _create  # fastapi: the optional 'serve' dependencies
    from .metrics import Metrics  # prometheus-client: an optional 'serve' dependency

    metrics = Metrics()
    engine = BatchEngine(
        generator.target,
        generator.tokenizer,
        generator.config,
        max_len=generator.max_len,
        max_batch=max_batch,
        max_queue=max_queue,
        observer=metrics,
        shared=generator.shared_models,
    )
    return _create(engine, metrics, model_name=model_name, api_key=api_key, drain_timeout=drain_timeout)


__all__ = ["BatchEngine", "Job", "QueueFull", "ShuttingDown", "create_app", "model_name_for"]
