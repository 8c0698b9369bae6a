"""Native decoder for the Llama family (Llama, SmolLM/SmolLM2, Mistral, Qwen2).

One forward runs ``T`` new tokens of every row against a static :class:`KVCache`:

    logits = model(tokens, cache)                       # chain: positions follow the cursor
    logits = model(tokens, cache, positions, tree_mask) # tree: explicit RoPE positions and mask

The new tokens always see every cached slot of their row below its cursor; among
themselves they see what ``tree_mask`` allows (causal by default). The cursor is
advanced by ``T`` after the forward; the caller rolls back what it rejects.

Weights are the Hugging Face ones with q/k/v and gate/up fused into single matrices.
Two execution paths give the same logits (tested):

* one row, causal, up to 32 new tokens (decoding, drafting, chain verification): each
  layer is a single call into the C kernels (``kernels/gemv.c``), fp32 or INT8 weights;
* everything else (prefill, tree masks, ragged rows, no C compiler): the PyTorch modules
  below, whose products with few rows still use the C kernel when it is there.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import elementwise_kernels, layer_kernel, linear_kernel
from .kv_cache import KVCache

SUPPORTED_ARCHITECTURES = ("llama", "mistral", "qwen2")


@dataclass(frozen=True)
class ModelArgs:
    vocab_size: int
    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    intermediate_size: int
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_inv_freq: tuple[float, ...] | None = None  # None: plain RoPE from rope_theta
    rope_scale: float = 1.0  # attention_factor of scaled RoPE variants
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    tie_embeddings: bool = False
    max_position_embeddings: int = 2048
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = field(default_factory=tuple)

    @classmethod
    def from_hf_config(cls, config) -> "ModelArgs":
        """Build from a transformers config; raises ``ValueError`` if not supported natively."""
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_ARCHITECTURES:
            raise ValueError(f"architecture {model_type!r} has no native implementation")
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
        rope_type = rope.get("rope_type", rope.get("type", "default")) or "default"
        theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
        inv_freq, scale = None, 1.0
        if rope_type != "default":
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

            if rope_type not in ("linear", "llama3", "yarn") or rope_type not in ROPE_INIT_FUNCTIONS:
                raise ValueError(f"RoPE type {rope_type!r} has no native implementation")
            freq, scale = ROPE_INIT_FUNCTIONS[rope_type](config, "cpu")
            inv_freq = tuple(float(f) for f in freq)
        max_pos = config.max_position_embeddings
        window = getattr(config, "sliding_window", None) if model_type == "mistral" else None
        if window and getattr(config, "use_sliding_window", True):
            max_pos = min(max_pos, window)
        eos = getattr(config, "eos_token_id", None)
        eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else ((eos,) if eos is not None else ())
        return cls(
            vocab_size=config.vocab_size,
            dim=config.hidden_size,
            n_layers=config.num_hidden_layers,
            n_heads=config.num_attention_heads,
            n_kv_heads=getattr(config, "num_key_value_heads", None) or config.num_attention_heads,
            head_dim=head_dim,
            intermediate_size=config.intermediate_size,
            norm_eps=config.rms_norm_eps,
            rope_theta=float(theta),
            rope_inv_freq=inv_freq,
            rope_scale=float(scale),
            qkv_bias=model_type == "qwen2" or bool(getattr(config, "attention_bias", False)),
            o_bias=model_type != "qwen2" and bool(getattr(config, "attention_bias", False)),
            mlp_bias=bool(getattr(config, "mlp_bias", False)),
            tie_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
            max_position_embeddings=max_pos,
            model_type=model_type,
            bos_token_id=getattr(config, "bos_token_id", None),
            eos_token_ids=eos_ids,
        )


class Linear(nn.Module):
    """``y = x @ W.T + b`` with the weight stored as ``(N, K)`` like ``nn.Linear``.

    For few rows (decoding, verification) the product runs in the C kernel, or without
    it as a batched matmul over ``chunks`` row blocks of ``W`` (faster than MKL's GEMV on
    the AMD CPUs measured); for many rows (prefill) as one ``F.linear``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = False, chunks: int = 8) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        while chunks > 1 and out_features % chunks:
            chunks //= 2
        self.chunks = chunks

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)  # (M, K)
        M, N = x2.shape[0], self.out_features
        if M > 32 or x.device.type != "cpu" or self.weight.dtype != torch.float32:
            return F.linear(x, self.weight, self.bias)
        kernel = linear_kernel()
        if kernel is not None:
            x2 = x2.contiguous()
            y = torch.empty(M, N)
            b = self.bias.data_ptr() if self.bias is not None else None
            kernel(x2.data_ptr(), self.weight.data_ptr(), b, y.data_ptr(), M, N, K)
            return y.view(*lead, N)
        if self.chunks == 1:
            return F.linear(x, self.weight, self.bias)
        c = self.chunks
        w = self.weight.view(c, N // c, K).transpose(1, 2)  # (c, K, N/c), a view
        y = torch.bmm(x2.expand(c, M, K), w)  # (c, M, N/c)
        y = y.transpose(0, 1).reshape(M, N)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*lead, N)


