"""The OpenAI request and response shapes the server speaks (the fields it reads; others are ignored).

Beyond OpenAI's fields a request may carry ``top_k`` (0 = off), ``speculative`` (``false``: plain
decoding; an object: the cascade for this request, as a cascade file's ``[cascade]`` table, e.g.
``{"stages": ["mag:none", "int8"], "k": [3, 8]}``), and ``return_metrics`` (``true``: the response
carries ``metrics.speculative_decoding``, the request's acceptance).
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictFloat, StrictInt, field_validator

MAX_STOP = 4  # stop strings per request, as OpenAI


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart]]

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class SamplingRequest(BaseModel):
    """What chat and text completions share."""

    model_config = ConfigDict(extra="ignore")
    model: str | None = None
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: StrictFloat = Field(1.0, ge=0.0, le=2.0)
    top_p: StrictFloat = Field(1.0, gt=0.0, le=1.0)
    top_k: StrictInt = Field(0, ge=0)
    seed: StrictInt | None = None
    stop: Union[str, list[str], None] = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    n: StrictInt = Field(1, ge=1)
    speculative: Union[StrictBool, dict[str, Any], None] = None
    return_metrics: StrictBool = False

    @field_validator("stop")
    @classmethod
    def _stops(cls, v):
        stops = [v] if isinstance(v, str) else list(v or [])
        if len(stops) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return [s for s in stops if s]

    @property
    def stops(self) -> list[str]:
        return self.stop or []  # type: ignore[return-value]

    def new_tokens(self, default: int) -> int:
        return self.max_completion_tokens or self.max_tokens or default


class ChatRequest(SamplingRequest):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(SamplingRequest):
    prompt: Union[str, list[StrictInt], list[str]]
    max_tokens: StrictInt | None = Field(16, ge=1)  # OpenAI's default for text completions


def error_body(message: str, type_: str = "invalid_request_error", param: str | None = None, code: str | None = None):
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def now() -> int:
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def spec_metrics(stats) -> dict:
    """A request's acceptance, as vLLM reports it under ``metrics.speculative_decoding``."""
    drafts = sum(n for k, n in enumerate(stats.rounds_by_draft_length) if k > 0)
    return {
        "speculative_decoding": {
            "num_drafts": drafts,
            "num_draft_tokens": stats.drafted,
            "num_accepted_tokens": stats.accepted,
            "accepted_per_position": list(stats.accepted_by_position),
            "acceptance_rate": stats.acceptance_rate,
            "mean_accepted_length": stats.mean_accepted_length,
            "rounds": stats.rounds,
        }
    }
