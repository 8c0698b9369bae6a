"""The cascade: vertical levels, horizontal drafting, and the two kinds of rounds.

Vocabulary (as in ``verify.py``): ``p`` is the verifying stage's distribution, ``q`` the
drafter's; a round drafts, verifies, accepts, and fixes up the caches.

* :class:`Horizontal` - drafters by position (Cascade Speculative Drafting's horizontal
  cascade): drafter ``i`` drafts until the proposal has ``sum(increments[:i + 1])`` tokens,
  so later positions, which are accepted less often, go to cheaper drafters.
* :class:`Level` - one vertical level: a stage whose proposals are drafted by the stages
  below it (a :class:`Horizontal`) and verified by it, one forward per review. Every
  level is lossless with respect to its own model: with sampling it returns the exact
  distributions its tokens were drawn from, which the level above uses as ``q``.
* :func:`build_csd` - the drafter tree described by CSD's ``k_matrix``.
* :class:`ChainRound` - the target verifies a drafter's ``k`` tokens in one forward.
* :class:`TreeRound` - the seed paper's Algorithm 1: stage 0 drafts a token tree, the
  draft scores it in one forward and keeps the best nodes, the target verifies that
  subtree in one forward and accepts the longest valid path.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from .errors import CascadeError
from .sampling import SamplingParams, warp
from .stages.base import Drafter, Reviewer, Stage, StageStats, TreeDrafter, TreeScorer, one_hot_rows
from .verify import verify_greedy, verify_sampling, verify_tree_greedy, verify_tree_sampling


def _stack_q(parts: list[tuple[list[int], torch.Tensor | None]], vocab_size: int) -> torch.Tensor | None:
    """Concatenate per-part drafter distributions; deterministic parts become one-hot rows."""
    if all(q is None for _, q in parts):
        return None
    rows = [q if q is not None else one_hot_rows(t, vocab_size) for t, q in parts if t]
    return torch.cat(rows) if rows else None


def _dedup(stats: list[StageStats]) -> list[StageStats]:
    seen, out = set(), []
    for s in stats:
        if id(s) not in seen:
            seen.add(id(s))
            out.append(s)
    return out


class Horizontal(Drafter):
    """Drafters by position: ``drafters[i]`` drafts until the proposal is ``cum[i]`` tokens long."""

    def __init__(self, drafters: list[Drafter], increments: list[int], vocab_size: int) -> None:
        if len(drafters) != len(increments) or not drafters:
            raise CascadeError("a horizontal cascade needs one increment per drafter")
        if any(k < 0 for k in increments) or sum(increments) < 1:
            raise CascadeError(f"increments must be >= 0 with a positive sum, got {increments}")
        self.drafters = drafters
        self.cum = [sum(increments[: i + 1]) for i in range(len(increments))]
        self._vocab_size = vocab_size
        self._last: list[tuple[Drafter, int]] = []  # (drafter, tokens) of the last proposal

    @property
    def total(self) -> int:
        return self.cum[-1]

    @property
    def vocab_size(self) -> int:
        return self._vocab_size

    def propose(self, ids, k, params, generator):
        out: list[int] = []
        parts = []
        self._last = []
        for d, c in zip(self.drafters, self.cum):
            want = min(c, k)
            while len(out) < want:
                t, q = d.propose(ids + out, want - len(out), params, generator)
                t = t[: want - len(out)]
                if not t:
                    break
                parts.append((t, q[: len(t)] if q is not None else None))
                self._last.append((d, len(t)))
                out.extend(t)
        return out, _stack_q(parts, self.vocab_size)

    def feedback(self, n_accepted: int) -> None:
        per: dict[int, tuple[Drafter, int]] = {}
        pos = 0
        for d, n in self._last:
            got = max(0, min(n, n_accepted - pos))
            prev = per.get(id(d), (d, 0))[1]
            per[id(d)] = (d, prev + got)
            pos += n
        for d, got in per.values():
            d.feedback(got)

    def commit(self, n_committed: int) -> None:
        for d in self.drafters:
            d.commit(n_committed)

    def reset(self) -> None:
        for d in self.drafters:
            d.reset()

    def share_prefix(self, target: Reviewer, n: int) -> bool:
        return any([d.share_prefix(target, n) for d in self.drafters])

    def all_stats(self) -> list[StageStats]:
        return _dedup([s for d in reversed(self.drafters) for s in d.all_stats()])


class Level(Drafter):
    """A stage whose tokens are drafted by ``drafters`` and verified by the stage itself.

    ``lenience`` (> 1, greedy only) loosens this level's review as in CSD; the target's
    review is never lenient, so the output is still the target's greedy output."""

    def __init__(self, stage: Stage, drafters: Horizontal, lenience: float = 1.0) -> None:
        if not isinstance(stage, Reviewer):
            raise CascadeError(f"stage {stage.name!r} cannot verify drafts")
        if lenience < 1.0:
            raise CascadeError(f"lenience must be >= 1, got {lenience}")
        self.stage = stage
        self.reviewer: Reviewer = stage
        self.drafters = drafters
        self.lenience = lenience

    @property
    def name(self) -> str:
        return self.stage.name

    @property
    def stats(self) -> StageStats:
        return self.stage.stats

    @property
    def vocab_size(self) -> int:
        return self.stage.vocab_size

    def propose(self, ids, k, params: SamplingParams, generator):
        if not params.greedy and self.lenience != 1.0:
            raise CascadeError("lenience > 1 is for greedy decoding only: with sampling it would not be lossless")
        out: list[int] = []
        qs: list[torch.Tensor] = []
        while len(out) < k:
            seq = ids + out
            # Draft one fewer than still needed: the review adds a recovered/bonus token.
            draft, q = (
                self.drafters.propose(seq, k - len(out) - 1, params, generator) if k - len(out) > 1 else ([], None)
            )
            if params.greedy:
                n, nxt = review_greedy(self.reviewer, seq, draft, self.lenience)
            else:
                p = warp(self.reviewer.score(seq, draft), params)  # (len(draft) + 1, V)
                n, nxt = verify_sampling(draft, q, p, generator)
                qs.append(p[: n + 1])
            self.drafters.feedback(n)
            out.extend(draft[:n])
            out.append(nxt)
            self.drafters.commit(len(ids) + len(out) - 1)
        self.stage.count_proposed(len(out))
        return out, (torch.cat(qs) if qs else None)

    def feedback(self, n_accepted: int) -> None:
        self.stage.feedback(n_accepted)

    def commit(self, n_committed: int) -> None:
        self.stage.commit(n_committed)
        self.drafters.commit(n_committed)

    def reset(self) -> None:
        self.stage.reset()
        self.drafters.reset()

    def share_prefix(self, target: Reviewer, n: int) -> bool:
        mine = self.stage.share_prefix(target, n)
        return self.drafters.share_prefix(target, n) or mine

    def all_stats(self) -> list[StageStats]:
        return _dedup(self.drafters.all_stats() + [self.stage.stats])


