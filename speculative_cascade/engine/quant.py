"""INT8 weight-only quantization for drafts.

Every :class:`~speculative_cascade.engine.model.Linear` of a native model (the output
projection included) is replaced by :class:`Int8Linear`: per-output-channel scales
``s = max|W_row| / 127`` and ``W_int8 = round(W / s)`` (the seed paper's equation 2).
Activations stay fp32: ``y = (x @ W_int8.T) * s``.

On CPUs a product over few rows runs in the C kernel of :mod:`..kernels`, which reads a quarter of
the fp32 weight bytes; without it (no compiler, another device) and for a prefill it
dequantizes the layer's weight and calls BLAS. Activation quantization (fbgemm's dynamic int8)
was measured and rejected: per-tensor activation scales break on Llama's outlier
channels (28% greedy agreement with the target against 97% here).

The quantized model is only ever a *draft*: speculative decoding stays lossless with
respect to the full-precision target.
"""

from __future__ import annotations

import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from .kernels import linear_int8_kernel, linear_q4_kernel
from .model import Linear, Transformer


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w (N, K)`` -> ``(w_int8 (N, K), scales (N,))`` with ``w ~= w_int8 * scales[:, None]``."""
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    w_int8 = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return w_int8, scales.to(torch.float32)


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Module | None = None, *, w_int8=None, scales=None, bias=None) -> None:
        """From a (fp32) linear layer, or from already quantized ``w_int8 (N, K)``, ``scales (N,)``."""
        super().__init__()
        if linear is not None:
            w_int8, scales = quantize_weight(linear.weight.detach().to(torch.float32))
            bias = linear.bias
        self.out_features, self.in_features = w_int8.shape
        self.register_buffer("w_int8", w_int8.contiguous())
        self.register_buffer("scales", scales.to(torch.float32).contiguous())
        self.bias = None if bias is None else bias.detach().to(torch.float32).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)
        M, N = x2.shape[0], self.out_features
        small = M <= 32  # decoding and drafting; a prefill is compute-bound: dequantize, use BLAS
        kernel = linear_int8_kernel() if small and x.device.type == "cpu" and x.dtype == torch.float32 else None
        if kernel is not None:
            x2 = x2.contiguous()
            y = torch.empty(M, N)
            b = self.bias.data_ptr() if self.bias is not None else None
            kernel(x2.data_ptr(), self.w_int8.data_ptr(), self.scales.data_ptr(), b, y.data_ptr(), M, N, K)
            return y.view(*lead, N)
        w = self.w_int8.to(x.dtype) * self.scales.to(x.dtype)[:, None]  # (N, K)
        return F.linear(x, w, self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, int8 per-channel"


GROUP = 32  # 4-bit weights: one (scale, min) pair per 32 consecutive inputs, as GGML's Q4_1


def quantize_weight_q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w (N, K)`` -> ``(packed (N, K / 2) uint8, scale_min (N, K / 32, 2))``, asymmetric 4-bit groups.

    ``w ~= d * q + mn`` with ``q`` in 0..15, ``d = (max - min) / 15`` and ``mn = min`` per group.
    A weight that was itself dequantized from Q4_1 (the embedded GGUF) is reproduced exactly
    wherever its block used both q = 0 and q = 15."""
    N, K = w.shape
    g = w.float().view(N, K // GROUP, GROUP)
    mn = g.amin(-1)
    d = (g.amax(-1) - mn) / 15.0
    q = torch.where(d[..., None] > 0, torch.round((g - mn[..., None]) / d[..., None].clamp(min=1e-30)), 0.0)
    q = q.clamp(0, 15).to(torch.uint8)  # (N, G, 32)
    packed = q[..., :16] | (q[..., 16:] << 4)  # byte j: element j (low nibble), element j + 16 (high)
    return packed.reshape(N, K // 2).contiguous(), torch.stack([d, mn], -1).contiguous()


def dequantize_q4(packed: torch.Tensor, scale_min: torch.Tensor) -> torch.Tensor:
    N, half = packed.shape
    b = packed.view(N, -1, 16)
    q = torch.cat([b & 15, b >> 4], -1).float()  # (N, G, 32)
    return (q * scale_min[..., :1] + scale_min[..., 1:]).reshape(N, half * 2)


class Int4Linear(nn.Module):
    """4-bit weight-only linear layer (groups of 32 along the input, scale and min per group)."""

    def __init__(self, linear: nn.Module) -> None:
        super().__init__()
        self.out_features, self.in_features = linear.weight.shape
        w_q4, scale_min = quantize_weight_q4(linear.weight.detach())
        self.register_buffer("w_q4", w_q4)
        self.register_buffer("scale_min", scale_min)
        self.bias = None if linear.bias is None else linear.bias.detach().to(torch.float32).clone()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead, K = x.shape[:-1], x.shape[-1]
        x2 = x.reshape(-1, K)
        M, N = x2.shape[0], self.out_features
        kernel = linear_q4_kernel() if M <= 32 and x.device.type == "cpu" and x.dtype == torch.float32 else None
        if kernel is not None:
            x2 = x2.contiguous()
            y = torch.empty(M, N)
            b = self.bias.data_ptr() if self.bias is not None else None
            if kernel(x2.data_ptr(), self.w_q4.data_ptr(), self.scale_min.data_ptr(), b, y.data_ptr(), M, N, K):
                raise MemoryError("out of memory in the 4-bit kernel")
            return y.view(*lead, N)
        return F.linear(x, dequantize_q4(self.w_q4, self.scale_min).to(x.dtype), self.bias)

    def extra_repr(self) -> str:
        return f"in={self.in_features}, out={self.out_features}, 4-bit groups of {GROUP}"


def quantize_int4(model: Transformer) -> Transformer:
    """A 4-bit copy of a native model (decoder layers; the output projection stays INT8).

    Draft only, like :func:`quantize_int8`. Layers whose shapes do not fit 4-bit groups
    (input not a multiple of 32, output not a multiple of 8) fall back to INT8."""
    if not isinstance(model, Transformer):
        raise ValueError("4-bit quantization needs a native model (Llama, Mistral or Qwen2 family)")

    def make(parent, child):
        fits = child.in_features % GROUP == 0 and child.out_features % 8 == 0 and parent is not None
        return Int4Linear(child) if fits else Int8Linear(child)

    return _quantized_copy(model, make, "int4")


def _quantized_copy(model: Transformer, make, tag: str) -> Transformer:
    """Copy the module tree sharing every tensor, then replace each Linear by ``make(parent, linear)``
    (``parent`` None for the output projection). The rest (embedding table, norms) is read-only
    and shared with the original."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    q = copy.deepcopy(model, memo)
    for parent in list(q.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                setattr(parent, name, make(None if parent is q else parent, child))
    q._rope_cache = None
    q._fused = None
    q.quantized = tag
    return q


def quantize_int8(model: Transformer) -> Transformer:
    """Return an INT8 copy of a native model; the original is left untouched.

    The copy shares the (fp32) token embedding table with the original: a lookup reads
    one row, so quantizing it would save memory but no time.
    """
    if not isinstance(model, Transformer):
        raise ValueError("INT8 quantization needs a native model (Llama, Mistral or Qwen2 family)")
    return _quantized_copy(model, lambda parent, child: Int8Linear(child), "int8")
