"""Verification of drafted tokens: pure functions, one per rule.

Naming, fixed for the whole project: ``p`` is the verifying model's (the target's)
distribution, ``q`` the drafter's. A round drafts ``k`` tokens; verification returns how
many were *accepted* and one more token: the *recovered* token (drawn from the residual
after a rejection) or, when all ``k`` were accepted, the *bonus* token (from ``p`` at
position ``k``). The mean accepted length of a round counts that extra token.

References: Leviathan et al., "Fast Inference from Transformers via Speculative
Decoding" (ICML 2023), Algorithm 1; Chen et al., "Accelerating Large Language Model
Decoding with Speculative Sampling" (2023).
"""

from __future__ import annotations

import math

import torch

from .sampling import argmax_ids, sample


def verify_greedy(draft: list[int], target_logits: torch.Tensor, lenience: float = 1.0) -> tuple[int, int]:
    """draft: k tokens; target_logits: (k + 1, V). Accept while the draft equals the target argmax.

    ``lenience > 1`` (CSD's leniency; only ever used *below* the target) also accepts a
    token whose probability is within a factor ``lenience`` of the argmax's."""
    assert target_logits.shape[0] == len(draft) + 1
    best = argmax_ids(target_logits)  # (k + 1,)
    n = 0
    if lenience == 1.0:
        while n < len(draft) and draft[n] == best[n]:
            n += 1
        return n, best[n]
    k = len(draft)
    if k:
        margin = math.log(lenience)
        rows = target_logits[:k]
        ok = (rows.max(-1).values - rows[torch.arange(k), torch.tensor(draft)] <= margin).tolist()
        while n < k and ok[n]:
            n += 1
    return n, best[n]


def residual_distribution(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """norm(max(0, p - q)) for (V,) distributions; falls back to p if they coincide."""
    r = torch.clamp(p - q, min=0.0)
    total = r.sum()
    return r / total if total > 0 else p


def verify_sampling(
    draft: list[int],
    q: torch.Tensor | None,
    p: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Speculative sampling.

    draft: k tokens drawn from q; q: (k, V) drafter distributions, or None for a
    deterministic drafter (q is then one-hot on the drafted token); p: (k + 1, V) target
    distributions. Accept token i with probability min(1, p_i(x) / q_i(x)); on the first
    rejection draw from residual_distribution(p_i, q_i); if all are accepted draw the
    bonus token from p_k. The output is distributed exactly as p.
    """
    k = len(draft)
    assert p.shape[0] == k + 1 and (q is None or q.shape[0] == k)
    u = torch.rand(k, generator=generator).tolist() if k else []
    for i, x in enumerate(draft):
        px = float(p[i, x])
        qx = 1.0 if q is None else float(q[i, x])
        if qx > 0 and u[i] < min(1.0, px / qx):
            continue
        qi = q[i] if q is not None else torch.nn.functional.one_hot(torch.tensor(x), p.shape[-1]).to(p.dtype)
        return i, sample(residual_distribution(p[i], qi), generator)
    return k, sample(p[k], generator)


# -- token trees ---------------------------------------------------------------------------
# A tree of N drafted nodes after the last committed token (the root, index -1):
# ``tokens[i]`` with parent ``parents[i]`` (parents before children, siblings distinct).
# ``logits``/``p`` are (N + 1, V): row 0 scores the root's children, row i + 1 node i's.


def _children(parents: list[int]) -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for i, par in enumerate(parents):
        kids.setdefault(par, []).append(i)
    return kids


def verify_tree_greedy(tokens: list[int], parents: list[int], logits: torch.Tensor) -> tuple[list[int], int]:
    """Follow the target's argmax down the tree; return (accepted node path, next token)."""
    assert logits.shape[0] == len(tokens) + 1
    best = argmax_ids(logits)
    kids = _children(parents)
    node, path = -1, []  # type: tuple[int, list[int]]
    while True:
        t = best[node + 1]
        nxt = next((c for c in kids.get(node, ()) if tokens[c] == t), None)
        if nxt is None:
            return path, t
        path.append(nxt)
        node = nxt


def residual_after_rejection(r: torch.Tensor, x: int) -> torch.Tensor | None:
    """The residual of ``r`` after a one-hot drafter's token ``x`` was rejected: ``r`` without ``x``,
    renormalized; None when no mass is left (a probability-zero event)."""
    r = r.clone()
    r[x] = 0.0
    total = r.sum()
    return r / total if total > 0 else None


def verify_tree_sampling(
    tokens: list[int], parents: list[int], p: torch.Tensor, generator: torch.Generator | None
) -> tuple[list[int], int]:
    """Multi-candidate speculative sampling over a tree of deterministic candidates.

    At each node the children are tried in order: child x is accepted with probability
    r(x), where r starts as the target's p at that node and, after each rejection, is
    set to zero at the rejected token and renormalized (the residual for a one-hot
    drafter). If every child is rejected the next token is drawn from r. The emitted
    token at every step is distributed exactly as p (SpecInfer, Miao et al. 2024; SpecTr,
    Sun et al. 2023, with deterministic proposals)."""
    assert p.shape[0] == len(tokens) + 1
    kids = _children(parents)
    node, path = -1, []  # type: tuple[int, list[int]]
    while True:
        r = p[node + 1]
        accepted = None
        for c in kids.get(node, ()):
            x = tokens[c]
            if float(torch.rand(1, generator=generator)) < float(r[x]):
                accepted = c
                break
            rest = residual_after_rejection(r, x)
            if rest is None:  # all mass was on rejected tokens (probability zero event)
                r = p[node + 1]
                break
            r = rest
        if accepted is None:
            return path, sample(r, generator)
        path.append(accepted)
        node = accepted