def check_k_matrix(k_matrix, n: int) -> list[list[int]]:
    """Validate CSD's ``k_matrix`` for ``n`` drafters: n x n non-negative ints, first row summing to >= 1."""
    try:
        m = [[int(x) for x in row] for row in k_matrix]
        ok = all(float(x) == int(x) for row in k_matrix for x in row)
    except (TypeError, ValueError) as e:
        raise CascadeError(f"k_matrix must be a matrix of integers ({e})") from e
    if not ok or len(m) != n or any(len(row) != n for row in m):
        raise CascadeError(f"k_matrix must be {n} x {n} integers for {n} drafters, got {k_matrix!r}")
    if any(x < 0 for row in m for x in row):
        raise CascadeError("k_matrix entries must be >= 0")
    if sum(m[0]) < 1:
        raise CascadeError("the first row of k_matrix (the target's) must draft at least one token")
    return m


def build_csd(drafters: list[Stage], k_matrix, lenience: float = 1.0) -> tuple[Drafter, int]:
    """The drafter for the target described by CSD's ``k_matrix``; returns (drafter, k).

    ``drafters`` are ordered largest first (as CSD's ``draft_list``). Row 0 of the matrix
    belongs to the target, row ``i + 1`` to ``drafters[i]``; entry ``[r][j]`` (j >= r) is the
    *increment* of tokens drafter ``j`` adds to the proposal of row ``r``'s model (so
    ``[[k1, 0], [0, k0]]`` is the vertical chain ``drafters[1] -> drafters[0] -> target`` and
    ``[[k]]`` plain speculative decoding). A drafter whose row is all zeros, or the last
    one, drafts by itself (autoregressively, or by lookup for MaG)."""
    if not drafters:
        raise CascadeError("the cascade needs at least one drafter")
    n = len(drafters)
    m = check_k_matrix(k_matrix, n)
    vocab = {d.vocab_size for d in drafters}
    if len(vocab) > 1:
        raise CascadeError(f"vocabulary mismatch between stages: {sorted(vocab)}")
    nodes: dict[int, Drafter] = {}

    def node(i: int) -> Drafter:
        if i not in nodes:
            row = m[i + 1][i + 1 :] if i + 1 < n else []
            if not any(row):
                nodes[i] = drafters[i]
            else:
                below = Horizontal([node(j) for j in range(i + 1, n)], row, drafters[i].vocab_size)
                nodes[i] = Level(drafters[i], below, lenience)
        return nodes[i]

    top = Horizontal([node(j) for j in range(n)], m[0], drafters[0].vocab_size)
    if n == 1:
        return top.drafters[0], m[0][0]
    return top, top.total


