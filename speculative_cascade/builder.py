"""The one place that turns a cascade configuration into stages and a round.

Every caller builds here: the CLI and :class:`~.generator.SpeculativeGenerator` (through
:func:`build_round`), ``cascade tune``, the bench, and the seed APIs (which pass stages they
built from their own model objects). A stage spec is ``KIND[:ARG]``, one of
:data:`STAGE_KINDS`, or a model (a .gguf file, a model directory, a hub id) used as a neural
draft:

* ``int8`` - an INT8 copy of the target; ``int4`` - a 4-bit copy (groups of 32 with scale and
  min, INT8 output projection);
* ``fp32`` - the target's own weights with a cache of their own (the "no INT8" ablation);
* ``layers:N[:V]`` - the target's first N layers, weights shared, the head cut to the first V tokens;
* ``tiny`` - the tiny projection model shipped for the embedded target, or ``tiny:PATH``;
* ``mag`` - MaG with the shipped bigram table for the embedded target, ``mag:PATH`` with another,
  ``mag:none`` with suffix matches only (``mag_min_ngram`` sets the shortest match it proposes).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from .adaptive import AdaptiveRound, Calibration
from .cascade import ChainRound, Round, TreeRound, build_csd
from .config import CascadeConfig
from .engine import kernels
from .engine.hf_fallback import HFCausalLM
from .engine.loader import as_model, cache_dir
from .engine.quant import quantize_int4, quantize_int8, truncated
from .engine.transformer import Transformer
from .errors import CascadeError
from .stages.base import Stage
from .stages.mag import BigramTable, MaG
from .stages.neural import ModelStage
from .stages.tiny import TinyProjection, TinyStage, fingerprint_matches, read_info

DATA = Path(__file__).parent / "data"
SHIPPED_TINY = DATA / "tiny-smollm2-135m-instruct.safetensors"
SHIPPED_BIGRAM = DATA / "bigram-smollm2-135m-instruct.npz"


@dataclass
class BuildContext:
    """What every stage factory gets: the target, the cache size, and models shared between builds."""

    target: Transformer | HFCausalLM
    max_len: int
    mag_min_ngram: int = 1
    progress: bool = True
    shared: dict = field(default_factory=dict)  # e.g. one INT8 copy of the target for every cascade using it


def _native(ctx: BuildContext, what: str) -> Transformer:
    if not isinstance(ctx.target, Transformer):
        raise CascadeError(f"the {what} needs a native target (Llama, Mistral or Qwen2 family)")
    return ctx.target


def _quantized(kind: str, quantize: Callable[[Transformer], Transformer]):
    def make(arg: str, ctx: BuildContext) -> Stage:
        target = _native(ctx, f"{kind.upper()} self-draft")
        if kind not in ctx.shared:
            ctx.shared[kind] = quantize(target)
        return ModelStage(ctx.shared[kind], ctx.max_len, name=kind)

    return make


def _fp32(arg: str, ctx: BuildContext) -> Stage:
    return ModelStage(ctx.target, ctx.max_len, name="fp32")


def _layers(arg: str, ctx: BuildContext) -> Stage:
    target = _native(ctx, "layers draft")
    n, _, v = arg.partition(":")
    try:
        model = truncated(target, int(n), int(v) if v else None)
    except ValueError as e:
        raise CascadeError(f"stage 'layers:{arg}': {e}") from None
    return ModelStage(model, ctx.max_len, name=f"layers:{arg}")


def _tiny(arg: str, ctx: BuildContext) -> Stage:
    if not isinstance(ctx.target, Transformer):
        raise CascadeError("the tiny model needs a native target (it uses the target's token embeddings)")
    path = Path(arg) if arg else SHIPPED_TINY
    if not arg and not path.is_file():
        raise CascadeError("no tiny model is shipped for this target; train one with 'cascade distill'")
    return TinyStage(TinyProjection.load(path, ctx.target.tok_embeddings.weight), name="tiny")


def _mag(arg: str, ctx: BuildContext) -> Stage:
    vocab = ctx.target.vocab_size
    bigram = None
    if arg and arg.lower() != "none":
        bigram = BigramTable.load(arg)
    elif not arg and SHIPPED_BIGRAM.is_file() and is_default_target(ctx.target):
        shipped = BigramTable.load(SHIPPED_BIGRAM)
        bigram = shipped if shipped.vocab_size == vocab else None
    return MaG(vocab, bigram, min_ngram=ctx.mag_min_ngram, max_ngram=max(4, ctx.mag_min_ngram), name="mag")


# kind -> (factory(arg, ctx), how it is written)
STAGE_KINDS: dict[str, tuple[Callable[[str, BuildContext], Stage], str]] = {
    "int8": (_quantized("int8", quantize_int8), "int8"),
    "int4": (_quantized("int4", quantize_int4), "int4"),
    "fp32": (_fp32, "fp32"),
    "layers": (_layers, "layers:N[:V]"),
    "tiny": (_tiny, "tiny[:PATH]"),
    "mag": (_mag, "mag[:PATH|none]"),
}


def build_stage(spec: str, ctx: BuildContext) -> Stage:
    """One drafting stage from its spec (see the module docstring)."""
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    if kind in STAGE_KINDS:
        return STAGE_KINDS[kind][0](arg, ctx)
    if not (Path(spec).exists() or spec.endswith(".gguf") or "/" in spec):
        kinds = ", ".join(form for _, form in STAGE_KINDS.values())
        raise CascadeError(
            f"unknown stage {spec!r}: expected {kinds}, or a model (a .gguf file, a model directory, "
            "a hub id like org/name)"
        )
    model, _ = as_model(spec, progress=ctx.progress)
    if model.vocab_size != ctx.target.vocab_size:
        raise CascadeError(
            f"vocabulary mismatch: {spec} has {model.vocab_size} tokens, the target {ctx.target.vocab_size}"
        )
    return ModelStage(model, ctx.max_len, name=Path(spec).name or spec)


def build_round(
    config: CascadeConfig | None,
    target,
    max_len: int,
    *,
    stages: list[Stage] | None = None,
    shared: dict | None = None,
    progress: bool = True,
    host: Transformer | None = None,
) -> tuple[Round, list[Stage]]:
    """(round, stages smallest first) for ``config`` on ``target``.

    ``config`` None is autoregressive decoding. ``stages``: stages already built (the seed APIs
    pass their own model objects), used instead of building ``config.stages``; ``shared`` keeps
    models (the INT8 copy) across calls; ``host``: the native copy of a target that runs elsewhere
    (the JAX target on a mesh), from which the drafts are made to run on this host."""
    if config is None:
        return ChainRound(), []
    if stages is None:
        source = host if host is not None else target
        ctx = BuildContext(source, max_len, config.mag_min_ngram, progress, shared if shared is not None else {})
        stages = [build_stage(s, ctx) for s in config.stages]
    if len(stages) != len(config.stages):
        raise CascadeError(f"the cascade names {len(config.stages)} stages, {len(stages)} were given")
    if config.mode == "tree":
        proposer, filt = stages[0], (stages[1] if len(stages) > 1 else None)
        rnd = TreeRound(proposer, filt, n_nodes=config.tree_nodes, width=config.tree_width, keep=config.tree_keep)
        return rnd, stages
    drafter, k = build_csd(list(reversed(stages)), config.chain_matrix(), lenience=config.lenience)
    if config.adaptive:
        lookup = all(isinstance(s, MaG) for s in stages)  # drafting costs a lookup: propose first, then choose
        return AdaptiveRound(drafter, k, lookup=lookup, name="->".join(config.stages), calibration=calibration(target)), stages
    return ChainRound(drafter, k), stages


def calibration(target) -> Calibration:
    """This machine's calibration cache for ``target`` (model, CPU and kernel variant and build in the
    key, so rebuilt kernels measure afresh; for a target on a JAX mesh, the mesh)."""
    k = kernels.get()
    variant = getattr(target, "backend_name", None) or (f"{k.variant}@{k.build}" if k else "torch")
    return Calibration.load(cache_dir(), Calibration.key_for(target, kernels.cpu_name(), variant))


def is_default_target(target) -> bool:
    """Is ``target`` the model the shipped tiny model and bigram table were made for?"""
    if not isinstance(target, Transformer):
        return False
    emb = target.tok_embeddings.weight
    if not SHIPPED_TINY.is_file():
        return tuple(emb.shape) == (49152, 576)
    return fingerprint_matches(emb, read_info(SHIPPED_TINY)["embedding_fingerprint"])


def default_cascade(target=None) -> CascadeConfig:
    """The default cascade for ``target``: adaptive (each round chooses how many drafted tokens the
    target verifies, 0 = plain decoding, from this machine's measured costs and the acceptance seen
    so far; ``adaptive.py``), over the drafts measured side by side in docs/cascade.md.

    A target whose matrices are quantized (a GGUF file's 4- or 8-bit blocks) costs little more to
    read than any neural draft of it, and verifying several tokens costs it more than one: MaG
    alone proposes up to 8 tokens where the text repeats a 3-gram or longer, and the round
    verifies as many of them as pay. So does a target the native engine cannot run. A dense target
    (fp32, bf16, fp16) is dominated by reading its weights: MaG proposes up to 3 tokens on 2-gram+
    repeats to its INT8 copy, which drafts up to 8 for the target."""
    if target is not None and (not isinstance(target, Transformer) or target.is_quantized):
        return CascadeConfig(stages=("mag:none",), k=(8,), mag_min_ngram=3, adaptive=True)
    return CascadeConfig(stages=("mag:none", "int8"), k=(3, 8), mag_min_ngram=2, adaptive=True)
