"""The interfaces of a cascade: what drafts, what reviews, and the counters each stage owns.

A *stage* is one model of the cascade: a neural model with its KV cache
(:class:`~.neural.ModelStage`), the tiny projection model (:class:`~.tiny.TinyStage`) or
the statistical MaG drafter (:class:`~.mag.MaG`). What a stage can do is what it
inherits:

* :class:`Drafter` - ``propose(ids, k, params, generator) -> (tokens, q)``: draft up to ``k``
  tokens after the committed sequence ``ids``; ``q`` is ``(len(tokens), V)`` (the distributions
  the tokens were drawn from) or None for a deterministic drafter. Also ``feedback(n_accepted)``
  (how many of the last proposal the stage above accepted), ``commit(n)`` (the first ``n``
  tokens of the sequence are final; caches may drop the rest), ``reset()`` (a new sequence),
  ``share_prefix(target, n)`` (start from the target's KV cache) and ``all_stats()``; each has a
  no-op default. A cascade level (``cascade.Level``) is a drafter made of stages.
* :class:`Stage` - a drafter that is one model, with the :class:`StageStats` it alone writes.
* :class:`Reviewer` - ``score(ids, draft) -> logits (len(draft) + 1, V)``: can verify drafts;
  ``greedy_next(ids)``: the argmax after ``ids`` alone, where the stage has a cheaper path for it.
* :class:`TreeDrafter` - ``propose_tree(ids, n_nodes, width) -> (tokens, parents)``.
* :class:`TreeScorer` - ``score_tree(ids, tokens, parents)`` and ``keep_path(ids, path, tokens)``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import asdict, dataclass

import torch

from ..sampling import SamplingParams



@dataclass
class StageStats:
    """Counters of one stage during one generation call, written by the stage's own methods only."""

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


class Drafter(ABC):
    """Anything that proposes tokens to the stage above it."""

    @property
    @abstractmethod
    def vocab_size(self) -> int: ...

    @abstractmethod
    def propose(
        self, ids: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
    ) -> tuple[list[int], torch.Tensor | None]: ...

    @abstractmethod
    def all_stats(self) -> list[StageStats]:
        """The counters of this drafter's stages, smallest stage first."""

    def feedback(self, n_accepted: int) -> None:
        """The stage above accepted ``n_accepted`` tokens of the last proposal."""

    def commit(self, n_committed: int) -> None:
        """The first ``n_committed`` tokens of the sequence are final."""

    def reset(self) -> None:
        """A new sequence starts."""

    def share_prefix(self, target: Reviewer, n: int) -> bool:
        """Start from ``target``'s KV cache for the first ``n`` positions; False where it cannot."""
        return False


class Stage(Drafter):
    """One model of the cascade, with its own counters (:attr:`stats`)."""

    attends = False  # does a forward attend over the context (and cost more as it grows)?

    def __init__(self, name: str) -> None:
        self.name = name
        self.stats = StageStats(name, attends=self.attends)

    def all_stats(self) -> list[StageStats]:
        return [self.stats]

    def reset(self) -> None:
        self.stats = StageStats(self.name, attends=self.attends)

    def feedback(self, n_accepted: int) -> None:
        self.stats.accepted += n_accepted

    def count_proposed(self, n: int) -> None:
        """``n`` more tokens were proposed in this stage's name (by a cascade level it reviews for)."""
        self.stats.proposed += n

    def count_call(self, tokens_in: int, seconds: float, forwards: int = 1) -> None:
        """One call of the stage's model (or lookup): ``tokens_in`` tokens fed, ``seconds`` spent."""
        st = self.stats
        st.forwards += forwards
        st.tokens_in += tokens_in
        st.seconds += seconds


class Reviewer(ABC):
    """A stage that scores drafts: next-token logits after ``ids[-1]`` and after each draft token."""

    @abstractmethod
    def score(self, ids: list[int], draft: list[int]) -> torch.Tensor: ...

    def greedy_next(self, ids: list[int]) -> int | None:
        """The argmax of ``score(ids, [])`` by a cheaper path where the stage has one, else None."""
        return None


class TreeDrafter(ABC):
    """A stage that drafts a token tree of ``n_nodes`` nodes, at most ``width`` per level."""

    @abstractmethod
    def propose_tree(self, ids: list[int], n_nodes: int, width: int) -> tuple[list[int], list[int]]: ...


class TreeScorer(ABC):
    """A stage that scores a token tree in one forward and keeps one of its paths."""

    @abstractmethod
    def score_tree(self, ids: list[int], tokens: list[int], parents: list[int]) -> torch.Tensor: ...

    @abstractmethod
    def keep_path(self, ids: list[int], path: list[int], tokens: list[int]) -> None: ...


def one_hot_rows(tokens: list[int], vocab_size: int) -> torch.Tensor:
    """(len(tokens), V) one-hot distributions: a deterministic drafter's ``q``."""
    q = torch.zeros(len(tokens), vocab_size)
    if tokens:
        q[torch.arange(len(tokens)), torch.tensor(tokens)] = 1.0
    return q
