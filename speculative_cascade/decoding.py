"""The generate loops: autoregressive, and two-stage speculative decoding.

Every model is driven through a :class:`ModelRunner` (the model plus its static KV cache).
Its cache always holds a prefix of the committed token list ``ids``; a forward feeds
the committed tokens it has not seen yet (plus any drafted ones), and after a round the
cache is cut back to what was committed. Cutting back is cursor arithmetic.

A drafter is anything with the two-method stage interface of :class:`Drafter`;
:class:`ModelDrafter` is a neural model used as a draft.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Protocol

import torch

from .errors import CascadeError
from .sampling import SamplingParams, sample, warp
from .verify import verify_greedy, verify_sampling


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
    prefill_s: float = 0.0
    draft_s: float = 0.0
    verify_s: float = 0.0
    total_s: float = 0.0
    stop_reason: str = ""

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

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
        d.update(
            acceptance_rate=self.acceptance_rate,
            mean_accepted_length=self.mean_accepted_length,
            avg_tokens_per_round=self.mean_accepted_length,
            tokens_per_s=self.tokens_per_s,
        )
        return d


class ModelRunner:
    """A model with its static KV cache, kept a prefix of the committed tokens."""

    def __init__(self, model, max_len: int) -> None:
        self.model = model
        self.cache = model.new_cache(max_len)
        self.device = model.device

    @property
    def length(self) -> int:
        return self.cache.seqlens[0]

    def reset(self) -> None:
        self.cache.truncate(0)

    def forward(self, ids: list[int], extra: list[int] = (), last_only: bool = False) -> torch.Tensor:
        """Feed ``ids[length:] + extra``; return their logits (T, V) (or (1, V) if last_only)."""
        n = self.length
        new = ids[n:] + list(extra) if n <= len(ids) else list(extra[n - len(ids) :])
        assert new, "nothing to feed"
        tokens = torch.tensor([new], dtype=torch.long, device=self.device)
        return self.model(tokens, self.cache, last_only=last_only)[0]

    def truncate(self, length: int) -> None:
        if length < self.length:
            self.cache.truncate(length)


class Drafter(Protocol):
    """A stage that proposes tokens. ``q`` is None for a deterministic drafter."""

    def propose(
        self, ids: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]: ...

    def commit(self, n_committed: int) -> None:
        """The first ``n_committed`` tokens of the sequence are final; forget the rest."""

    def reset(self) -> None: ...


class ModelDrafter:
    """A neural draft model that proposes ``k`` tokens autoregressively from its own cache."""

    def __init__(self, model, max_len: int) -> None:
        self.runner = ModelRunner(model, max_len)

    @property
    def vocab_size(self) -> int:
        return self.runner.model.vocab_size

    def reset(self) -> None:
        self.runner.reset()

    def propose(self, ids, k, params, generator):
        tokens: list[int] = []
        qs: list[torch.Tensor] = []
        logits = self.runner.forward(ids, last_only=True)[-1]
        for i in range(k):
            if params.greedy:
                tok = int(logits.argmax())
            else:
                q = warp(logits, params)
                tok = sample(q, generator)
                qs.append(q)
            tokens.append(tok)
            if i < k - 1:
                logits = self.runner.forward(ids, tokens, last_only=True)[-1]  # feeds just `tok`
        return tokens, (torch.stack(qs) if qs else None)

    def commit(self, n_committed: int) -> None:
        self.runner.truncate(n_committed)

    def share_prefix(self, target: ModelRunner, n: int) -> bool:
        """Start from the target's KV cache for the first ``n`` positions instead of a prefill.

        Possible when the draft has the target's shape (an INT8 copy of it); the draft then
        works on slightly better keys/values than its own, and the prompt is prefilled
        once instead of twice. Verification by the target keeps the output lossless.
        """
        mine, theirs = self.runner.cache, target.cache
        if not (hasattr(mine, "k") and hasattr(theirs, "k")):
            return False
        if (
            mine.k.shape[:3] != theirs.k.shape[:3]
            or mine.k.shape[4] != theirs.k.shape[4]
            or mine.k.dtype != theirs.k.dtype
        ):
            return False
        if n > mine.max_seq_len or theirs.seqlens[0] < n:
            return False
        mine.k[:, :, :, :n] = theirs.k[:, :, :, :n]
        mine.v[:, :, :, :n] = theirs.v[:, :, :, :n]
        mine.seqlens = [n] * mine.batch_size
        return True


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
        self.decode = decode
        if self.stop_strings and decode is None:
            raise CascadeError("stop strings need a tokenizer")

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


def generate_tokens(
    target,
    prompt_ids: list[int],
    *,
    drafter: Drafter | None = None,
    k: int = 5,
    max_new_tokens: int = 128,
    params: SamplingParams = SamplingParams(),
    stop: StopChecker | None = None,
    max_len: int = 2048,
    target_runner: ModelRunner | None = None,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> tuple[list[int], GenerationStats]:
    """Generate up to ``max_new_tokens`` after ``prompt_ids``; return (new token ids, stats).

    With ``drafter=None`` this is plain autoregressive decoding with the target.
    Otherwise each round the drafter proposes ``k`` tokens, the target scores them in one
    forward, and verification keeps the accepted ones plus one recovered/bonus token.
    """
    if drafter is None:
        k = 0
    elif k < 1:
        raise CascadeError(f"k must be >= 1, got {k}")
    check_context(len(prompt_ids), max_new_tokens, k, max_len)
    stop = stop or StopChecker(getattr(target, "eos_token_ids", ()))
    generator = None
    if not params.greedy:
        generator = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
    runner = target_runner or ModelRunner(target, max_len)
    runner.reset()
    if drafter is not None:
        drafter.reset()
    stats = GenerationStats(prompt_tokens=len(prompt_ids))
    stats.accepted_by_position = [0] * k
    stats.drafted_by_position = [0] * k
    ids = list(prompt_ids)
    out: list[int] = []
    t0 = time.perf_counter()

    def pick(logits: torch.Tensor) -> int:
        return int(logits.argmax()) if params.greedy else sample(warp(logits, params), generator)

    # Prefill: the whole prompt but its last token, which every round feeds first.
    if len(ids) > 1:
        runner.forward(ids[:-1], last_only=True)
        share = getattr(drafter, "share_prefix", None)
        if share is not None:
            share(runner, len(ids) - 1)
    stats.prefill_s = time.perf_counter() - t0
    while len(out) < max_new_tokens:
        kk = min(k, max_new_tokens - len(out) - 1)
        draft: list[int] = []
        q = None
        if kk > 0:
            t1 = time.perf_counter()
            draft, q = drafter.propose(ids, kk, params, generator)
            stats.draft_s += time.perf_counter() - t1
        t1 = time.perf_counter()
        logits = runner.forward(ids, draft)[-(len(draft) + 1) :]  # (kk + 1, V)
        if not draft:
            n, nxt = 0, pick(logits[0])
        elif params.greedy:
            n, nxt = verify_greedy(draft, logits)
        else:
            n, nxt = verify_sampling(draft, q, warp(logits, params), generator)
        stats.verify_s += time.perf_counter() - t1
        stats.rounds += 1
        stats.drafted += len(draft)
        stats.accepted += n
        for i in range(len(draft)):
            stats.drafted_by_position[i] += 1
            stats.accepted_by_position[i] += i < n
        new = draft[:n] + [nxt]
        start = len(out)
        out.extend(new)
        ids.extend(new)
        # The target saw ids up to the last accepted draft; its cache keeps exactly that.
        runner.truncate(len(ids) - 1)
        if drafter is not None:
            drafter.commit(len(ids) - 1)
        cut = stop.cut(out, start)
        if cut is not None:
            keep, stats.stop_reason = cut
            del out[keep:]
            if on_tokens and keep > start:
                on_tokens(out[start:keep])
            break
        if len(out) >= max_new_tokens:
            del out[max_new_tokens:]
            stats.stop_reason = "length"
            if on_tokens:
                on_tokens(out[start:])
            break
        if on_tokens:
            on_tokens(new)
    stats.new_tokens = len(out)
    stats.total_s = time.perf_counter() - t0
    return out, stats
