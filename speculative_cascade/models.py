"""The seed README's API: ``TinyModel``, ``DraftModel``, ``TargetModel`` and ``CascadeInference``.

    from speculative_cascade import CascadeInference
    from speculative_cascade.models import TinyModel, DraftModel, TargetModel

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

from .errors import CascadeError


@dataclass
class TargetModel:
    model: object
    tokenizer: object
    name: str = "target"

    @classmethod
    def from_pretrained(cls, name: str = "default", *, progress: bool = True) -> "TargetModel":
        from .engine.loader import load_model

        lm = load_model(name, progress=progress)
        return cls(lm.model, lm.tokenizer, lm.name)


@dataclass
class DraftModel:
    model: object
    name: str = "draft"

    @classmethod
    def from_pretrained(cls, name: str = "default", *, quantize_int8: bool = False, progress: bool = True):
        from .engine.loader import load_model
        from .engine.quant import quantize_int8 as q8

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
        from .config import SHIPPED_TINY

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
        from .cascade import ChainRound, TreeRound, build_csd
        from .generator import SpeculativeGenerator
        from .stages.model import ModelStage
        from .stages.tiny import TinyProjection, TinyStage

        if speculation_horizon < 1 or tiny_k < 1:
            raise CascadeError("speculation_horizon and tiny_k must be >= 1")
        if mode not in ("chain", "tree"):
            raise CascadeError(f"mode must be 'chain' or 'tree', got {mode!r}")
        target_model = target_model or TargetModel.from_pretrained()
        self._gen = SpeculativeGenerator(target_model.model, None, target_model.tokenizer, max_len=max_len)
        target = self._gen.target
        stages = []
        if tiny_model is not None:
            emb = getattr(getattr(target, "tok_embeddings", None), "weight", None)
            if emb is None:
                raise CascadeError("the tiny model needs a native target")
            stages.append(TinyStage(TinyProjection.load(tiny_model.path, emb)))
        if draft_model is not None:
            if draft_model.model.vocab_size != target.vocab_size:
                raise CascadeError(
                    f"vocabulary mismatch: draft has {draft_model.model.vocab_size} tokens, target {target.vocab_size}"
                )
            stages.append(ModelStage(draft_model.model, self._gen.max_len, name="draft"))
        if not stages:
            self._round = None
        elif mode == "tree":
            if tiny_model is None:
                raise CascadeError("tree mode needs a tiny model to propose the tree")
            filt = stages[1] if len(stages) > 1 else None
            self._round = TreeRound(stages[0], filt, n_nodes=tree_nodes, width=tree_width, keep=speculation_horizon)
        else:
            ks = [tiny_k, speculation_horizon][-len(stages) :]
            n = len(stages)
            km = [[ks[n - 1 - i] if j == i else 0 for j in range(n)] for i in range(n)]
            drafter, k = build_csd(list(reversed(stages)), km)
            self._round = ChainRound(drafter, k)
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
