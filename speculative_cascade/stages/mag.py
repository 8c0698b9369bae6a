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
        self._buf, self._n = np.zeros(0, dtype=np.int64), 0  # the sequence so far, as an array

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def reset(self) -> None:
        super().reset()
        self.prompt_len = None
        self._n = 0

    def _array(self, ids) -> np.ndarray:
        """``ids`` as an int64 array. Within a generation the sequence only grows, so the tokens
        converted on an earlier call are kept and only the new ones are converted (a list of a
        thousand ids costs ~40 us to convert, once a round). After :meth:`reset`, or when ``ids``
        is shorter or differs in its first or last kept token, it is converted whole."""
        n, m, buf = len(ids), self._n, self._buf
        if not (0 < m <= n and int(ids[m - 1]) == buf[m - 1] and int(ids[0]) == buf[0]):
            m = 0
        if n > len(buf):
            grown = np.empty(max(2 * len(buf), n, 256), dtype=np.int64)
            grown[:m] = buf[:m]
            self._buf = buf = grown
        buf[m:n] = ids[m:n]
        self._n = n
        return buf[:n]

    def _match(self, arr: np.ndarray, end: int, k: int) -> tuple[list[int], int]:
        """Continuation (up to k tokens) of the longest suffix of ``arr`` found earlier in it, and
        how far back the chosen occurrence matches (its reach: at least the suffix's length, at
        most ``REACH``; 0 when nothing matched).

        Occurrences that start in the prompt win over those in the generated text; within
        a region the latest one wins. One pass over ``arr`` finds where its last token recurs
        (an occurrence's last position, which must leave a next token); longer suffixes are
        then checked on those positions only."""
        n = len(arr)
        ends = np.flatnonzero(arr[: n - 1] == arr[n - 1]) if n > 1 else arr[:0]
        matched = [ends]  # matched[L - 1]: the positions where the suffix of length L ends
        for L in range(2, min(self.max_ngram, n - 1) + 1):
            e = matched[-1]
            e = e[e >= L - 1]
            matched.append(e[arr[e - (L - 1)] == arr[n - L]])
        for L in range(len(matched), self.min_ngram - 1, -1):
            hits = matched[L - 1]
            if len(hits) == 0:
                continue
            in_prompt = hits[hits + 1 <= end]
            start = (in_prompt[-1] if len(in_prompt) else hits[-1]) + 1
            reach = L
            while reach < REACH and reach < start and arr[start - 1 - reach] == arr[n - 1 - reach]:
                reach += 1
            return arr[start : start + k].tolist(), reach
        return [], 0

    def propose(self, ids, k, params=None, generator=None):
        t0 = time.perf_counter()
        if self.prompt_len is None:
            self.prompt_len = len(ids)
        arr = self._array(ids)
        out: list[int] = []
        kinds: list[int] = []
        while len(out) < k:
            seq = np.concatenate([arr, np.asarray(out, dtype=np.int64)]) if out else arr
            cont, reach = self._match(seq, self.prompt_len, k - len(out))
            if not cont and self.bigram is not None:
                nxt = int(self.bigram.next[seq[-1]])
                cont = [nxt] if nxt >= 0 else []
            if not cont:
                break
            out.extend(cont)
            # a copied token's match reaches one further than the token before it (once that is accepted)
            kinds.extend(min(reach + i, REACH) if reach else 0 for i in range(len(cont)))
        self.kinds = kinds
        self.count_call(0, time.perf_counter() - t0)
        self.count_proposed(len(out))
        return out, None