class Attention(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = args.n_heads, args.n_kv_heads, args.head_dim
        q_size, kv_size = args.n_heads * args.head_dim, args.n_kv_heads * args.head_dim
        self.wqkv = Linear(args.dim, q_size + 2 * kv_size, bias=args.qkv_bias)
        self.wo = Linear(q_size, args.dim, bias=args.o_bias)

    def forward(self, x, freqs: torch.Tensor, cache: KVCache, layer: int, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        nh, nkv, hd = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.wqkv.forward(x)  # (B, T, (nh + 2 nkv) hd); q and k rows are in interleaved RoPE order
        qk = torch.view_as_complex(qkv[..., : (nh + nkv) * hd].reshape(B, T, nh + nkv, hd // 2, 2))
        qk = torch.view_as_real(qk * freqs).flatten(3)  # (B, T, nh + nkv, hd), rotated
        q = qk[:, :, :nh].transpose(1, 2)  # (B, nh, T, hd)
        k = qk[:, :, nh:].transpose(1, 2)  # (B, nkv, T, hd)
        v = qkv[..., (nh + nkv) * hd :].view(B, T, nkv, hd).transpose(1, 2)  # (B, nkv, T, hd)
        S = cache.write(layer, k, v)
        keys, values = cache.k[layer, :, :, :S], cache.v[layer, :, :, :S]  # (B, nkv, S, hd)
        y = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, enable_gqa=True)
        return self.wo.forward(y.transpose(1, 2).reshape(B, T, nh * hd))


class FeedForward(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.hidden = args.intermediate_size
        self.w13 = Linear(args.dim, 2 * args.intermediate_size, bias=args.mlp_bias)  # gate, up
        self.w2 = Linear(args.intermediate_size, args.dim, bias=args.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gu = self.w13.forward(x)  # (B, T, 2 * hidden): gate, up
        ew = elementwise_kernels() if _fusable(gu) else None
        if ew is not None:
            h = torch.empty(*gu.shape[:-1], self.hidden)
            ew[1](gu.data_ptr(), h.data_ptr(), gu.numel() // (2 * self.hidden), self.hidden)
        else:
            gate, up = gu.split(self.hidden, dim=-1)
            h = F.silu(gate) * up
        return self.w2.forward(h)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ew = elementwise_kernels() if _fusable(x) else None
        if ew is not None:
            y = torch.empty_like(x)
            K = x.shape[-1]
            ew[0](x.data_ptr(), self.weight.data_ptr(), y.data_ptr(), x.numel() // K, K, self.eps)
            return y
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _fusable(x: torch.Tensor) -> bool:
    """Few rows of contiguous fp32 on the CPU: the C element-wise kernels apply."""
    return x.device.type == "cpu" and x.dtype == torch.float32 and x.is_contiguous() and x.numel() <= 32 * 8192


class Block(nn.Module):
    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.attention_norm = RMSNorm(args.dim, args.norm_eps)
        self.attention = Attention(args)
        self.ffn_norm = RMSNorm(args.dim, args.norm_eps)
        self.feed_forward = FeedForward(args)

    def forward(self, x, freqs, cache, layer, mask):
        # .forward() directly: nn.Module.__call__ costs more than the small ops here
        h = x + self.attention.forward(self.attention_norm.forward(x), freqs, cache, layer, mask)
        return h + self.feed_forward.forward(self.ffn_norm.forward(h))


def interleave_rope_rows(w: torch.Tensor, n_heads: int, head_dim: int) -> torch.Tensor:
    """Reorder the rows of a q or k projection from the Hugging Face rotate-half layout
    (pairs ``(i, i + hd/2)``) to interleaved pairs ``(2i, 2i + 1)``, so that RoPE is one
    complex multiplication. q and k get the same order, so ``q . k`` is unchanged."""
    half = head_dim // 2
    perm = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()  # (hd,)
    shape = w.shape
    return w.reshape(n_heads, head_dim, -1)[:, perm].reshape(shape)


class Transformer(nn.Module):
    """The native causal LM. ``forward`` returns logits ``(B, T, vocab)`` in fp32."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = nn.Embedding(args.vocab_size, args.dim)
        self.tok_embeddings.weight.requires_grad_(False)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size, chunks=16)
        self._rope_cache: torch.Tensor | None = None
        self._fused: tuple | bool | None = None  # per-layer pointers for the fused C layer

    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), ...: tensors may move
        self._fused = None
        self._rope_cache = None
        return super()._apply(fn, *args, **kwargs)

    # -- helpers -------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self.args.vocab_size

    @property
    def eos_token_ids(self) -> tuple[int, ...]:
        return self.args.eos_token_ids

    @property
    def max_position_embeddings(self) -> int:
        return self.args.max_position_embeddings

    @property
    def model_type(self) -> str:
        return self.args.model_type

    def new_cache(self, max_seq_len: int, batch_size: int = 1) -> KVCache:
        a = self.args
        dtype = self.tok_embeddings.weight.dtype if self.tok_embeddings.weight.is_floating_point() else torch.float32
        return KVCache(a.n_layers, batch_size, a.n_kv_heads, max_seq_len, a.head_dim, dtype, self.device)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.weight.device

    def _rope_table(self, length: int) -> torch.Tensor:
        """Complex rotations ``(n, head_dim / 2)``: exp(i * pos * inv_freq), times the RoPE scale."""
        if self._rope_cache is None or self._rope_cache.shape[0] < length:
            a = self.args
            n = max(length, 256)
            if a.rope_inv_freq is not None:
                inv_freq = torch.tensor(a.rope_inv_freq, dtype=torch.float32)
            else:
                inv_freq = 1.0 / (a.rope_theta ** (torch.arange(0, a.head_dim, 2, dtype=torch.float32) / a.head_dim))
            angles = torch.outer(torch.arange(n, dtype=torch.float32), inv_freq)  # (n, hd/2)
            self._rope_cache = torch.polar(torch.full_like(angles, a.rope_scale), angles).to(self.device)
        return self._rope_cache

    # -- forward -------------------------------------------------------------------------
    @torch.inference_mode()
    def forward(
        self,
        tokens: torch.Tensor,
        cache: KVCache,
        positions: torch.Tensor | None = None,
        tree_mask: torch.Tensor | None = None,
        last_only: bool = False,
    ) -> torch.Tensor:
        """Run ``tokens (B, T)`` against ``cache``; return logits ``(B, T, V)`` (``(B, 1, V)`` if last_only).

        positions: (B, T) RoPE positions; default: each row's cursor + arange(T).
        tree_mask: (B, T, T) bool, True where new token i may attend to new token j;
                   default: causal. Cached slots below the cursor are always visible.
        """
        B, T = tokens.shape
        assert B == cache.batch_size, "batch size differs from the cache's"
        starts = cache.seqlens
        assert max(starts) + T <= cache.max_seq_len, "KV cache overflow"
        if positions is None:
            if all(s == starts[0] for s in starts):
                positions = torch.arange(starts[0], starts[0] + T, device=tokens.device).expand(B, T)
            else:
                positions = torch.tensor(starts, device=tokens.device)[:, None] + torch.arange(T, device=tokens.device)
        freqs = self._rope_table(int(positions.max()) + 1)[positions][:, :, None]  # (B, T, 1, hd/2)
        causal_row = B == 1 and tree_mask is None and T <= 32
        x = self.tok_embeddings(tokens)  # (B, T, dim)
        fused = self._fused_layers(cache) if causal_row else None
        if fused is not None:
            x = self._run_fused(fused, x, freqs, cache)
        else:
            mask = self._mask(starts, T, tree_mask, tokens.device)
            for i, layer in enumerate(self.layers):
                x = layer.forward(x, freqs, cache, i, mask)
        cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self.output.forward(self.norm.forward(x)).float()

    def _fused_layers(self, cache: KVCache):
        """(kernel, int8 flag, per-layer pointers) when every layer can run in ``sc_layer``."""
        kernel = layer_kernel()
        if kernel is None or cache.k.dtype != torch.float32 or not cache.k.is_contiguous():
            return None
        if self._fused is None:
            self._fused = self._collect_fused_pointers() or False
        return (kernel, *self._fused) if self._fused else None

    def _collect_fused_pointers(self):
        def ptr(t):
            return None if t is None else t.data_ptr()

        flags, layers = set(), []
        for blk in self.layers:
            lins = [blk.attention.wqkv, blk.attention.wo, blk.feed_forward.w13, blk.feed_forward.w2]
            ps = []
            for lin in lins:
                if isinstance(lin, Linear) and lin.weight.dtype == torch.float32 and lin.weight.is_contiguous():
                    flags.add(0)
                    ps += [ptr(lin.weight), None, ptr(lin.bias)]
                elif hasattr(lin, "w_int8") and lin.w_int8.numel() and lin.w_int8.is_contiguous():
                    flags.add(1)
                    ps += [ptr(lin.w_int8), ptr(lin.scales), ptr(lin.bias)]
                elif hasattr(lin, "w_q4") and lin.w_q4.is_contiguous():
                    flags.add(2)
                    ps += [ptr(lin.w_q4), ptr(lin.scale_min), ptr(lin.bias)]
                else:
                    return None
                if next(iter(lin.buffers()), getattr(lin, "weight", None)).device.type != "cpu":
                    return None
            layers.append((ptr(blk.attention_norm.weight), ptr(blk.ffn_norm.weight), ps))
        if len(flags) != 1:
            return None
        return flags.pop(), layers

    def _run_fused(self, fused, x: torch.Tensor, freqs: torch.Tensor, cache: KVCache) -> torch.Tensor:
        """All layers through the C ``sc_layer``: x (1, T, dim) -> (1, T, dim); writes the cache."""
        kernel, int8, layers = fused
        a = self.args
        T = x.shape[1]
        x = x.contiguous()
        y = torch.empty_like(x)
        rot = torch.view_as_real(freqs).contiguous()  # (1, T, 1, hd/2, 2): cos, sin
        layer_bytes = cache.k.stride(0) * cache.k.element_size()
        k0, v0 = cache.k.data_ptr(), cache.v.data_ptr()
        start = cache.seqlens[0]
        for i, (n1, n2, ps) in enumerate(layers):
            status = kernel(
                int8,
                x.data_ptr(),
                y.data_ptr(),
                n1,
                n2,
                a.norm_eps,
                *ps,
                rot.data_ptr(),
                k0 + i * layer_bytes,
                v0 + i * layer_bytes,
                T,
                start,
                cache.max_seq_len,
                a.dim,
                a.n_heads,
                a.n_kv_heads,
                a.head_dim,
                a.intermediate_size,
            )
            if status:
                raise MemoryError("out of memory in the fused decoder layer")
            x, y = y, x
        return x

    @staticmethod
    def _mask(starts: list[int], T: int, tree_mask: torch.Tensor | None, device) -> torch.Tensor | None:
        """Boolean mask (B, 1, T, S) over the S = max(start) + T slots, or None when plain causal suffices."""
        S = max(starts) + T
        ragged = any(s != starts[0] for s in starts)
        if tree_mask is None and not ragged and T == 1:
            return None  # one new token sees the whole prefix and itself
        B = len(starts)
        slots = torch.arange(S, device=device)
        start = torch.tensor(starts, device=device)[:, None, None]  # (B, 1, 1)
        rel = slots[None, None, :] - start  # (B, 1, S): slot index relative to the row's cursor
        if tree_mask is None:
            q = torch.arange(T, device=device)[None, :, None]  # (1, T, 1)
            mask = rel <= q  # (B, T, S)
        else:
            assert tree_mask.shape == (B, T, T), "tree_mask must be (B, T, T)"
            mask = (rel < 0).expand(B, T, S).clone()
            for b, s in enumerate(starts):
                mask[b, :, s : s + T] = tree_mask[b]
        return mask[:, None]  # (B, 1, T, S)

    # -- weights -------------------------------------------------------------------------
    @property
    def nbytes(self) -> int:
        """Bytes of parameters and buffers (tied or shared tensors counted once)."""
        seen, total = set(), 0
        for t in list(self.parameters()) + list(self.buffers()):
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    def num_parameters(self) -> int:
        """Weights of the model, quantized ones included (tied tensors counted once)."""
        seen, total = set(), 0
        tensors = list(self.parameters()) + [b for n, b in self.named_buffers() if n.endswith("w_int8")]
        for t in tensors:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel()
        return total

    def load_hf_state_dict(self, sd: dict[str, torch.Tensor]) -> None:
        """Load Hugging Face ``LlamaForCausalLM``-style weights, fusing q/k/v and gate/up."""

        def take(name: str) -> torch.Tensor:
            if name not in sd:
                raise ValueError(f"weight {name!r} is missing from the checkpoint")
            return sd[name].to(torch.float32)

        a = self.args
        with torch.no_grad():
            self.tok_embeddings.weight.copy_(take("model.embed_tokens.weight"))
            for i, blk in enumerate(self.layers):
                p = f"model.layers.{i}."
                att = blk.attention
                for kind in ("weight", "bias") if a.qkv_bias else ("weight",):
                    wq = interleave_rope_rows(take(p + f"self_attn.q_proj.{kind}"), a.n_heads, a.head_dim)
                    wk = interleave_rope_rows(take(p + f"self_attn.k_proj.{kind}"), a.n_kv_heads, a.head_dim)
                    wv = take(p + f"self_attn.v_proj.{kind}")
                    getattr(att.wqkv, kind).copy_(torch.cat([wq, wk, wv], dim=0))
                att.wo.weight.copy_(take(p + "self_attn.o_proj.weight"))
                if a.o_bias:
                    att.wo.bias.copy_(take(p + "self_attn.o_proj.bias"))
                ff = blk.feed_forward
                ff.w13.weight.copy_(torch.cat([take(p + "mlp.gate_proj.weight"), take(p + "mlp.up_proj.weight")], 0))
                ff.w2.weight.copy_(take(p + "mlp.down_proj.weight"))
                if a.mlp_bias:
                    ff.w13.bias.copy_(torch.cat([take(p + "mlp.gate_proj.bias"), take(p + "mlp.up_proj.bias")], 0))
                    ff.w2.bias.copy_(take(p + "mlp.down_proj.bias"))
                blk.attention_norm.weight.copy_(take(p + "input_layernorm.weight"))
                blk.ffn_norm.weight.copy_(take(p + "post_attention_layernorm.weight"))
            self.norm.weight.copy_(take("model.norm.weight"))
        self._fused = None
        if a.tie_embeddings or "lm_head.weight" not in sd:
            self.output.weight = self.tok_embeddings.weight  # tied: one tensor, read once
        else:
            with torch.no_grad():
                self.output.weight.copy_(take("lm_head.weight"))


def count_flops_per_token(args: ModelArgs) -> int:
    """Matmul FLOPs of one token's forward (2 per multiply-add), attention over the cache excluded."""
    a = args
    per_layer = a.dim * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim + a.n_heads * a.head_dim * a.dim
    per_layer += 3 * a.dim * a.intermediate_size
    return 2 * (a.n_layers * per_layer + a.dim * a.vocab_size)


__all__ = ["ModelArgs", "Transformer", "Linear", "KVCache", "SUPPORTED_ARCHITECTURES", "count_flops_per_token"]
