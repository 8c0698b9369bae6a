"""Stage 0 of the seed paper: the tiny projection model.

    h      = LayerNorm(W1 . x + b1)          x: the target's (frozen) token embedding
    P_tiny = softmax(W2 . ReLU(h) + b2)      (seed 003, section 4.2)

with ``W1: (hidden, d)``, ``W2: (V, hidden)``, ``hidden = 256``. It sees one token, so it is
a learned bigram model; trained by distillation from the draft or the target
(``speculative_cascade.distill``). Shipped checkpoints store ``W2`` in INT8 (per-row
scales) and not the embedding table, which is the target's own: a checkpoint records a
fingerprint of the embeddings it was trained on and refuses another target.

Because the output depends on the last token only, :class:`TinyStage` memoizes the greedy
proposal per token: after warm-up a greedy draft costs a dictionary lookup.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file

from ..engine.formats import Format, PackedWeight
from ..engine.transformer import Linear
from ..engine.quant import int8_weight
from ..errors import CascadeError
from ..sampling import sample, warp
from .base import Reviewer, Stage, TreeDrafter

HIDDEN = 256
FORMAT = "speculative_cascade.tiny/1"


def embedding_fingerprint(emb: torch.Tensor) -> list[float]:
    """A few numbers identifying an embedding table (shape and strided sums)."""
    e = emb.detach().float()
    return [float(e.shape[0]), float(e.shape[1]), float(e[::97].sum()), float(e[:, ::7].abs().sum())]


def fingerprint_matches(emb: torch.Tensor, fingerprint) -> bool:
    return all(abs(a - b) <= 1e-3 * max(1.0, abs(b)) for a, b in zip(embedding_fingerprint(emb), fingerprint))


def read_info(path: str | Path) -> dict:
    """The metadata of a tiny-model checkpoint (format, sizes, embedding fingerprint, ...)."""
    with safe_open(str(path), "pt") as f:
        return json.loads((f.metadata() or {}).get("tiny", "{}"))


class TinyProjection(nn.Module):
    """Embedding (frozen, shared with the target) -> Linear(d, 256) -> LayerNorm -> ReLU -> Linear(256, V)."""

    def __init__(self, embedding: torch.Tensor, hidden: int = HIDDEN) -> None:
        super().__init__()
        V, d = embedding.shape
        self.embedding = embedding.detach()  # (V, d), not a parameter: never trained, never saved
        self.proj = nn.Linear(d, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head: nn.Linear | Linear = nn.Linear(hidden, V)
        self.vocab_size, self.dim, self.hidden = V, d, hidden

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """tokens (N,) -> logits (N, V)."""
        x = F.embedding(tokens, self.embedding)  # (N, d)
        h = F.relu(self.norm(self.proj(x)))  # (N, hidden)
        return self.head(h).float()

    # -- checkpoints -----------------------------------------------------------------------
    def save(self, path: str | Path, *, int8: bool = True, meta: dict | None = None) -> None:
        sd = {
            "proj.weight": self.proj.weight,
            "proj.bias": self.proj.bias,
            "norm.weight": self.norm.weight,
            "norm.bias": self.norm.bias,
        }
        head = self.head
        assert head.bias is not None  # the head always has one
        if isinstance(head, Linear) or int8:
            packed = head.packed if isinstance(head, Linear) else int8_weight(head.weight)
            assert packed.sm is not None  # INT8 has a scale per row
            sd.update({"head.w_int8": packed.data, "head.scales": packed.sm[:, 0, 0], "head.bias": head.bias})
        else:
            sd.update({"head.weight": head.weight, "head.bias": head.bias})
        info = {
            "format": FORMAT,
            "vocab_size": self.vocab_size,
            "dim": self.dim,
            "hidden": self.hidden,
            "embedding_fingerprint": embedding_fingerprint(self.embedding),
            **(meta or {}),
        }
        sd = {k: v.detach().contiguous() for k, v in sd.items()}
        save_file(sd, str(path), metadata={"tiny": json.dumps(info)})

    @classmethod
    def load(cls, path: str | Path, embedding: torch.Tensor) -> "TinyProjection":
        path = Path(path)
        if not path.is_file():
            raise CascadeError(f"tiny model not found: {path}")
        try:
            with safe_open(str(path), "pt") as f:
                info = json.loads((f.metadata() or {}).get("tiny", "{}"))
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises several types on corrupt files
            raise CascadeError(f"{path}: not a tiny-model checkpoint ({e})") from e
        if info.get("format") != FORMAT:
            raise CascadeError(f"{path}: not a tiny-model checkpoint (format {info.get('format')!r})")
        V, d = embedding.shape
        if (info["vocab_size"], info["dim"]) != (V, d):
            raise CascadeError(
                f"vocabulary mismatch: the tiny model is for {info['vocab_size']} tokens x {info['dim']} dims, "
                f"the target has {V} x {d}"
            )
        if not fingerprint_matches(embedding, info["embedding_fingerprint"]):
            raise CascadeError(f"{path}: the tiny model was trained on another target's embeddings")
        m = cls(embedding, hidden=info["hidden"])
        m.proj.load_state_dict({"weight": sd["proj.weight"], "bias": sd["proj.bias"]})
        m.norm.load_state_dict({"weight": sd["norm.weight"], "bias": sd["norm.bias"]})
        if "head.w_int8" in sd:
            m.head = _int8_head(sd["head.w_int8"], sd["head.scales"], sd["head.bias"])
        else:
            m.head.load_state_dict({"weight": sd["head.weight"], "bias": sd["head.bias"]})
        m.info = info
        return m.eval()

    def quantize_head(self) -> "TinyProjection":
        """Store the output projection in INT8 (in place); returns self."""
        if not isinstance(self.head, Linear):
            self.head = Linear.from_packed(int8_weight(self.head.weight), self.head.bias)
        return self


def _int8_head(w_int8: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor) -> Linear:
    """The INT8 output projection (per-row scales), run by the engine's kernels."""
    packed = PackedWeight.int8(w_int8, scales[:, None])
    assert packed.fmt == Format.I8
    return Linear.from_packed(packed, bias)


