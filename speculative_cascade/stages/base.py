"""The stage interface shared by every drafter and verifier of a cascade.

A *stage* is one model of the cascade: a neural model with its KV cache
(:class:`~.model.ModelStage`), the tiny projection model (:class:`~.tiny.TinyStage`) or
the statistical MaG drafter (:class:`~.mag.MaG`). The decoding loop talks to stages
through these methods only:

* ``propose(ids, k, params, generator) -> (tokens, q)``: draft up to ``k`` tokens after
  the committed sequence ``ids``; ``q`` is ``(len(tokens), V)`` (the distributions the
  tokens were drawn from) or None for a deterministic drafter;
* ``feedback(n_accepted)``: how many of the last proposal the stage above accepted;
* ``commit(n)``: the first ``n`` tokens of the sequence are final (caches may drop the rest);
* ``reset()``: a new sequence starts.

Stages that can also *review* (score proposals of the stages below them) have
``score(ids, draft) -> logits (len(draft) + 1, V)``; stages that can draft a tree have
``propose_tree``; stages that score trees have ``score_tree`` (see ``cascade.py``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Protocol

import torch

from ..sampling import SamplingParams


@dataclass
class StageStats:
    """Counters of one stage during one generation call."""

    name: str
    forwards: int = 0  # calls of the stage's model (or lookups for a statistical stage)
    tokens_in: int = 0  # tokens fed to those calls
    proposed: int = 0  # tokens this stage proposed to the stage above it
    accepted: int = 0  # of those, accepted by the stage above
    seconds: float = 0.0  # time inside the stage's own calls
    attends: bool = False  # the stage attends over the context (its forwards cost more as the context grows)

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "acceptance_rate": self.acceptance_rate}


class Drafter(Protocol):
    """Anything that proposes tokens to the stage above it."""

    def propose(
        self, ids: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]: ...

    def commit(self, n_committed: int) -> None: ...

    def reset(self) -> None: ...


def drafter_stats(drafter) -> list[StageStats]:
    """The statistics of a drafter and every stage below it, smallest stage first."""
    if drafter is None:
        return []
    fn = getattr(drafter, "all_stats", None)
    if fn is not None:
        return fn()
    st = getattr(drafter, "stats", None)
    return [st] if st is not None else []


def feedback(drafter, n_accepted: int) -> None:
    fn = getattr(drafter, "feedback", None)
    if fn is not None:
        fn(n_accepted)


def one_hot_rows(tokens: list[int], vocab_size: int) -> torch.Tensor:
    """(len(tokens), V) one-hot distributions: a deterministic drafter's ``q``."""
    q = torch.zeros(len(tokens), vocab_size)
    if tokens:
        q[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
    return q
