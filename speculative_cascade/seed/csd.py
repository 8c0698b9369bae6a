"""Cascade Speculative Drafting's entry point, with its signature (seed 004)::

    from speculative_cascade.seed.csd import csd, get_mag_model
    draft_list = [draft_model, get_mag_model(bigram_path, vocab_size)]   # largest first, MaG last
    res = csd(draft_list, target_model, initial_input, input_ids, k_matrix=[[13, 10], [0, 10]], max_length=200)

``k_matrix`` entries are increments (see :func:`~speculative_cascade.cascade.build_csd`);
``lenience`` applies to the drafters' reviews only, never to the target's, so greedy
output is the target's. Returns ``input_ids`` followed by the new tokens, shape (1, T + n).
"""

from __future__ import annotations

import torch

from ..builder import build_round
from ..cascade import check_k_matrix
from ..config import CascadeConfig
from ..decoding import StopChecker, generate_tokens
from ..engine.loader import as_model
from ..errors import CascadeError
from ..sampling import SamplingParams
from ..stages.base import Stage
from ..stages.mag import BigramTable, MaG
from ..stages.neural import ModelStage


def get_mag_model(bigram_path: str | None, vocab_size: int) -> MaG:
    """MaG with the bigram table at ``bigram_path`` (None: suffix matching only)."""
    return MaG(vocab_size, BigramTable.load(bigram_path) if bigram_path else None)


def _as_stage(obj, max_len: int, name: str) -> Stage:
    """A drafter of CSD's ``draft_list``: a stage (MaG), a model, or a seed ``DraftModel`` holding one."""
    if isinstance(obj, Stage):
        return obj
    model, _ = as_model(getattr(obj, "model", obj))
    return ModelStage(model, max_len, name=name)


def csd(
    draft_list: list,
    target_model,
    initial_input=None,
    input_ids=None,
    k_matrix=((5,),),
    max_length: int = 200,
    lenience: float = 1.0,
    *,
    temperature: float = 0.0,
    seed: int | None = None,
    max_len: int = 2048,
) -> torch.Tensor:
    """Generate up to ``max_length`` new tokens with CSD; ``initial_input`` is accepted for
    CSD's encoder-decoder signature and unused (decoder-only models)."""
    if input_ids is None:
        input_ids = initial_input
    if input_ids is None:
        raise CascadeError("input_ids are required")
    ids = input_ids.tolist() if isinstance(input_ids, torch.Tensor) else list(input_ids)
    if ids and isinstance(ids[0], list):
        if len(ids) != 1:
            raise CascadeError("csd generates for one sequence at a time (batch size 1)")
        ids = ids[0]
    target, _ = as_model(getattr(target_model, "model", target_model))
    if not draft_list:
        raise CascadeError("the cascade needs at least one drafter")
    drafters = [_as_stage(d, max_len, f"draft{i}") for i, d in enumerate(draft_list)]
    matrix = check_k_matrix(k_matrix, len(drafters))
    config = CascadeConfig(  # stages smallest first; CSD's draft_list is largest first
        stages=tuple(d.name for d in reversed(drafters)),
        k_matrix=tuple(tuple(row) for row in matrix),
        lenience=lenience,
    )
    rnd, _ = build_round(config, target, max_len, stages=list(reversed(drafters)))
    out, stats = generate_tokens(
        ModelStage(target, max_len, name="target"),
        ids,
        round=rnd,
        max_new_tokens=max_length,
        params=SamplingParams(temperature=temperature, seed=seed),
        stop=StopChecker(getattr(target, "eos_token_ids", ())),
    )
    csd.last_stats = stats
    return torch.tensor([ids + out])