# -- rounds --------------------------------------------------------------------------------


@dataclass
class RoundResult:
    """What one round yields; the decoding loop records it (``GenerationStats.record``)."""

    tokens: list[int]  # the accepted drafts, then the recovered/bonus token
    drafted: int  # positions drafted (a tree: its depth)
    accepted: int  # of those, accepted by the target
    budget: int  # positions the round could have drafted (a drafter may propose fewer)
    draft_s: float = 0.0
    verify_s: float = 0.0


class Round(ABC):
    """One target verification and what precedes it. ``k``: positions a full round may draft."""

    k: int = 0

    @property
    def room(self) -> int:
        """Most tokens a round feeds the target beyond the committed sequence, plus one."""
        return self.k + 1

    def reset(self) -> None:
        """A new sequence starts."""

    def after_prefill(self, target: Reviewer, n: int) -> None:
        """The target's cache now holds the first ``n`` tokens of the prompt."""

    def commit(self, n: int) -> None:
        """The first ``n`` tokens of the sequence are final."""

    def stage_stats(self) -> list[StageStats]:
        """The drafting stages' counters, smallest stage first."""
        return []

    def finish(self) -> None:
        """The generation ended (a round that learns may keep what it measured)."""

    @abstractmethod
    def run(
        self, target: Stage, ids: list[int], budget: int, params: SamplingParams, generator: torch.Generator | None
    ) -> RoundResult:
        """Draft at most ``budget`` positions after ``ids``, verify them with ``target`` in one forward."""


@dataclass
class Proposal:
    """A chain round's draft, before the target has seen it."""

    tokens: list[int]
    q: torch.Tensor | None  # the drafter's distributions (sampling), None for greedy or deterministic drafts
    budget: int  # positions the round could have drafted
    draft_s: float = 0.0

    def result(self, accepted: int, nxt: int, verify_s: float) -> RoundResult:
        return RoundResult(self.tokens[:accepted] + [nxt], len(self.tokens), accepted, self.budget, self.draft_s, verify_s)


class ChainRound(Round):
    """The target verifies ``k`` tokens of ``drafter`` (None: autoregressive) in one forward.

    A round is :meth:`propose`, the target's scores of the proposal (:func:`verify_chain`, or one
    forward shared by several sequences), and :meth:`settle`."""

    def __init__(self, drafter: Drafter | None = None, k: int = 0) -> None:
        if drafter is not None and k < 1:
            raise CascadeError(f"k must be >= 1, got {k}")
        self.drafter, self.k = drafter, (k if drafter is not None else 0)

    def reset(self) -> None:
        if self.drafter is not None:
            self.drafter.reset()

    def after_prefill(self, target: Reviewer, n: int) -> None:
        if self.drafter is not None:
            self.drafter.share_prefix(target, n)

    def commit(self, n: int) -> None:
        if self.drafter is not None:
            self.drafter.commit(n)

    def stage_stats(self) -> list[StageStats]:
        return self.drafter.all_stats() if self.drafter is not None else []

    def propose(self, ids: list[int], budget: int, params: SamplingParams, generator) -> Proposal:
        """Draft at most ``min(k, budget)`` tokens after ``ids``."""
        k = min(self.k, budget)
        if k <= 0 or self.drafter is None:
            return Proposal([], None, max(k, 0))
        t1 = time.perf_counter()
        draft, q = draft_tokens(self.drafter, ids, k, params, generator)
        return Proposal(draft, q, k, time.perf_counter() - t1)

    def settle(self, proposal: Proposal, accepted: int, verify_s: float) -> None:
        """The target accepted ``accepted`` of the proposal's tokens, in a forward of ``verify_s`` seconds
        (this sequence's share of it when several shared the forward)."""
        if proposal.tokens and self.drafter is not None:
            self.drafter.feedback(accepted)

    def run(self, target, ids, budget, params, generator) -> RoundResult:
        prop = self.propose(ids, budget, params, generator)
        t1 = time.perf_counter()
        n, nxt = verify_chain(target, ids, prop.tokens, prop.q, params, generator)
        verify_s = time.perf_counter() - t1
        self.settle(prop, n, verify_s)
        return prop.result(n, nxt, verify_s)


