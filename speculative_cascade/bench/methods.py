"""Benchmark methods. Each is a class with ``run(prompt_ids, max_new_tokens) -> Result``;
add one by subclassing :class:`Method` and registering it in ``METHODS``."""

from __future__ import annotations

import copy
import os
import time
from pathlib import Path
from dataclasses import dataclass, field

import torch

from ..builder import build_round, default_cascade
from ..cascade import Round
from ..config import CascadeConfig
from ..cost.tune import TuneResult, tune
from ..decoding import StopChecker, eos_ids, generate_tokens
from ..engine.loader import LoadedModel, as_model, cache_dir
from ..engine.quant import quantize_int8
from ..errors import CascadeError
from ..stages.neural import ModelStage


@dataclass
class Result:
    token_ids: list[int]
    seconds: float  # wall time of the whole call, prefill included
    decode_seconds: float | None = None  # prefill excluded, where the method can tell
    stats: dict = field(default_factory=dict)


class BenchContext:
    """What the methods share: the target, its tokenizer, the draft, k and the cache size."""

    def __init__(self, loaded: LoadedModel, draft_spec: str | None, k: int, max_len: int) -> None:
        self.loaded, self.draft_spec, self.k, self.max_len = loaded, draft_spec, k, max_len
        self.target = loaded.model
        self.tokenizer = loaded.tokenizer
        self._draft = None
        self.cascades: dict[str, CascadeConfig | None] = {}  # method name -> the cascade it ran (None: plain)
        self.predicted: dict = {}  # method name -> the cost model's prediction (decode tokens/s and parts)
        self.calibration_prompts: list[list[int]] = []  # token ids; same distribution, not benchmarked
        self.context: float | None = None  # the benchmark's mean context length while decoding
        self.target_cost = None  # the target's t(n, L), measured once
        self.shared: dict = {}  # models shared by the cascade methods (the INT8 copy)
        self.custom: CascadeConfig | None = None  # the cascade of --cascade FILE (method 'custom')
        self.tuned: dict[str, TuneResult] = {}  # method name -> what tune chose for it
        self._jax_target = None

    @property
    def draft(self):
        if self._draft is None:
            if self.draft_spec in (None, "int8"):
                self._draft = self.shared.get("int8") or quantize_int8(self.target)
                self.shared["int8"] = self._draft
            else:
                self._draft, _ = as_model(self.draft_spec)
            if self._draft.vocab_size != self.target.vocab_size:
                raise CascadeError("vocabulary mismatch between draft and target")
        return self._draft

    def release(self) -> None:
        """Let the shared drafts go (a method built later builds its own)."""
        self.shared.clear()
        self._draft = None

    def eos_ids(self) -> set[int]:
        return eos_ids(self.target, self.tokenizer)

    @property
    def jax_target(self):
        """The target on JAX (its weights in fp32), on one device or the mesh in CASCADE_JAX_MESH; built once."""
        if self._jax_target is None:
            from ..engine import jax_target  # the optional JAX backend

            jax_target.enable_compilation_cache(cache_dir() / "jax")
            mesh = jax_target.make_mesh(jax_target.parse_mesh(os.environ.get("CASCADE_JAX_MESH", "")))
            self._jax_target = jax_target.JaxTarget(self.target, mesh)
        return self._jax_target


class Method:
    """A benchmarked method. Native methods also have a ``round`` (what the cost model profiles and the
    sampling check runs), the ``target_stage`` it runs on, and, for ``auto``, what tune chose."""

    name = ""
    description = ""
    speculative = False
    round: Round | None = None
    target_stage: ModelStage | None = None
    tuned: TuneResult | None = None

    def __init__(self, ctx: BenchContext) -> None:
        self.ctx = ctx

    @classmethod
    def check(cls) -> None:
        """Raise CascadeError before any run when the method cannot run here (a missing extra)."""

    def run(self, prompt_ids: list[int], max_new_tokens: int) -> Result:
        raise NotImplementedError


