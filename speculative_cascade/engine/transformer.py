"""Native decoder for the Llama family (Llama, SmolLM/SmolLM2, Mistral, Qwen2).

One forward runs ``T`` new tokens of every row against a static :class:`KVCache`:

    logits = model(tokens, cache)                       # chain: positions follow the cursor
    logits = model(tokens, cache, positions, tree_mask) # tree: explicit RoPE positions and mask

The new tokens always see every cached slot of their row below its cursor; among
themselves they see what ``tree_mask`` allows (causal by default). The cursor is
advanced by ``T`` after the forward; the caller rolls back what it rejects.

Weights are the Hugging Face ones with q/k/v and gate/up fused into single matrices, each a
:class:`~.formats.PackedWeight` in the format it was stored in (a GGUF file's quantized
blocks, a safetensors file's bf16, ...); activations are fp32, rounded to int8 inside the products
of QR matrices (``precision="int8"``: llama.cpp's arithmetic; docs/kernels.md).

With the C kernels (``kernels/``) every forward (prefill, decoding, chain and tree
verification, each row of a batch) is one call per row into ``sc_forward``, which is
batch-invariant: a token's logits are bit-identical whatever the number of tokens in the
forward and their tree. Without them (no compiler at install, ``SPECULATIVE_CASCADE_KERNEL=torch``,
hidden sizes not a multiple of 32) the PyTorch modules below give the same logits up to
rounding.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import ctypes

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import kernels, pages
from .formats import Format, PackedWeight, concat, q8_activations
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
            from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS  # slow import; scaled RoPE only

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


class PackedModule(nn.Module):
    """A module whose weight is a :class:`PackedWeight` in any kernel format, with its fp32 view."""

    def __init__(self, rows: int, cols: int) -> None:
        super().__init__()
        self._shape = (rows, cols)
        self.use(None)

    def use(self, packed: PackedWeight | None) -> None:
        """Hold ``packed`` as the weight (the fp32 view of the previous one is dropped)."""
        self._packed = packed
        self._dense: torch.Tensor | None = None  # dequantized copy, made on demand

    @property
    def packed(self) -> PackedWeight:
        """The weight; zeros until one is loaded (made on first use: a model about to be loaded
        never holds an fp32 copy of its size)."""
        if self._packed is None:
            self._packed = PackedWeight.dense(torch.zeros(*self._shape))
        return self._packed

    @property
    def weight(self) -> torch.Tensor:
        """The fp32 weight: the stored tensor itself when it is fp32, else dequantized once on demand
        (the PyTorch path, the tiny drafter's embeddings)."""
        if self.packed.fmt == Format.F32:
            return self.packed.data
        if self._dense is None:
            self._dense = self.packed.dequantize()
        return self._dense


class Linear(PackedModule):
    """``y = x @ W.T + b`` with ``W (N, K)`` a :class:`PackedWeight` in any kernel format."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False) -> None:
        super().__init__(out_features, in_features)
        self.in_features, self.out_features = in_features, out_features
        self.bias = torch.zeros(out_features) if bias else None

    @classmethod
    def from_packed(cls, packed: PackedWeight, bias: torch.Tensor | None = None) -> "Linear":
        lin = cls(packed.shape[1], packed.shape[0])
        lin.set(packed, bias)
        return lin

    def set(self, packed: PackedWeight, bias: torch.Tensor | None = None) -> None:
        assert packed.shape == (self.out_features, self.in_features), "weight shape differs from the layer's"
        self.use(packed)
        self.bias = None if bias is None else bias.detach().float().contiguous()

    def kernel_ready(self) -> bool:
        return self.in_features % 32 == 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = kernels.get()
        if k is None or not self.kernel_ready() or x.dtype != torch.float32 or x.device.type != "cpu":
            if self.packed.fmt == Format.I8Q8:  # the kernels' activation rounding, then the product in fp32
                x = q8_activations(x).to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), self.bias)
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K).contiguous()
        y = torch.empty(x2.shape[0], self.out_features)
        mat = sc_mat(self.packed, self.bias)
        k.lib.sc_matmul(ctypes.byref(mat), x2.data_ptr(), x2.shape[0], y.data_ptr())
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, {self.packed.fmt.name}"


def sc_mat(packed: PackedWeight, bias: torch.Tensor | None) -> kernels.SCMat:
    """The C descriptor of a weight (pointers into tensors the caller keeps alive)."""
    N, K = packed.shape
    if packed.fmt == Format.QR:  # its type in the group field; a tail chained through next
        own = N - (0 if packed.tail is None else packed.tail.shape[0])
        nxt = None
        if packed.tail is not None:
            tail_bias = None if bias is None else bias[own:]
            nxt = sc_mat(packed.tail, tail_bias)
            packed._keep = (nxt, tail_bias)  # alive as long as the weight: the layers' descriptors point here
        b = None if bias is None else bias.data_ptr()
        return kernels.SCMat(int(Format.QR), packed.qtype, own, K, 0, 0, packed.data.data_ptr(), None, b,
                             None if nxt is None else ctypes.addressof(nxt))
    sm = 0 if packed.sm is None else packed.sm.data_ptr()
    b = None if bias is None else bias.data_ptr()
    f16 = int(packed.sm is not None and packed.sm.dtype == torch.float16)
    return kernels.SCMat(int(packed.fmt), packed.group, N, K, f16, int(packed.has_min), packed.data.data_ptr(), sm, b)


class Embedding(PackedModule):
    """Token embeddings in any kernel format; a lookup dequantizes only the rows it reads.

    Decoding looks up one row a token, and a generation reuses few: a quantized table keeps the
    rows it dequantized (at most ``MEMO_BYTES`` of them), since one dequantization beside the
    forward cost ~90 us (NumPy's steps, each cold after a forward), ~1.7% of a token of the 4-bit
    target."""

    MEMO_BYTES = 16 << 20

    def __init__(self, vocab_size: int, dim: int) -> None:
        super().__init__(vocab_size, dim)

    def use(self, packed: PackedWeight) -> None:
        super().use(packed)
        self._memo: dict[int, torch.Tensor] = {}  # token -> its dequantized row

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.numel() == 1 and self.packed.quantized:
            return self.row(int(tokens.item())).view(*tokens.shape, -1).clone()  # a copy: the kernels add to it in place
        return self.packed.rows(tokens)

    def row(self, token: int) -> torch.Tensor:
        """The fp32 row of ``token``, (dim,) contiguous, to be read only: the stored row itself (fp32), else
        its dequantized copy, kept."""
        if self.packed.fmt == Format.F32:
            return self.packed.data[token]
        row = self._memo.get(token)
        if row is None:
            if (len(self._memo) + 1) * self.packed.shape[1] * 4 > self.MEMO_BYTES:
                self._memo.clear()
            row = self._memo[token] = self.packed.rows(torch.tensor([token]))[0]
        return row


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
        gate, up = self.w13.forward(x).split(self.hidden, dim=-1)  # (B, T, hidden) each
        return self.w2.forward(F.silu(gate) * up)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


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


class Transformer(nn.Module):
    """The native causal LM. ``forward`` returns logits ``(B, T, vocab)`` in fp32."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.tok_embeddings = Embedding(args.vocab_size, args.dim)
        self.layers = nn.ModuleList(Block(args) for _ in range(args.n_layers))
        self.norm = RMSNorm(args.dim, args.norm_eps)
        self.output = Linear(args.dim, args.vocab_size)
        self._rope_cache: torch.Tensor | None = None
        self._rot_cache: torch.Tensor | None = None
        self._fused: tuple | bool | None = None  # the C layer descriptors, built on first use

    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), ...: tensors may move
        self._fused = None
        self._rope_cache = self._rot_cache = None
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
        return KVCache(a.n_layers, batch_size, a.n_kv_heads, max_seq_len, a.head_dim, torch.float32, self.device)

    @property
    def device(self) -> torch.device:
        return self.tok_embeddings.packed.data.device

    @property
    def is_quantized(self) -> bool:
        """Are the decoder's matrices stored in 8 bits or fewer (I8, Q4)?"""
        return any(lin.packed.quantized for blk in self.layers for lin in _linears(blk))

    @property
    def weight_format(self) -> str:
        """The formats of the decoder's matrices, e.g. ``Q4`` or ``Q4+I8`` (head apart)."""
        fmts = sorted({lin.packed.fmt.name for blk in self.layers for lin in _linears(blk)})
        return "+".join(fmts) + f" (head {self.output.packed.fmt.name})"

    def _rot_table(self, length: int) -> torch.Tensor:
        """The rotations as real (cos, sin) pairs ``(n, head_dim / 2, 2)``, contiguous (for the C kernels)."""
        if self._rot_cache is None or self._rot_cache.shape[0] < length:
            self._rot_cache = torch.view_as_real(self._rope_table(length)).contiguous()
        return self._rot_cache

    def _rot_rows(self, start: int, T: int) -> torch.Tensor:
        """The (cos, sin) rows of positions ``start .. start + T - 1``: a slice of the table."""
        return self._rot_table(start + T)[start : start + T]

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
        fused = self._fused_layers(cache)
        if fused is not None:  # every layer, the final norm and the head: one C call per row
            n_out = 1 if last_only else T
            logits = torch.empty(B, n_out, self.output.out_features)
            for b in range(B):
                if positions is None:  # a slice of the table: no gather on the decoding path
                    rot = self._rot_rows(starts[b], T)
                else:
                    rot = self._rot_table(int(positions[b].max()) + 1)[positions[b]]
                self._run_fused(fused, tokens[b], rot, cache, b, tree_mask, logits[b])
            cache.advance(T)
            return self._full_vocab(logits)
        if positions is None:
            positions = torch.tensor(starts, device=tokens.device)[:, None] + torch.arange(T, device=tokens.device)
        freqs = self._rope_table(int(positions.max()) + 1)[positions][:, :, None]  # (B, T, 1, hd/2) complex
        x = self.tok_embeddings(tokens)  # (B, T, dim)
        mask = self._mask(starts, T, tree_mask, tokens.device)
        for i, layer in enumerate(self.layers):
            x = layer.forward(x, freqs, cache, i, mask)
        cache.advance(T)
        if last_only:
            x = x[:, -1:]
        return self._full_vocab(self.output.forward(self.norm.forward(x)).float())

    def greedy_next(self, token: int, cache: KVCache, x: torch.Tensor, logits: torch.Tensor) -> int | None:
        """Feed ``token`` at the cache's cursor and return the argmax of its logits (the first, on ties),
        or None where the fused kernels do not run this model on ``cache`` (the caller then takes
        :meth:`forward`). The same kernel call as a one-token :meth:`forward`, so the same logits bit for
        bit, without the tensors a general forward builds around it: the one-token greedy step of
        decoding. Each of those tensor operations costs 25-45 us right after a forward, which has
        evicted the interpreter's data from the caches (~4% of a token of the 4-bit target).
        ``x`` (dim,) and ``logits`` (head rows,) are the caller's fp32 buffers, reused step to step."""
        fused = self._fused_layers(cache)
        if fused is None or cache.batch_size != 1:
            return None
        start = cache.seqlens[0]
        assert start < cache.max_seq_len, "KV cache overflow"
        ctypes.memmove(x.data_ptr(), self.tok_embeddings.row(token).data_ptr(), self.args.dim * 4)
        rot = self._rot_table(start + 1)
        self._sc_forward(fused, x, 1, rot.data_ptr() + start * rot.stride(0) * rot.element_size(), None, cache, 0,
                         logits, 1)
        cache.seqlens[0] = start + 1
        return int(logits.numpy().argmax())

    @torch.inference_mode()
    def forward_batch(self, items: list[tuple[torch.Tensor, KVCache]], last_only: bool = False) -> list[torch.Tensor]:
        """Several sequences in one forward: ``items`` are ``(tokens (T_i,), cache)`` pairs, each cache
        one sequence's (batch size 1); returns each one's logits ``(T_i, V)`` (``(1, V)`` if last_only).

        With the C kernels every weight is read once for all the sequences' tokens (continuous
        batching), and each token's logits are bit-identical to a forward of its sequence alone.
        Without them the sequences run one after the other."""
        if not items:
            return []
        for tokens, cache in items:
            assert cache.batch_size == 1, "forward_batch takes one cache per sequence"
            assert cache.seqlens[0] + tokens.shape[0] <= cache.max_seq_len, "KV cache overflow"
        fused = self._fused_layers(items[0][1])
        strides = {cache.k.stride(0) for _, cache in items}
        if fused is None or len(strides) > 1 or any(self._fused_layers(c) is None for _, c in items[1:]):
            return [self.forward(t[None], c, last_only=last_only)[0] for t, c in items]
        k, layers, dims, head = fused
        n = len(items)
        Ts = [int(t.shape[0]) for t, _ in items]
        n_outs = [1 if last_only else T for T in Ts]
        x = self.tok_embeddings(torch.cat([t for t, _ in items])).contiguous()  # (sum T, dim)
        rot = torch.cat([self._rot_rows(c.seqlens[0], T) for (_, c), T in zip(items, Ts)]).contiguous()
        logits = torch.empty(sum(n_outs), self.output.out_features)
        ints = ctypes.c_int * n
        ptrs = ctypes.c_void_p * n
        status = k.lib.sc_forward_batch(
            layers, self.args.n_layers, ctypes.byref(dims), x.data_ptr(), n, ints(*Ts), rot.data_ptr(), None,
            ptrs(*[c.k.data_ptr() for _, c in items]), ptrs(*[c.v.data_ptr() for _, c in items]), strides.pop(),
            ints(*[c.seqlens[0] for _, c in items]), ints(*[c.max_seq_len for _, c in items]),
            self.norm.weight.data_ptr(), ctypes.byref(head), logits.data_ptr(), ints(*n_outs),
        )
        if status:
            raise MemoryError("out of memory in the decoder kernels")
        for T, (_, cache) in zip(Ts, items):
            cache.advance(T)
        return list(self._full_vocab(logits).split(n_outs))

    def _full_vocab(self, logits: torch.Tensor) -> torch.Tensor:
        """Logits over the whole vocabulary; a draft with a reduced head gives -inf to the rest."""
        V = self.args.vocab_size
        if logits.shape[-1] == V:
            return logits
        full = torch.full((*logits.shape[:-1], V), float("-inf"))
        full[..., : logits.shape[-1]] = logits
        return full

    def _fused_layers(self, cache: KVCache):
        """(kernels, C layer array, dims) when the whole decoder can run in ``sc_forward``."""
        k = kernels.get()
        if k is None or cache.k.dtype != torch.float32 or not cache.k.is_contiguous() or cache.k.device.type != "cpu":
            return None
        if self._fused is None:
            self._fused = self._describe_layers() or False
        return (k, *self._fused) if self._fused else None

    def _describe_layers(self):
        a = self.args
        if a.dim % 32 or a.intermediate_size % 32 or a.n_heads * a.head_dim % 32 or not self.output.kernel_ready():
            return None
        arr = (kernels.SCLayer * a.n_layers)()
        for i, blk in enumerate(self.layers):
            att, ff = blk.attention, blk.feed_forward
            arr[i] = kernels.SCLayer(
                blk.attention_norm.weight.data_ptr(),
                blk.ffn_norm.weight.data_ptr(),
                sc_mat(att.wqkv.packed, att.wqkv.bias),
                sc_mat(att.wo.packed, att.wo.bias),
                sc_mat(ff.w13.packed, ff.w13.bias),
                sc_mat(ff.w2.packed, ff.w2.bias),
            )
        dims = kernels.SCDims(a.dim, a.n_heads, a.n_kv_heads, a.head_dim, a.intermediate_size, a.norm_eps)
        head = sc_mat(self.output.packed, self.output.bias)
        return arr, dims, head

    def _run_fused(self, fused, tokens: torch.Tensor, rot: torch.Tensor, cache: KVCache, row: int,
                   tree_mask: torch.Tensor | None, logits: torch.Tensor) -> None:
        """Every layer, the final norm and the head for one row in one ``sc_forward`` call:
        tokens (T,) -> logits (n_out, vocab) of the last n_out tokens, written into ``logits``.
        rot: (T, hd/2, 2) contiguous (cos, sin) of each token's position."""
        x = self.tok_embeddings.forward(tokens).contiguous()  # (T, dim)
        mask = None if tree_mask is None else tree_mask[row].to(torch.uint8).contiguous()
        self._sc_forward(fused, x, tokens.shape[0], rot.data_ptr(), None if mask is None else mask.data_ptr(), cache,
                         row, logits, logits.shape[0])

    def _sc_forward(self, fused, x: torch.Tensor, T: int, rot_ptr: int, mask_ptr: int | None, cache: KVCache, row: int,
                    logits: torch.Tensor, n_out: int) -> None:
        """The ``sc_forward`` call: ``x`` (T, dim) in place through every layer against row ``row`` of the
        cache (from its cursor), the logits of the last ``n_out`` tokens into ``logits``."""
        k, layers, dims, head = fused
        kv_row = cache.k.stride(1) * row * cache.k.element_size()
        status = k.lib.sc_forward(
            layers, self.args.n_layers, ctypes.byref(dims), x.data_ptr(), T, rot_ptr, mask_ptr,
            cache.k.data_ptr() + kv_row, cache.v.data_ptr() + kv_row, cache.k.stride(0), cache.seqlens[row],
            cache.max_seq_len, self.norm.weight.data_ptr(), ctypes.byref(head), logits.data_ptr(), n_out,
        )
        if status:
            raise MemoryError("out of memory in the decoder kernels")

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
    def _tensors(self) -> list[torch.Tensor]:
        ts = list(self.parameters()) + list(self.buffers()) + self.tok_embeddings.packed.tensors()
        for m in self.modules():
            if isinstance(m, Linear):
                ts += m.packed.tensors() + ([] if m.bias is None else [m.bias])
            elif isinstance(m, RMSNorm):
                ts.append(m.weight)
        return ts

    @property
    def nbytes(self) -> int:
        """Bytes of the weights as stored (tied or shared tensors counted once)."""
        seen, total = set(), 0
        for t in self._tensors():
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
        return total

    @property
    def decode_bytes(self) -> int:
        """Weight bytes one decoding step reads: every matrix once (an untied embedding table
        only by the rows it looks up, so not at all here)."""
        seen, total = set(), 0
        for m in self.modules():
            ts = m.packed.tensors() if isinstance(m, Linear) else [m.weight] if isinstance(m, RMSNorm) else []
            for t in ts:
                if t.data_ptr() not in seen:
                    seen.add(t.data_ptr())
                    total += t.numel() * t.element_size()
        return total

    def num_parameters(self) -> int:
        """Weights of the model (tied matrices counted once)."""
        seen, total = set(), 0
        mats = [self.tok_embeddings.packed] + [m.packed for m in self.modules() if isinstance(m, Linear)]
        for p in mats:
            if p.data.data_ptr() not in seen:
                seen.add(p.data.data_ptr())
                total += p.shape[0] * p.shape[1]
        return total + sum(m.weight.numel() for m in self.modules() if isinstance(m, RMSNorm))

    def load_hf_state_dict(self, sd: dict, precision: str = "fp32") -> None:
        """Load Hugging Face ``LlamaForCausalLM``-style weights, fusing q/k/v and gate/up.

        Values may be tensors or :class:`PackedWeight`. ``precision="stored"`` keeps each matrix
        in its format (bf16, fp16, GGUF blocks); ``"fp32"`` dequantizes every matrix to fp32."""
        if precision not in ("stored", "int8", "fp32"):
            raise ValueError(f"precision must be 'stored', 'int8' or 'fp32', got {precision!r}")

        def take(name: str):
            if name not in sd:
                raise ValueError(f"weight {name!r} is missing from the checkpoint")
            return sd[name]

        def mat(name: str) -> PackedWeight:
            w = take(name)
            p = w if isinstance(w, PackedWeight) else PackedWeight.dense(w if w.is_floating_point() else w.float())
            return PackedWeight.dense(p.dequantize()) if precision == "fp32" and p.fmt != 0 else p

        def vec(name: str) -> torch.Tensor:
            w = take(name)
            return (w.dequantize().flatten() if isinstance(w, PackedWeight) else w).detach().float().contiguous()

        a = self.args
        perm_q, perm_k = rope_row_order(a.n_heads, a.head_dim), rope_row_order(a.n_kv_heads, a.head_dim)
        for i, blk in enumerate(self.layers):
            p = f"model.layers.{i}."
            att, ff = blk.attention, blk.feed_forward
            wq, wk = mat(p + "self_attn.q_proj.weight"), mat(p + "self_attn.k_proj.weight")
            if not wq.rope_ordered:  # (a GGUF loader may have taken the rows in this order already)
                wq, wk = wq.select_rows(perm_q), wk.select_rows(perm_k)
            bqkv = None
            if a.qkv_bias:
                bqkv = torch.cat([vec(p + "self_attn.q_proj.bias")[perm_q], vec(p + "self_attn.k_proj.bias")[perm_k],
                                  vec(p + "self_attn.v_proj.bias")])
            att.wqkv.set(concat([wq, wk, mat(p + "self_attn.v_proj.weight")]), bqkv)
            att.wo.set(mat(p + "self_attn.o_proj.weight"), vec(p + "self_attn.o_proj.bias") if a.o_bias else None)
            b13 = None
            if a.mlp_bias:
                b13 = torch.cat([vec(p + "mlp.gate_proj.bias"), vec(p + "mlp.up_proj.bias")])
            ff.w13.set(concat([mat(p + "mlp.gate_proj.weight"), mat(p + "mlp.up_proj.weight")]), b13)
            ff.w2.set(mat(p + "mlp.down_proj.weight"), vec(p + "mlp.down_proj.bias") if a.mlp_bias else None)
            with torch.no_grad():
                blk.attention_norm.weight.copy_(vec(p + "input_layernorm.weight"))
                blk.ffn_norm.weight.copy_(vec(p + "post_attention_layernorm.weight"))
        with torch.no_grad():
            self.norm.weight.copy_(vec("model.norm.weight"))
        self.tok_embeddings.use(mat("model.embed_tokens.weight"))
        head = sd.get("lm_head.weight")
        if isinstance(head, PackedWeight) and head.fmt == Format.QR:  # tied or not: its own QR copy
            self.output.set(head)
        elif a.tie_embeddings or "lm_head.weight" not in sd:
            self.output.set(self.tok_embeddings.packed)  # tied: one tensor, read once
        else:
            self.output.set(mat("lm_head.weight"))
        self._fused = None
        if all(m.packed.fmt in (Format.F32, Format.F16, Format.BF16) for blk in self.layers for m in _linears(blk)):
            self._place_weights()

    def _place_weights(self, keep: set[int] = frozenset()) -> None:
        """Move every weight (but those whose ``data_ptr`` is in ``keep``) into one block of 2 MiB
        pages in the order a forward reads them (:mod:`.pages`); tied and shared tensors stay
        shared. Done for a target with dense float layers, whose products stream memory (an fp32
        SmolLM2-135M forward ~3% faster, Zen 4, avx512), and for the matrices of a quantized copy
        (the INT8 draft's one-token forward 4.71 -> 4.29 ms). A 4-bit target's blocks are not moved:
        its products are bound by the dequantization (no difference measured), and the copy would
        cost time at load."""
        mods: list = []
        for blk in self.layers:
            mods += [blk.attention_norm, *_linears(blk)[:2], blk.ffn_norm, *_linears(blk)[2:]]
        mods += [self.norm, self.output, self.tok_embeddings]

        def tensors(m) -> list[torch.Tensor]:
            if isinstance(m, RMSNorm):
                return [m.weight.data]
            bias = getattr(m, "bias", None)
            return m.packed.tensors() + ([] if bias is None else [bias])

        mem = pages.Block([t for m in mods for t in tensors(m) if t.data_ptr() not in keep])
        for m in mods:
            if isinstance(m, RMSNorm):
                m.weight.data = mem.place(m.weight.data)
                continue
            p = m.packed
            p.data = mem.place(p.data)
            if p.sm is not None:
                p.sm = mem.place(p.sm)
            if getattr(m, "bias", None) is not None:
                m.bias = mem.place(m.bias)
        self._fused = None


def _linears(blk: Block) -> list[Linear]:
    return [blk.attention.wqkv, blk.attention.wo, blk.feed_forward.w13, blk.feed_forward.w2]


def rope_row_order(n_heads: int, head_dim: int) -> torch.Tensor:
    """Row permutation from the Hugging Face rotate-half layout of a q or k projection (pairs
    ``(i, i + hd/2)``) to interleaved pairs ``(2i, 2i + 1)``, so that RoPE is one complex
    multiplication. q and k get the same order, so ``q . k`` is unchanged."""
    half = head_dim // 2
    within = torch.stack([torch.arange(half), torch.arange(half) + half], dim=1).flatten()  # (hd,)
    return (torch.arange(n_heads)[:, None] * head_dim + within[None]).flatten()


def count_flops_per_token(args: ModelArgs) -> int:
    """Matmul FLOPs of one token's forward (2 per multiply-add), attention over the cache excluded."""
    a = args
    per_layer = a.dim * (a.n_heads + 2 * a.n_kv_heads) * a.head_dim + a.n_heads * a.head_dim * a.dim
    per_layer += 3 * a.dim * a.intermediate_size
    return 2 * (a.n_layers * per_layer + a.dim * a.vocab_size)


__all__ = ["ModelArgs", "Transformer", "Linear", "Embedding", "KVCache", "SUPPORTED_ARCHITECTURES", "count_flops_per_token"]
