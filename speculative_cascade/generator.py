"""The Python API: :class:`SpeculativeGenerator` and the one-line :func:`generate`.

from speculative_cascade import SpeculativeGenerator
gen = SpeculativeGenerator()                   # embedded SmolLM2, INT8 self-draft
gen = SpeculativeGenerator(cascade={"stages": ["mag:none", "int8"], "k": [3, 8], "mag_min_ngram": 2})
print(gen.generate("The future of AI is", max_new_tokens=64))
print(gen.get_stats()["acceptance_rate"])
"""

from __future__ import annotations

import threading
import warnings
from typing import Callable

import torch

from .builder import build_round, default_cascade
from .cascade import ChainRound, Round
from .config import TWO_STAGE_K, CascadeConfig, load_cascade
from .decoding import GenerationStats, StopChecker, eos_ids, generate_tokens
from .engine import kernels
from .engine.loader import as_model
from .engine.quant import quantize_int8
from .engine.transformer import Transformer
from . import prompts
from .errors import CascadeError
from .sampling import SamplingParams
from .stages.neural import ModelStage

INT8_SELF_DRAFT = "int8"
DEFAULT_DRAFT = "default"  # the default cascade for the target (builder.default_cascade)


class SpeculativeGenerator:
    """Lossless speculative decoding: a draft proposes ``K`` tokens per round, the target
    verifies them in one forward; or, with ``cascade``, any cascade of drafting stages.

    Args:
        target_model: model spec (None = embedded SmolLM2-135M-Instruct, a GGUF path, a
            Hugging Face directory or hub id), or a loaded model.
        draft_model: ``"default"`` (the default cascade measured for the target's kind, see
            :func:`~.builder.default_cascade`), ``"int8"`` (an INT8 copy of the target), another
            spec or model, or None for plain autoregressive decoding.
        tokenizer: defaults to the target's own.
        K: draft tokens per round.
        max_len: KV-cache size in tokens (prompt + new tokens + K + 1 must fit).
        cascade: a :class:`~.config.CascadeConfig`, a dict of its settings, or the path of
            a TOML/YAML file; replaces ``draft_model``/``K`` with an N-stage cascade.
        precision: ``"stored"`` (default) runs the target on its weights as stored (a GGUF
            file's quantized blocks, bf16 safetensors); ``"fp32"`` dequantizes them to fp32.
        backend: ``"torch"`` (the native engine, default) or ``"jax"``: the target's forwards on a
            JAX device mesh (``engine/jax_target.py``; fp32 weights), drafts on this host.
        mesh: the JAX mesh, e.g. ``"model=4"`` or ``"data=2,model=2"`` (default: one device).
    """

    def __init__(
        self,
        target_model=None,
        draft_model=DEFAULT_DRAFT,
        tokenizer=None,
        *,
        K: int = TWO_STAGE_K,
        max_len: int = 2048,
        device: str = "cpu",
        progress: bool = True,
        cascade=None,
        precision: str | None = None,
        backend: str = "torch",
        mesh: str | None = None,
    ) -> None:
        if K < 1:
            raise CascadeError(f"K must be >= 1, got {K}")
        if device != "cpu" and not (device.startswith("cuda") and torch.cuda.is_available()):
            raise CascadeError(f"device {device!r} is not available here")
        self.config: CascadeConfig | None = None
        if cascade is not None:
            self.config = load_cascade(cascade)  # None: the file asks for plain decoding
            draft_model = None
        if backend not in ("torch", "jax"):
            raise CascadeError(f"backend must be 'torch' or 'jax', got {backend!r}")
        if precision is None:
            precision = self.config.precision if self.config is not None else "stored"
            precision = "fp32" if backend == "jax" else precision
        if backend == "jax" and precision != "fp32":
            raise CascadeError("the JAX backend runs the target's fp32 weights: use precision 'fp32'")
        if backend == "torch" and mesh:
            raise CascadeError("a mesh is for the JAX backend (backend='jax')")
        self.precision = precision
        self.target, target_tok = as_model(target_model, progress=progress, precision=precision)
        self.host_model: Transformer | None = None  # the native copy of a target that runs on a JAX mesh
        if backend == "jax":
            from .engine import jax_target  # the optional JAX backend

            if not isinstance(self.target, Transformer):
                raise CascadeError("the JAX backend runs the Llama family (Llama, SmolLM2, Mistral, Qwen2)")
            self.host_model = self.target
            self.target = jax_target.JaxTarget(self.host_model, jax_target.make_mesh(jax_target.parse_mesh(mesh)))
        native = self.host_model if self.host_model is not None else self.target
        if self.config is None and cascade is None and draft_model == DEFAULT_DRAFT:
            self.config = default_cascade(native).with_(precision=precision)
            draft_model = None
        self.tokenizer = tokenizer or target_tok
        if self.tokenizer is None:
            raise CascadeError("a tokenizer is needed when the target is passed as a model object")
        limit = getattr(self.target, "max_position_embeddings", max_len) or max_len
        if max_len < 2:
            raise CascadeError(f"max_len must be >= 2, got {max_len}")
        self.max_len = min(max_len, limit)
        if draft_model == INT8_SELF_DRAFT:
            if not isinstance(native, Transformer):
                raise CascadeError("the INT8 self-draft needs a native target (Llama, Mistral or Qwen2 family)")
            self.draft = quantize_int8(native)
            if kernels.get() is None and self.target.device.type == "cpu":
                warnings.warn(
                    "the C kernels are unavailable: the INT8 draft will be slower "
                    "than plain decoding; pass draft_model=None (CLI: --draft none)",
                    stacklevel=2,
                )
        elif draft_model is None:
            self.draft = None
        else:
            self.draft, _ = as_model(draft_model, progress=progress)
        if self.draft is not None and self.draft.vocab_size != self.target.vocab_size:
            raise CascadeError(
                f"vocabulary mismatch: draft has {self.draft.vocab_size} tokens, target {self.target.vocab_size}"
            )
        self.target.to(device)
        if self.draft is not None:
            self.draft.to(device)
        self.K = K
        self._target_stage = ModelStage(self.target, self.max_len, name="target")
        self._round: Round | None = None
        self.shared_models: dict = {}  # models its cascades share (the INT8 copy): built once, reused by a server
        if self.config is not None:
            self._round, _ = build_round(
                self.config, self.target, self.max_len, progress=progress, host=self.host_model, shared=self.shared_models
            )
        elif self.draft is not None:  # two-stage: one draft model (the INT8 copy or the caller's)
            two_stage = CascadeConfig(stages=("draft",), k=(K,))
            draft_stage = ModelStage(self.draft, self.max_len, name="draft")
            self._round, _ = build_round(two_stage, self.target, self.max_len, stages=[draft_stage])
        self._stats = GenerationStats()
        self.last_token_ids: list[int] = []
        # one generation at a time: the stages' KV caches and statistics belong to one sequence,
        # so concurrent calls on one generator wait for each other (each gets its own output)
        self._lock = threading.Lock()
        kernels.release_threads()  # see _generate_locked

    # -- prompts -------------------------------------------------------------------------
    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, list):
            if not all(isinstance(t, int) and 0 <= t < self.target.vocab_size for t in prompt):
                raise CascadeError("prompt token ids must be ints within the vocabulary")
            return prompt
        if not isinstance(prompt, str):
            raise CascadeError(f"the prompt must be a string or a list of token ids, not {type(prompt).__name__}")
        if not prompt.strip():
            raise CascadeError("the prompt is empty")
        try:
            prompt.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes from the command line arrive as surrogates
            raise CascadeError("the prompt is not valid UTF-8 text") from None
        ids = prompts.encode(self.tokenizer, prompt, chat)
        if not ids:
            raise CascadeError("the tokenizer turned the prompt into no tokens")
        return ids

    # -- generation ----------------------------------------------------------------------
    def generate_ids(
        self,
        prompt: str | list[int],
        *,
        max_new_tokens: int = 128,
        temperature: float = 0.0,
        top_k: int = 0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop: list[str] | None = None,
        chat: bool = False,
        speculative: bool = True,
        on_tokens: Callable[[list[int]], None] | None = None,
    ) -> list[int]:
        """Generate and return the new token ids; statistics go to :meth:`get_stats`."""
        params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
        ids = self.encode(prompt, chat=chat)
        stopper = StopChecker(eos_ids(self.target, self.tokenizer), stop, lambda t: self.tokenizer.decode(t))
        with self._lock:
            return self._generate_locked(ids, params, stopper, speculative, max_new_tokens, on_tokens)

    def _generate_locked(self, ids, params, stopper, speculative, max_new_tokens, on_tokens) -> list[int]:
        try:
            out, self._stats = generate_tokens(
                self._target_stage,
                ids,
                round=self._round if speculative and self._round is not None else ChainRound(),
                max_new_tokens=max_new_tokens,
                params=params,
                stop=stopper,
                on_tokens=on_tokens,
            )
        finally:
            # The thread hands its OpenMP workers back (the next call makes them again, ~0.1 ms): a
            # generator loaded in one thread and called from others, in turn, then never has two
            # threads' pools alive at once, which on as many CPUs as one pool uses makes every
            # barrier of a forward sleep (measured: decoding at half speed).
            kernels.release_threads()
        self.last_token_ids = out
        return out

    def generate(self, prompt: str | list[int], max_new_tokens: int = 128, **kwargs) -> str:
        """Generate text after ``prompt``; keyword arguments as :meth:`generate_ids`."""
        out = self.generate_ids(prompt, max_new_tokens=max_new_tokens, **kwargs)
        return self.tokenizer.decode(out, skip_special_tokens=True)

    def set_round(self, round: Round | None) -> None:
        """Use a prepared round (``cascade.ChainRound``/``TreeRound``; None: autoregressive)."""
        self._round = round

    @property
    def speculative(self) -> bool:
        return self._round is not None

    def get_stats(self) -> dict:
        """Statistics of the last call: acceptance_rate, mean_accepted_length, tokens_per_s, ``stages``
        (per stage, smallest first: forwards, proposed, accepted by the next stage, seconds), ..."""
        return self._stats.to_dict()


def generate(
    prompt: str,
    *,
    target=None,
    draft=DEFAULT_DRAFT,
    K: int = TWO_STAGE_K,
    max_new_tokens: int = 128,
    **kwargs,
) -> str:
    """One-line use: ``generate("Hello", max_new_tokens=32)`` with the embedded model."""
    return SpeculativeGenerator(target, draft, K=K).generate(prompt, max_new_tokens=max_new_tokens, **kwargs)
