"""Perplexity of a model on a text: what rounding the activations to int8 costs in quality.

The text is read in windows of ``window`` tokens, each scored with teacher forcing (one forward
over the window, every position's logits); the perplexity is exp of the mean negative
log-likelihood of every token after the first. ``compare`` loads one model at several precisions
and reports each one's perplexity and its ratio to the first's.
"""

from __future__ import annotations

import math
from importlib import resources

import torch

from ..engine.loader import load_model

TEXT = "perplexity.txt"  # shipped in speculative_cascade/data


def shipped_text() -> str:
    return resources.files("speculative_cascade").joinpath("data", TEXT).read_text(encoding="utf-8")


@torch.inference_mode()
def perplexity(model, ids: list[int], window: int = 512) -> float:
    """exp(mean NLL) of ``ids[1:]`` given the tokens before each, in windows of ``window`` tokens."""
    if len(ids) < 2:
        raise ValueError("perplexity needs at least two tokens")
    nll, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start : start + window + 1]
        if len(chunk) < 2:
            break
        cache = model.new_cache(len(chunk))
        logits = model(torch.tensor([chunk[:-1]]), cache)[0].double()
        logp = torch.log_softmax(logits, -1)
        target = torch.tensor(chunk[1:])
        nll -= float(logp[torch.arange(len(target)), target].sum())
        count += len(target)
    return math.exp(nll / count)


def compare(target: str | None, precisions: list[str], text: str | None = None, window: int = 512) -> list[dict]:
    """Each precision's perplexity on ``text`` (default: the shipped one), with its ratio to the first's."""
    rows: list[dict] = []
    for p in precisions:
        lm = load_model(target, precision=p, progress=False)
        ids = lm.tokenizer.encode(text if text is not None else shipped_text())
        ppl = perplexity(lm.model, ids, window)
        fmt = getattr(lm.model, "weight_format", "")
        rows.append({"precision": p, "format": fmt, "tokens": len(ids), "perplexity": ppl})
        del lm
    for r in rows:
        r["ratio"] = r["perplexity"] / rows[0]["perplexity"]
    return rows
