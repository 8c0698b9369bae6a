"""The seed README's API: ``TinyModel``, ``DraftModel``, ``TargetModel`` and ``CascadeInference``.

    from speculative_cascade import CascadeInference
    from speculative_cascade.seed.inference import TinyModel, DraftModel, TargetModel

    target = TargetModel.from_pretrained("default")             # embedded SmolLM2-135M-Instruct
    draft = DraftModel.from_pretrained("default", quantize_int8=True)
    tiny = TinyModel.from_pretrained("default")                  # the shipped distilled tiny model
    cascade = CascadeInference(tiny_model=tiny, draft_model=draft, target_model=target, speculation_horizon=8)
    print(cascade.generate("The future of AI is", max_tokens=100))

Model names are the CLI's: 'default', a .gguf file, a model directory or a hub id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..builder import SHIPPED_TINY, build_round
from ..config import CascadeConfig
from ..engine.loader import load_model
from ..engine.quant import quantize_int8 as q8
from ..engine.transformer import Transformer
from ..errors import CascadeError
from ..generator import SpeculativeGenerator
from ..stages.base import Stage
from ..stages.neural import ModelStage
from ..stages.tiny import TinyProjection, TinyStage


@dataclass
class TargetModel:
    model: object
    tokenizer: object
    name: str = "target"

    @classmethod
    def from_pretrained(cls, name: str = "default", *, progress: bool = True) -> "TargetModel":
        lm = load_model(name, progress=progress)
        return cls(lm.model, lm.tokenizer, lm.name)


@dataclass
class DraftModel:
    model: object
    name: str = "draft"

    @classmethod
    def from_pretrained(cls, name: str = "default", *, quantize_int8: bool = False, progress: bool = True):
        lm = load_model(name, progress=progress)
        model = lm.model
        if quantize_int8:
            try:
                model = q8(model)
            except ValueError as e:
                raise CascadeError(f"cannot quantize {name}: {e}") from e
        return cls(model, f"{lm.name}{'-int8' if quantize_int8 else ''}")


@dataclass
class TinyModel:
    """A tiny projection model checkpoint; bound to the target's embeddings when the cascade is built."""

    path: Path

    @classmethod
    def from_pretrained(cls, name: str = "default") -> "TinyModel":
        path = SHIPPED_TINY if name in (None, "", "default") else Path(name)
        if not path.is_file():
            raise CascadeError(f"tiny model not found: {path}")
        return cls(path)


class CascadeInference:
    """Tiny -> Draft -> Target (any of tiny/draft may be None), chain or tree mode.

    Args:
        speculation_horizon: tokens the draft proposes per target verification (chain),
            or the nodes the draft keeps for the target (tree).
        tiny_k: tokens the tiny model proposes per draft review (chain).
        mode: "chain" (vertical cascade) or "tree" (the seed paper's Algorithm 1).
    """

    def __init__(
        self,
        tiny_model: TinyModel | None = None,
        draft_model: DraftModel | None = None,
        target_model: TargetModel | None = None,
        *,
        speculation_horizon: int = 8,
        tiny_k: int = 2,
        mode: str = "chain",
        tree_nodes: int = 32,
        tree_width: int = 4,
        max_len: int = 2048,
    ) -> None:
        if speculation_horizon < 1 or tiny_k < 1:
            raise CascadeError("speculation_horizon and tiny_k must be >= 1")
        if mode not in ("chain", "tree"):
            raise CascadeError(f"mode must be 'chain' or 'tree', got {mode!r}")
        target_model = target_model or TargetModel.from_pretrained()
        self._gen = SpeculativeGenerator(target_model.model, None, target_model.tokenizer, max_len=max_len)
        target = self._gen.target
        stages: list[Stage] = []
        if tiny_model is not None:
            if not isinstance(target, Transformer):
                raise CascadeError("the tiny model needs a native target")
            stages.append(TinyStage(TinyProjection.load(tiny_model.path, target.tok_embeddings.weight)))
        if draft_model is not None:
            if draft_model.model.vocab_size != target.vocab_size:
                raise CascadeError(
                    f"vocabulary mismatch: draft has {draft_model.model.vocab_size} tokens, target {target.vocab_size}"
                )
            stages.append(ModelStage(draft_model.model, self._gen.max_len, name="draft"))
        names = tuple(s.name for s in stages)
        if not stages:
            config = None
        elif mode == "tree":
            if tiny_model is None:
                raise CascadeError("tree mode needs a tiny model to propose the tree")
            config = CascadeConfig(
                stages=names, mode="tree", tree_nodes=tree_nodes, tree_width=tree_width, tree_keep=speculation_horizon
            )
        else:
            config = CascadeConfig(stages=names, k=(tiny_k, speculation_horizon)[-len(stages) :])
        self._round = build_round(config, target, self._gen.max_len, stages=stages)[0] if stages else None
        self._gen.set_round(self._round)

    @property
    def tokenizer(self):
        return self._gen.tokenizer

    def generate(self, prompt: str, max_tokens: int = 100, **kwargs) -> str:
        """Generate up to ``max_tokens`` new tokens; keyword arguments as ``SpeculativeGenerator.generate_ids``."""
        return self._gen.generate(prompt, max_new_tokens=max_tokens, **kwargs)

    def get_stats(self) -> dict:
        """Last call's statistics, with ``stages`` (per-stage forwards, acceptance, time) and ``gammas``."""
        return self._gen.get_stats()