class TinyStage(Stage, Reviewer, TreeDrafter):
    """The tiny projection model as a drafter (chain or tree) and as a (context-free) reviewer."""

    def __init__(self, model: TinyProjection, name: str = "tiny") -> None:
        super().__init__(name)
        self.model = model.eval()
        self._greedy: dict[int, int] = {}  # token -> argmax of the tiny model after it

    @property
    def vocab_size(self) -> int:
        return self.model.vocab_size

    @torch.inference_mode()
    def logits(self, tokens: list[int]) -> torch.Tensor:
        t0 = time.perf_counter()
        out = self.model(torch.tensor(tokens, dtype=torch.long))
        self.count_call(len(tokens), time.perf_counter() - t0)
        return out

    def score(self, ids: list[int], draft: list[int]) -> torch.Tensor:
        return self.logits([ids[-1]] + list(draft))

    def _next_greedy(self, tok: int) -> int:
        nxt = self._greedy.get(tok)
        if nxt is None:
            nxt = self._greedy[tok] = int(self.logits([tok])[0].argmax())
        return nxt

    def propose(self, ids, k, params, generator):
        t0, before = time.perf_counter(), self.stats.seconds
        tokens: list[int] = []
        qs = []
        last = ids[-1]
        for _ in range(k):
            if params.greedy:
                last = self._next_greedy(last)
            else:
                q = warp(self.logits([last])[0], params)
                last = sample(q, generator)
                qs.append(q)
            tokens.append(last)
        self.count_proposed(len(tokens))
        if params.greedy:  # the lookups' time; forwards counted their own
            self.count_call(0, time.perf_counter() - t0 - (self.stats.seconds - before), forwards=0)
        return tokens, (torch.stack(qs) if qs else None)

    @torch.inference_mode()
    def propose_tree(self, ids: list[int], n_nodes: int, width: int) -> tuple[list[int], list[int]]:
        """A token tree of ``n_nodes`` nodes: level by level, the ``width`` children with the
        highest cumulative log-probability among the top-``width`` children of every node
        of the level above. Returns (tokens, parents); parent -1 is ``ids[-1]``."""
        tokens: list[int] = []
        parents: list[int] = []
        frontier = [(-1, ids[-1], 0.0)]  # (node index, token, cumulative log-prob)
        while len(tokens) < n_nodes and frontier:
            logp = torch.log_softmax(self.logits([t for _, t, _ in frontier]), dim=-1)  # (F, V)
            top = torch.topk(logp, width, dim=-1)
            cand = []
            for f, (node, _, lp) in enumerate(frontier):
                for v, t in zip(top.values[f].tolist(), top.indices[f].tolist()):
                    cand.append((lp + v, node, t))
            cand.sort(key=lambda c: -c[0])
            frontier = []
            for lp, node, t in cand[: min(width, n_nodes - len(tokens))]:
                frontier.append((len(tokens), t, lp))
                tokens.append(t)
                parents.append(node)
        self.count_proposed(len(tokens))
        return tokens, parents
