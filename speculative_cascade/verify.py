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

import torch

from .sampling import sample


def verify_greedy(draft: list[int], target_logits: torch.Tensor) -> tuple[int, int]:
    """draft: k tokens; target_logits: (k + 1, V). Accept while the draft equals the target argmax."""
    assert target_logits.shape[0] == len(draft) + 1
    best = target_logits.argmax(-1).tolist()  # (k + 1,)
    n = 0
    while n < len(draft) and draft[n] == best[n]:
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
