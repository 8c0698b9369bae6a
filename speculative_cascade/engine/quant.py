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

from .kernels import linear_int8_kernel
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


def quantize_int8(model: Transformer) -> Transformer:
    """Return an INT8 copy of a native model; the original is left untouched.

    The copy shares the (fp32) token embedding table with the original: a lookup reads
    one row, so quantizing it would save memory but no time.
    """
    if not isinstance(model, Transformer):
        raise ValueError("INT8 quantization needs a native model (Llama, Mistral or Qwen2 family)")
    # Copy the module tree but share every tensor: the Linear weights are replaced below,
    # the rest (embedding table, norms) is read-only and shared with the original.
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    q = copy.deepcopy(model, memo)
    for parent in list(q.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                setattr(parent, name, Int8Linear(child))
    q._rope_cache = None
    q._fused = None
    q.quantized = "int8"
    return q