class HFGenerate(Method):
    name = "hf"
    description = "transformers generate(), greedy, fp32 (the reference baseline)"
    extra_generate_kwargs: dict = {}

    def __init__(self, ctx: BenchContext) -> None:
        super().__init__(ctx)
        from transformers import AutoModelForCausalLM  # slow to import; only the hf methods need it

        src = Path(ctx.loaded.source or ctx.loaded.path)
        if src.suffix == ".gguf":  # transformers dequantizes the file itself
            self.model = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
        self.model.eval()

    def generate_kwargs(self) -> dict:
        return dict(self.extra_generate_kwargs)

    def run(self, prompt_ids, max_new_tokens):
        eos = sorted(self.ctx.eos_ids())
        t0 = time.perf_counter()
        with torch.inference_mode():
            out = self.model.generate(
                torch.tensor([prompt_ids]),
                attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
                max_new_tokens=max_new_tokens,
                do_sample=False,
                eos_token_id=eos or None,
                pad_token_id=eos[0] if eos else 0,
                **self.generate_kwargs(),
            )
        seconds = time.perf_counter() - t0
        new = out[0, len(prompt_ids) :].tolist()
        for i, t in enumerate(new):  # our methods drop the EOS token; so do we here
            if t in eos:
                new = new[:i]
                break
        return Result(new, seconds)


class HFPromptLookup(HFGenerate):
    name = "hf-pld"
    description = "transformers prompt lookup decoding (prompt_lookup_num_tokens=10), greedy, fp32"
    extra_generate_kwargs = {"prompt_lookup_num_tokens": 10}


class HFAssisted(HFGenerate):
    name = "hf-assisted"
    description = "transformers assisted generation, assistant: an INT8 copy (torch dynamic quantization)"

    def __init__(self, ctx: BenchContext) -> None:
        super().__init__(ctx)
        from torch.ao.quantization import quantize_dynamic  # a deprecated API, imported where it is used

        self.assistant = quantize_dynamic(copy.deepcopy(self.model), {torch.nn.Linear}, dtype=torch.qint8)

    def generate_kwargs(self) -> dict:
        return {"assistant_model": self.assistant}


class LlamaCpp(Method):
    """llama.cpp through llama-cpp-python on the same GGUF file and token ids (an optional extra)."""

    name = "llamacpp"
    description = "llama.cpp (llama-cpp-python) on the same GGUF file, greedy, same token ids, same threads"
    lookup = 0

    @classmethod
    def check(cls) -> None:
        try:
            import llama_cpp  # noqa: F401  (optional extra)
        except ImportError as e:
            raise CascadeError(
                f"method {cls.name} needs llama-cpp-python ({e}): pip install 'speculative-cascade[llamacpp]'"
            ) from None

    def __init__(self, ctx: BenchContext) -> None:
        super().__init__(ctx)
        self.check()
        from llama_cpp import Llama  # optional extra (.[llamacpp])

        src = ctx.loaded.source
        if not src.endswith(".gguf"):
            raise CascadeError(f"method {self.name} needs a GGUF target, not {src}")
        kw = {}
        if self.lookup:
            from llama_cpp.llama_speculative import LlamaPromptLookupDecoding  # optional extra

            # a draft model needs the logits of every evaluated position
            kw.update(draft_model=LlamaPromptLookupDecoding(num_pred_tokens=self.lookup), logits_all=True)
        threads = torch.get_num_threads()
        self.llm = Llama(model_path=src, n_ctx=ctx.max_len, n_threads=threads, n_threads_batch=threads,
                         n_batch=512, verbose=False, **kw)

    def run(self, prompt_ids, max_new_tokens):
        eos = self.ctx.eos_ids()
        out: list[int] = []
        t0 = time.perf_counter()
        t_first = None
        for tok in self.llm.generate(prompt_ids, top_k=1, temp=0.0, reset=True):
            if t_first is None:
                t_first = time.perf_counter()  # the prompt's prefill and the first token
            if tok in eos:
                break
            out.append(int(tok))
            if len(out) >= max_new_tokens:
                break
        end = time.perf_counter()
        # decode time: the mean time of the tokens after the first, for every token (the native
        # methods count the first token's step, which reads the last prompt token, as decoding)
        decode = (end - t_first) * len(out) / (len(out) - 1) if t_first and len(out) > 1 else None
        return Result(out, end - t0, decode)


