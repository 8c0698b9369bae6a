"""MaG, the statistical drafter of Cascade Speculative Drafting (Chen et al., 2023).

It costs a lookup, no model: the continuation of the longest suffix match of the
sequence, searched in the prompt first and then in the generated text (as prompt
lookup decoding does), and where nothing matches, a bigram table: the most frequent
next token after the last one. The bigram table is built from token sequences (a text
file, or the target's own generations) and saved as a ``.npz`` file.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from ..errors import CascadeError
from .base import Stage


REACH = 16  # longest match a proposal's source reports (``MaG.kinds``)


class BigramTable:
    """``next[t]``: the most frequent token after token ``t`` (-1 where ``t`` was never seen)."""

    def __init__(self, next_token: np.ndarray) -> None:
        self.next = np.asarray(next_token, dtype=np.int64)

    @property
    def vocab_size(self) -> int:
        return len(self.next)

    @classmethod
    def from_sequences(cls, sequences, vocab_size: int) -> "BigramTable":
        counts: dict[tuple[int, int], int] = {}
        for seq in sequences:
            for a, b in zip(seq[:-1], seq[1:]):
                counts[(a, b)] = counts.get((a, b), 0) + 1
        best = np.full(vocab_size, -1, dtype=np.int64)
        best_n = np.zeros(vocab_size, dtype=np.int64)
        for (a, b), n in counts.items():
            if n > best_n[a] or (n == best_n[a] and b < best[a]):
                best[a], best_n[a] = b, n
        return cls(best)

    def save(self, path: str | Path) -> None:
        np.savez_compressed(path, next=self.next)

    @classmethod
    def load(cls, path: str | Path) -> "BigramTable":
        try:
            with np.load(path) as f:
                return cls(f["next"])
        except (OSError, KeyError, ValueError) as e:
            raise CascadeError(f"{path}: not a bigram table ({e})") from e


class SuffixIndex:
    """Where each n-gram (``min_ngram..max_ngram`` tokens) of a sequence last ended, kept as the sequence
    grows: the lookup of :class:`MaG` in a few dictionary reads a round instead of a scan of the
    whole sequence (measured on the 13 Spec-Bench prompts: ~60-100 us a round with numpy scans,
    at a context of 50-800 tokens, against the ~5 ms of the target's forward it sits beside).

    ``last[L - 1][gram]`` is ``(p_prompt, p)``: the latest end ``p`` of ``gram`` whose next token
    is in the prompt (``p + 1 <= end``; -1 if none) and the latest end overall. Only ends that
    have a next token are indexed (``p <= len(seq) - 2``). Each added end records what it
    replaced, so the sequence can be cut back (a draft's tokens appended for one lookup, or a
    caller that rolls back) in the time of the ends removed."""

    def __init__(self, max_ngram: int, end: int, min_ngram: int = 1) -> None:
        self.max_ngram, self.min_ngram, self.end = max_ngram, min_ngram, end
        self.seq: list[int] = []
        self.last: list[dict[tuple, tuple[int, int]]] = [{} for _ in range(max_ngram)]  # shorter than min_ngram: empty
        self._undo: list[list[tuple]] = []  # per indexed end p: (L, gram, what it replaced)

    def extend(self, tokens) -> None:
        seq = self.seq
        seq.extend(tokens)
        for p in range(len(self._undo), len(seq) - 1):
            undo = []
            for L in range(self.min_ngram, min(self.max_ngram, p + 1) + 1):
                gram = tuple(seq[p - L + 1 : p + 1])
                table = self.last[L - 1]
                old = table.get(gram)
                table[gram] = (p if p + 1 <= self.end else (old[0] if old else -1), p)
                undo.append((L, gram, old))
            self._undo.append(undo)

    def truncate(self, n: int) -> None:
        """Cut the sequence back to its first ``n`` tokens."""
        while len(self._undo) > max(n - 1, 0):
            for L, gram, old in reversed(self._undo.pop()):
                if old is None:
                    del self.last[L - 1][gram]
                else:
                    self.last[L - 1][gram] = old
        del self.seq[n:]

    def match(self, k: int) -> tuple[list[int], int]:
        """Continuation (up to k tokens) of the longest suffix of the sequence (``max_ngram`` down to
        ``min_ngram`` tokens) found earlier in it, and how far back the chosen occurrence matches
        (its reach: at least the suffix's length, at most ``REACH``; 0 when nothing matched).

        Occurrences whose next token is in the prompt win over those in the generated text;
        within a region the latest one wins."""
        seq = self.seq
        n = len(seq)
        for L in range(min(self.max_ngram, n - 1), self.min_ngram - 1, -1):
            hit = self.last[L - 1].get(tuple(seq[n - L :]))
            if hit is None:
                continue
            start = (hit[0] if hit[0] >= 0 else hit[1]) + 1
            reach = L
            while reach < REACH and reach < start and seq[start - 1 - reach] == seq[n - 1 - reach]:
                reach += 1
            return seq[start : start + k], reach
        return [], 0


class MaG(Stage):
    """Deterministic drafter: suffix match in the prompt, then in the generated text, then bigrams."""

    def __init__(
        self,
        vocab_size: int,
        bigram: BigramTable | None = None,
        *,
        max_ngram: int = 4,
        min_ngram: int = 1,
        name: str = "mag",
    ) -> None:
        if bigram is not None and bigram.vocab_size != vocab_size:
            raise CascadeError(
                f"vocabulary mismatch: the bigram table has {bigram.vocab_size} tokens, the target {vocab_size}"
            )
        if not 1 <= min_ngram <= max_ngram:
            raise CascadeError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        super().__init__(name)
        self._vocab_size = vocab_size
        self.bigram = bigram
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self.prompt_len: int | None = None
        self.kinds: list[int] = []  # the last proposal's sources: per token, how far back its match reaches (0: bigram)
        self._index: SuffixIndex | None = None  # the sequence so far, indexed
        self._last: tuple = (None, 0, 0)  # the last call's sequence, its length and how many tokens it proposed

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def reset(self) -> None:
        super().reset()
        self.prompt_len = None
        self._index = None
        self._last = (None, 0, 0)

    def _indexed(self, ids, end: int) -> SuffixIndex:
        """The index over ``ids``. Within a generation the sequence grows (and a caller may roll back
        the tokens after the committed ones), so the index is cut back to what it shares with
        ``ids`` and extended by the rest; it is rebuilt after :meth:`reset`, or for a new prompt
        (``end``: its length).
        The same list object as on the last call, longer, is taken to have grown at its end (as a
        decoding loop's sequence does) and is not compared again."""
        if not isinstance(ids, list):
            ids = [int(t) for t in ids]
        idx = self._index
        if idx is None or idx.end != end or not ids or not idx.seq or ids[0] != idx.seq[0]:
            idx = self._index = SuffixIndex(self.max_ngram, end, self.min_ngram)
        seq = idx.seq
        m = min(len(seq), len(ids))
        last, n_last, _ = self._last
        if ids is last and 0 < n_last == m == len(seq) and ids[m - 1] == seq[m - 1]:
            pass  # the caller's sequence grew in place since the last call (a decoding loop's)
        elif ids[:m] != seq[:m]:  # where they part (a comparison in C: ~5 us at 800 tokens)
            m = next(i for i in range(m) if ids[i] != seq[i])
        idx.truncate(m)
        idx.extend(ids[m:])
        return idx

    def propose(self, ids, k, params=None, generator=None):
        t0 = time.perf_counter()
        if self.prompt_len is None:
            self.prompt_len = len(ids)
        idx = self._indexed(ids, self.prompt_len)
        n = len(idx.seq)
        out: list[int] = []
        kinds: list[int] = []
        while len(out) < k:
            cont, reach = idx.match(k - len(out))
            if not cont and self.bigram is not None:
                nxt = int(self.bigram.next[idx.seq[-1]])
                cont = [nxt] if nxt >= 0 else []
            if not cont:
                break
            out.extend(cont)
            if len(out) < k:
                idx.extend(cont)  # the next lookup continues after the proposal
            # a copied token's match reaches one further than the token before it (once that is accepted)
            kinds.extend(min(reach + i, REACH) if reach else 0 for i in range(len(cont)))
        idx.truncate(n)
        self.kinds = kinds
        # the same sequence asked again for more tokens (a round that read the first one first):
        # one proposal, counted once
        again = ids is self._last[0] and n == self._last[1]
        self.count_call(0, time.perf_counter() - t0, forwards=0 if again else 1)
        self.count_proposed(len(out) - (self._last[2] if again else 0))
        self._last = (ids, n, len(out))
        return out, None