def draft_tokens(
    drafter: Drafter, ids: list[int], k: int, params: SamplingParams, generator: torch.Generator | None
) -> tuple[list[int], torch.Tensor | None]:
    """At most ``k`` tokens of ``drafter``'s proposal after ``ids``, with their ``q`` rows."""
    draft, q = drafter.propose(ids, k, params, generator)
    draft = draft[:k]
    return draft, (q[: len(draft)] if q is not None else None)


def verify_chain(
    target: Stage | TreeScorer,
    ids: list[int],
    draft: list[int],
    q: torch.Tensor | None,
    params: SamplingParams,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """The target scores ``draft`` after ``ids`` in one forward; returns (accepted, recovered/bonus token)."""
    if not isinstance(target, Reviewer):
        raise CascadeError(f"the target stage {type(target).__name__} cannot verify drafts")
    if params.greedy:
        return review_greedy(target, ids, draft)
    return accept(draft, target.score(ids, draft), q, params, generator)


def review_greedy(reviewer: Reviewer, ids: list[int], draft: list[int], lenience: float = 1.0) -> tuple[int, int]:
    """A greedy review of ``draft`` after ``ids``: (accepted, recovered/bonus token). With nothing drafted,
    the reviewer's one-token step (``greedy_next``) where it has one: the same token."""
    if not draft:
        nxt = reviewer.greedy_next(ids)
        if nxt is not None:
            return 0, nxt
    return verify_greedy(draft, reviewer.score(ids, draft), lenience)


def accept(
    draft: list[int], logits: torch.Tensor, q: torch.Tensor | None, params: SamplingParams, generator
) -> tuple[int, int]:
    """Verify ``draft`` against the target's ``logits`` ``(len(draft) + 1, V)``: (accepted, recovered/bonus token)."""
    if params.greedy:
        return verify_greedy(draft, logits)
    return verify_sampling(draft, q, warp(logits, params), generator)


class TreeRound(Round):
    """Algorithm 1 of the seed paper (tree filter cascade).

    ``proposer`` (a :class:`TreeDrafter`, e.g. the tiny model) drafts ``n_nodes`` nodes, at most
    ``width`` per level; ``filter`` (a :class:`TreeScorer`, e.g. the INT8 draft) scores them in one
    forward, adds its own argmax child under each node it scored (the paper's "refinement"), and
    keeps the ``keep`` nodes with the highest cumulative log-probability under it - a subtree; the
    target verifies that subtree in one forward. Without a filter the target verifies the
    proposer's tree directly. Candidate choice never looks at the target, so verification stays
    lossless."""

    def __init__(self, proposer: Stage, filter: Stage | None = None, *, n_nodes: int = 32, width: int = 4, keep: int = 8):
        if not isinstance(proposer, TreeDrafter):
            raise CascadeError(f"stage {proposer.name!r} cannot draft a tree")
        if filter is not None and not isinstance(filter, TreeScorer):
            raise CascadeError(f"stage {filter.name!r} cannot score a tree")
        for name, v in (("tree nodes", n_nodes), ("tree width", width), ("tree keep", keep)):
            if v < 1:
                raise CascadeError(f"{name} must be >= 1, got {v}")
        if filter is None:
            keep = n_nodes
        self.proposer, self.filter = proposer, filter
        self.tree_drafter: TreeDrafter = proposer
        self.tree_filter: TreeScorer | None = filter
        self.n_nodes, self.width, self.keep = n_nodes, width, keep
        self.k = n_nodes

    @property
    def room(self) -> int:
        return max(self.n_nodes, self.keep) + 1

    def reset(self) -> None:
        self.proposer.reset()
        if self.filter is not None:
            self.filter.reset()

    def after_prefill(self, target: Reviewer, n: int) -> None:
        if self.filter is not None:
            self.filter.share_prefix(target, n)

    def commit(self, n: int) -> None:
        if self.filter is not None:
            self.filter.commit(n)

    def stage_stats(self) -> list[StageStats]:
        return [self.proposer.stats] + ([self.filter.stats] if self.filter is not None else [])

    @staticmethod
    def _depths(parents: list[int]) -> list[int]:
        depth: list[int] = []
        for par in parents:
            depth.append(1 if par < 0 else depth[par] + 1)
        return depth

    def _filter(self, scorer: TreeScorer, ids, tokens, parents):
        """Score the tree with the filter stage; return the kept subtree (tokens, parents)."""
        logp = torch.log_softmax(scorer.score_tree(ids, tokens, parents), dim=-1)  # (N + 1, V)
        n_proposed = len(tokens)  # the proposer's nodes; refinement nodes are appended after them
        cum = [0.0] * len(tokens)
        for i, (t, par) in enumerate(zip(tokens, parents)):
            cum[i] = (cum[par] if par >= 0 else 0.0) + float(logp[par + 1, t])
        tokens, parents = list(tokens), list(parents)
        have = {(par, t) for t, par in zip(tokens, parents)}
        best = logp.argmax(-1).tolist()
        for node in range(-1, len(cum)):  # refinement: the filter's own next token under each node
            t = best[node + 1]
            if (node, t) not in have:
                tokens.append(t)
                parents.append(node)
                cum.append((cum[node] if node >= 0 else 0.0) + float(logp[node + 1, t]))
        order = sorted(range(len(tokens)), key=lambda i: (-cum[i], i))[: self.keep]
        kept = sorted(order)  # parents keep coming before children
        index = {old: new for new, old in enumerate(kept)}
        self.proposer.feedback(sum(1 for i in kept if i < n_proposed))  # the filter kept these
        return [tokens[i] for i in kept], [index[parents[i]] if parents[i] >= 0 else -1 for i in kept]

    def run(self, target, ids, budget, params, generator) -> RoundResult:
        if not isinstance(target, TreeScorer):
            raise CascadeError(f"the target stage {target.name!r} cannot verify a tree")
        if budget < 1:
            return RoundResult([verify_chain(target, ids, [], None, params, generator)[1]], 0, 0, 0)
        t1 = time.perf_counter()
        tokens, parents = self.tree_drafter.propose_tree(ids, self.n_nodes, self.width)
        if self.tree_filter is not None:
            tokens, parents = self._filter(self.tree_filter, ids, tokens, parents)
        depth = self._depths(parents)
        keep = [i for i in range(len(tokens)) if depth[i] <= budget]  # a subtree: depth grows along paths
        if len(keep) < len(tokens):
            index = {old: new for new, old in enumerate(keep)}
            tokens = [tokens[i] for i in keep]
            parents = [index[parents[i]] if parents[i] >= 0 else -1 for i in keep]
            depth = [depth[i] for i in keep]
        draft_s = time.perf_counter() - t1
        t1 = time.perf_counter()
        logits = target.score_tree(ids, tokens, parents)  # (N + 1, V)
        if params.greedy:
            path, nxt = verify_tree_greedy(tokens, parents, logits)
        else:
            path, nxt = verify_tree_sampling(tokens, parents, warp(logits, params), generator)
        target.keep_path(ids, path, tokens)
        verify_s = time.perf_counter() - t1
        if self.filter is not None:
            self.filter.count_proposed(len(tokens))
            self.filter.feedback(len(path))
        else:
            self.proposer.feedback(len(path))
        depth_max = max(depth, default=0)
        return RoundResult(
            [tokens[j] for j in path] + [nxt], depth_max, len(path), min(budget, self.n_nodes), draft_s, verify_s
        )