class LlamaCppLookup(LlamaCpp):
    name = "llamacpp-lookup"
    description = "llama.cpp's prompt lookup decoding (10 tokens), same file and token ids"
    lookup = 10


class Native(Method):
    """Native decoder driven by a round (``cascade.ChainRound`` / ``TreeRound``); plain: autoregressive.

    A native method is a cascade configuration (:meth:`cascade`, None: autoregressive) built by
    :func:`~..builder.build_round`; the configuration it ran is recorded in ``ctx.cascades``."""

    name = "ar"
    description = "native decoder, autoregressive"

    def __init__(self, ctx: BenchContext) -> None:
        super().__init__(ctx)
        self.target_stage = ModelStage(ctx.target, ctx.max_len, name="target")
        self.round = self.make_round()

    def cascade(self) -> CascadeConfig | None:
        return None

    def make_round(self) -> Round:
        config = self.cascade()
        if self.speculative:
            self.ctx.cascades[self.name] = config
        return build_round(config, self.ctx.target, self.ctx.max_len, shared=self.ctx.shared)[0]

    def run(self, prompt_ids, max_new_tokens):
        t0 = time.perf_counter()
        out, stats = generate_tokens(
            self.target_stage,
            prompt_ids,
            round=self.round,
            max_new_tokens=max_new_tokens,
            stop=StopChecker(self.ctx.eos_ids()),
        )
        seconds = time.perf_counter() - t0
        return Result(out, seconds, stats.total_s - stats.prefill_s, stats.to_dict())


class TwoStage(Native):
    name = "spec"
    description = "two-stage speculative decoding (draft: INT8 copy of the target by default, k from --k)"
    speculative = True

    def make_round(self) -> Round:
        config = CascadeConfig(stages=("draft",), k=(self.ctx.k,))
        draft = ModelStage(self.ctx.draft, self.ctx.max_len, name="draft")
        return build_round(config, self.ctx.target, self.ctx.max_len, stages=[draft])[0]


class Cascade(Native):
    """A cascade from :mod:`..config`; ``config`` is set by each subclass (the measured best of its kind)."""

    speculative = True
    config: CascadeConfig | None = None

    def cascade(self) -> CascadeConfig | None:
        return self.config


class Default(Cascade):
    name = "default"
    description = "the default cascade for the target (what `cascade generate` runs with no options)"

    def cascade(self) -> CascadeConfig | None:
        return default_cascade(self.ctx.target)


class Custom(Cascade):
    name = "custom"
    description = "the cascade given with --cascade FILE"

    def cascade(self) -> CascadeConfig | None:
        return self.ctx.custom


class JaxNative(Native):
    """The target's forwards on JAX (``engine/jax_target.py``; its weights dequantized to fp32), drafts on this host."""

    name = "ar-jax"
    description = "the target on JAX (fp32 weights; one device, or CASCADE_JAX_MESH), autoregressive"

    @classmethod
    def check(cls) -> None:
        try:
            import jax  # noqa: F401  # the optional 'jax' extra
        except ImportError:
            raise CascadeError(f"method {cls.name!r} needs JAX: pip install 'speculative-cascade[jax]'") from None

    def __init__(self, ctx: BenchContext) -> None:
        Method.__init__(self, ctx)
        self.target_stage = ModelStage(ctx.jax_target, ctx.max_len, name="target")
        self.round = self.make_round()

    def make_round(self) -> Round:
        config = self.cascade()
        if self.speculative:
            self.ctx.cascades[self.name] = config
        return build_round(config, self.ctx.jax_target, self.ctx.max_len, shared=self.ctx.shared, host=self.ctx.target)[0]


