"""A neural model as a cascade stage: the model, its static KV cache, and the cursor logic.

The cache always holds keys/values of a prefix of *some* token sequence, remembered in
``runner.seq``. A forward is asked for the logits of ``ids + extra``; the runner keeps the
longest common prefix of what it holds and what it is asked, rolls its cursor back to it
(O(1)) and feeds only the rest. Nested cascade levels can therefore roll back freely.
"""

from __future__ import annotations

import time

import torch

from ..engine.kv_cache import KVCache
from ..sampling import argmax_ids, sample, warp
from .base import Reviewer, Stage, TreeScorer


class ModelRunner:
    """A model with its static KV cache, kept a prefix of the last sequence it was fed."""

    def __init__(self, model, max_len: int) -> None:
        self.model = model
        self.cache = model.new_cache(max_len)
        self.device = model.device
        self.seq: list[int] = []  # the tokens whose keys/values are in the cache
        self._synced: list[int] | None = None  # a caller's sequence that seq is known to be a prefix of
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None  # greedy_next's input and logits

    @property
    def length(self) -> int:
        return self.cache.seqlens[0]

    def reset(self) -> None:
        self.cache.truncate(0)
        self.fed([])

    def _common_prefix(self, full: list[int]) -> int:
        s = self.seq
        m = len(s)
        if m <= len(full) and full[:m] == s:
            return m
        n = 0
        for a, b in zip(s, full):
            if a != b:
                break
            n += 1
        return n

    def forward(self, ids: list[int], extra=(), last_only: bool = False) -> torch.Tensor:
        """Logits for the tokens of ``ids + extra`` the cache does not hold: ``(T, V)`` (``(1, V)`` if last_only).

        At least ``ids[-1]`` and ``extra`` are always fed, so the caller can slice the
        last ``len(extra) + 1`` rows."""
        full, tokens = self.prepare(ids, extra)
        logits = self.model(tokens[None], self.cache, last_only=last_only)[0]
        self.fed(full)
        return logits

    def fed(self, full: list[int]) -> None:
        """The cache now holds ``full`` (a forward after :meth:`prepare`, here or in a batch)."""
        self.seq = full
        self._synced = None

    def greedy_next(self, ids: list[int]) -> int | None:
        """The model's greedy next token after ``ids`` when the cache holds exactly ``ids[:-1]`` (a
        decoding loop's round with nothing drafted), by the model's one-token step
        (``Transformer.greedy_next``: the logits of :meth:`forward`, without its tensors); None
        otherwise, or where the model has no such step. The caller's list is compared with
        :attr:`seq` once; while it only grows at its end by the tokens this returns (as a decoding
        loop's sequence does), the lengths say the rest."""
        n = len(ids) - 1
        seq = self.seq
        if not (ids is self._synced and len(seq) == n == self.length):
            if n < 0 or len(seq) != n or self.length != n or seq != ids[:n]:
                return None
        step = getattr(self.model, "greedy_next", None)
        if step is None:
            return None
        if self._buffers is None:
            self._buffers = (torch.empty(self.model.args.dim), torch.empty(self.model.output.out_features))
        token = step(ids[-1], self.cache, *self._buffers)
        if token is None:
            return None
        seq.append(ids[-1])
        self._synced = ids
        return token

    def prepare(self, ids: list[int], extra=()) -> tuple[list[int], torch.Tensor]:
        """Roll the cache back to what it shares with ``ids + extra``; return that sequence and the
        tokens (T,) to feed (at least ``ids[-1]`` and ``extra``). Set ``seq`` to it after the forward."""
        full = ids + list(extra) if extra else list(ids)
        n = min(self._common_prefix(full), len(ids) - 1)
        assert n >= 0, "nothing to feed"
        if n < self.length:
            self.cache.truncate(n)
        return full, torch.tensor(full[n:], dtype=torch.long, device=self.device)

    def forward_tree(self, ids: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
        """Logits (N + 1, V) of ``ids[-1]`` and the N tree nodes after it.

        ``parents[i]`` is the index of node i's parent (-1: the last committed token);
        parents come before children. Committed tokens the cache lacks are fed in the
        same forward, causally. Afterwards the cache holds ``ids`` plus the tree's slots
        (call :meth:`keep_path`)."""
        n = min(self._common_prefix(ids), len(ids) - 1)
        if n < self.length:
            self.cache.truncate(n)
        m, N = len(ids) - n, len(tokens)  # m committed tokens to feed (the root last), N nodes
        T = m + N
        mask = torch.zeros(T, T, dtype=torch.bool)
        mask[:m, :m] = torch.tril(torch.ones(m, m, dtype=torch.bool))
        mask[m:, :m] = True
        depth = [0] * N
        for i, p in enumerate(parents):
            assert p < i, "parents must come before their children"
            mask[m + i, m + i] = True
            if p >= 0:
                mask[m + i] |= mask[m + p]
                depth[i] = depth[p] + 1
            else:
                depth[i] = 1
        base = n
        positions = list(range(base, base + m)) + [base + m - 1 + d for d in depth]
        feed = torch.tensor([ids[n:] + tokens], dtype=torch.long, device=self.device)
        pos = torch.tensor([positions], dtype=torch.long, device=self.device)
        logits = self.model(feed, self.cache, positions=pos, tree_mask=mask[None].to(self.device))[0]
        self.fed(list(ids))  # the tree slots are not a sequence; keep_path makes them one
        self._tree_base = len(ids)
        return logits[m - 1 :]

    def keep_path(self, ids: list[int], path: list[int], tokens: list[int]) -> None:
        """After :meth:`forward_tree`: keep the nodes ``path`` (indices, root to leaf) as the continuation of ``ids``."""
        base = self._tree_base
        assert len(ids) == base, "keep_path must follow forward_tree on the same ids"
        self.cache.compact([base + j for j in path], base)
        self.fed(list(ids) + [tokens[j] for j in path])

    def truncate(self, length: int) -> None:
        if length < self.length:
            self.cache.truncate(length)
        if length < len(self.seq):
            del self.seq[length:]
            self._synced = None


class ModelStage(Stage, Reviewer, TreeScorer):
    """A neural model (native or transformers) used as a drafter, a reviewer or the target."""

    attends = True

    def __init__(self, model, max_len: int, name: str = "model") -> None:
        super().__init__(name)
        self.runner = ModelRunner(model, max_len)

    @property
    def model(self):
        return self.runner.model

    @property
    def vocab_size(self) -> int:
        return self.runner.model.vocab_size

    @property
    def max_len(self) -> int:
        return self.runner.cache.max_seq_len

    def reset(self) -> None:
        super().reset()
        self.runner.reset()

    def _forward(self, ids, extra=(), last_only=False) -> torch.Tensor:
        t0 = time.perf_counter()
        before = self.runner.length
        logits = self.runner.forward(ids, extra, last_only=last_only)
        self.count_call(len(ids) + len(extra) - min(before, len(ids) + len(extra) - 1), time.perf_counter() - t0)
        return logits

    def greedy_next(self, ids: list[int]) -> int | None:
        t0 = time.perf_counter()
        token = self.runner.greedy_next(ids)
        if token is not None:
            self.count_call(1, time.perf_counter() - t0)
        return token

    def prefill(self, ids: list[int]) -> None:
        """Feed ``ids`` into the cache (no logits kept beyond the last row); not counted as a forward."""
        self.runner.forward(ids, last_only=True)

    def score(self, ids: list[int], draft: list[int]) -> torch.Tensor:
        """Logits (len(draft) + 1, V): the model's next-token scores after ids[-1] and after each draft token."""
        return self._forward(ids, draft)[-(len(draft) + 1) :]

    def score_tree(self, ids: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor:
        t0 = time.perf_counter()
        before = self.runner.length
        logits = self.runner.forward_tree(ids, tokens, parents)
        self.count_call(len(ids) - min(before, len(ids) - 1) + len(tokens), time.perf_counter() - t0)
        return logits

    def keep_path(self, ids: list[int], path: list[int], tokens: list[int]) -> None:
        self.runner.keep_path(ids, path, tokens)

    def propose(self, ids, k, params, generator):
        """Draft ``k`` tokens autoregressively (greedy or sampled from the warped distribution)."""
        tokens: list[int] = []
        qs: list[torch.Tensor] = []
        if params.greedy:  # one list that grows by each token: after the first, each step feeds just that token
            seq = list(ids)
            for _ in range(k):
                tok = self.greedy_next(seq)
                if tok is None:
                    tok = argmax_ids(self._forward(seq, last_only=True)[-1])[0]
                tokens.append(tok)
                seq.append(tok)
            self.count_proposed(len(tokens))
            return tokens, None
        logits = self._forward(ids, last_only=True)[-1]
        for i in range(k):
            q = warp(logits, params)
            tok = sample(q, generator)
            qs.append(q)
            tokens.append(tok)
            if i < k - 1:
                logits = self._forward(ids + tokens, last_only=True)[-1]  # feeds just `tok`
        self.count_proposed(len(tokens))
        return tokens, (torch.stack(qs) if qs else None)

    def commit(self, n_committed: int) -> None:
        self.runner.truncate(n_committed)

    def share_prefix(self, target: Reviewer, n: int) -> bool:
        """Start from the target's KV cache for the first ``n`` positions instead of a prefill.

        Possible when the draft has the target's shape (an INT8 copy of it); the draft then
        works on slightly better keys/values than its own, and the prompt is prefilled
        once instead of twice. Verification by the target keeps the output lossless.
        """
        if not isinstance(target, ModelStage):
            return False
        mine, theirs = self.runner.cache, target.runner.cache
        if not (isinstance(mine, KVCache) and isinstance(theirs, KVCache)):
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
        self.runner.fed(list(target.runner.seq[:n]))
        return True


def score_batch(stages: list[ModelStage], ids: list[list[int]], drafts: list[list[int]]) -> list[torch.Tensor]:
    """:meth:`ModelStage.score` of several sequences in one forward (continuous batching).

    ``stages`` share one model, each with its own cache (one sequence each). Returns each
    sequence's logits ``(len(draft) + 1, V)``, bit-identical to scoring it alone with the C kernels.
    Each stage is counted one forward, with the batch's time shared by its tokens."""
    if not stages:
        return []
    model = stages[0].model
    if any(st.model is not model for st in stages):
        raise ValueError("score_batch needs stages of one model")
    t0 = time.perf_counter()
    prepared = [st.runner.prepare(i, d) for st, i, d in zip(stages, ids, drafts)]
    logits = model.forward_batch([(tokens, st.runner.cache) for st, (_, tokens) in zip(stages, prepared)])
    elapsed = time.perf_counter() - t0
    total = sum(len(tokens) for _, tokens in prepared)
    out = []
    for st, (full, tokens), lg, d in zip(stages, prepared, logits, drafts):
        st.runner.fed(full)
        st.count_call(len(tokens), elapsed * len(tokens) / total)
        out.append(lg[-(len(d) + 1) :])
    return out


def prefill_batch(stages: list[ModelStage], seqs: list[list[int]]) -> None:
    """:meth:`ModelStage.prefill` of several sequences (one per stage, stages of one model) in one forward."""
    todo = [(st, seq) for st, seq in zip(stages, seqs) if seq]
    if not todo:
        return
    prepared = [st.runner.prepare(seq) for st, seq in todo]
    todo[0][0].model.forward_batch([(tokens, st.runner.cache) for (st, _), (_, tokens) in zip(todo, prepared)], last_only=True)
    for (st, _), (full, _) in zip(todo, prepared):
        st.runner.fed(full)
