"""Any Hugging Face causal LM behind the native model's interface.

Slower than the native decoder (transformers' own forward, a dynamic cache cropped on
rollback), but it lets every architecture transformers knows take part as a target or
a draft. Tree masks are not supported here.
"""

from __future__ import annotations

import torch
import torch.nn as nn


class HFCache:
    """A transformers ``DynamicCache`` with the native cache's cursor interface (one row)."""

    def __init__(self, max_seq_len: int) -> None:
        from transformers import DynamicCache  # slow to import; only a fallback model needs it

        self.cache = DynamicCache()
        self.max_seq_len = max_seq_len
        self.batch_size = 1
        self.seqlens = [0]

    def reset(self) -> None:
        from transformers import DynamicCache  # slow to import; only a fallback model needs it

        self.cache = DynamicCache()
        self.seqlens = [0]

    def truncate(self, length: int, row: int | None = None) -> None:
        assert 0 <= length <= self.seqlens[0], "truncate beyond the cached length"
        if length < self.seqlens[0]:
            # a negative argument removes that many tokens in every transformers version
            self.cache.crop(length - self.seqlens[0])
        self.seqlens = [length]

    def rollback(self, n: int, row: int | None = None) -> None:
        self.truncate(self.seqlens[0] - n)

    def room(self, row: int = 0) -> int:
        return self.max_seq_len - self.seqlens[0]

    @property
    def nbytes(self) -> int:
        total = 0
        for layer in getattr(self.cache, "layers", []):
            for t in (getattr(layer, "keys", None), getattr(layer, "values", None)):
                if isinstance(t, torch.Tensor):
                    total += t.nbytes
        return total


class HFCausalLM(nn.Module):
    def __init__(self, hf_model) -> None:
        super().__init__()
        self.hf = hf_model.eval()
        cfg = hf_model.config
        self.config = cfg
        self.model_type = getattr(cfg, "model_type", "unknown")
        eos = getattr(cfg, "eos_token_id", None)
        self.eos_token_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        self.max_position_embeddings = getattr(cfg, "max_position_embeddings", None) or 2048

    @property
    def vocab_size(self) -> int:
        return self.hf.get_output_embeddings().weight.shape[0]

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    def new_cache(self, max_seq_len: int, batch_size: int = 1) -> HFCache:
        if batch_size != 1:
            raise ValueError("the transformers fallback supports batch size 1 only")
        return HFCache(max_seq_len)

    @torch.inference_mode()
    def forward(self, tokens, cache: HFCache, positions=None, tree_mask=None, last_only: bool = False):
        if tree_mask is not None or positions is not None:
            raise ValueError(f"tree verification needs a native model; {self.model_type!r} runs through transformers")
        assert cache.seqlens[0] + tokens.shape[1] <= cache.max_seq_len, "KV cache overflow"
        out = self.hf(
            input_ids=tokens,
            past_key_values=cache.cache,
            use_cache=True,
            logits_to_keep=1 if last_only else 0,
        )
        cache.seqlens[0] += tokens.shape[1]
        return out.logits.float()

    @property
    def nbytes(self) -> int:
        seen, total = set(), 0
        for t in list(self.hf.parameters()) + list(self.hf.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def num_parameters(self) -> int:
        return sum(p.numel() for p in {p.data_ptr(): p for p in self.hf.parameters()}.values())