class JaxDefault(JaxNative):
    name = "default-jax"
    description = "the default cascade with the target on JAX (drafts on this host)"
    speculative = True

    def cascade(self) -> CascadeConfig | None:
        return default_cascade(self.ctx.target)


class Auto(Native):
    """``cascade tune`` at start-up, then its choice. It calibrates on prompts of the benchmark's file that
    the benchmark does not run (one per category), else on the shipped instructions."""

    name = "auto"
    description = "the configuration `cascade tune` picks on this machine (calibrated when the method starts)"
    speculative = True

    def cascade(self) -> CascadeConfig | None:
        tuned = self.ctx.tuned.get(self.name)  # built again (the bench's memory pass): the same choice
        if tuned is None:
            tuned = self.ctx.tuned[self.name] = tune(
                self.ctx.target,
                self.ctx.tokenizer,
                self.ctx.calibration_prompts,
                max_len=self.ctx.max_len,
                context=self.ctx.context,
            )
        self.tuned = tuned
        return tuned.config


def _cascade(name: str, description: str, **settings) -> type[Cascade]:
    return type(
        name.title(),
        (Cascade,),
        {"name": name, "description": description, "config": CascadeConfig.from_dict(settings)},
    )


MAG = _cascade("mag", "MaG (suffix match, then bigram table) drafts for the target", stages=["mag"], k=[4])
SPEC4 = _cascade("spec4", "two-stage with the 4-bit copy of the target as draft (k=12)", stages=["int4"], k=[12])
CHAIN = _cascade(
    "chain",
    "3-stage vertical cascade: MaG (2-gram+ matches) -> INT8 draft -> target (the default for dense targets)",
    stages=["mag:none", "int8"],
    k=[3, 8],
    mag_min_ngram=2,
)
TREE = _cascade(
    "tree",
    "Algorithm 1: tiny model's tree (16 nodes) -> INT8 filter (keeps 8) -> target",
    stages=["tiny", "int8"],
    mode="tree",
    tree_nodes=16,
    tree_width=4,
    tree_keep=8,
)
CSD = _cascade(
    "csd",
    "CSD: INT8 draft (reviewing MaG) drafts 7 tokens, MaG 2 more; k_matrix [[7,2],[0,1]]",
    stages=["mag", "int8"],
    k_matrix=[[7, 2], [0, 1]],
)

# The seed paper's Table 3 (ablation): the full cascade tiny -> INT8 -> target, and what is left without
# each part. 'No tiny model' and 'Draft only' are both `spec`; 'Single stage' is `ar` (the target alone).
FULL = _cascade(
    "full", "ablation, full cascade as a chain: tiny (k=2) -> INT8 (k=8) -> target", stages=["tiny", "int8"], k=[2, 8]
)
NO_INT8 = _cascade(
    "no-int8",
    "ablation, no INT8 quantization: tiny (k=2) -> fp32 draft (the target's weights, k=8) -> target",
    stages=["tiny", "fp32"],
    k=[2, 8],
)
TINY_ONLY = _cascade("tiny-only", "ablation, tiny model only: tiny (k=2) -> target", stages=["tiny"], k=[2])

METHODS: dict[str, type[Method]] = {
    m.name: m
    for m in (
        HFGenerate,
        HFPromptLookup,
        HFAssisted,
        LlamaCpp,
        LlamaCppLookup,
        Native,
        Default,
        TwoStage,
        SPEC4,
        MAG,
        CHAIN,
        TREE,
        CSD,
        FULL,
        NO_INT8,
        TINY_ONLY,
        Custom,
        Auto,
        JaxNative,
        JaxDefault,
    )
}
