"""INT8 quantization for drafts.

Every :class:`~speculative_cascade.engine.transformer.Linear` of a native model (the output
projection included) is replaced by :class:`Int8Linear`: per-output-channel scales
``s = max|W_row| / 127`` and ``W_int8 = round(W / s)`` (the seed paper's equation 2).
The activations are quantized too, per block of 32 inputs (format I8Q8, GGML's Q8 way:
``x ~= q_x * amax / 127``), and the kernels take integer dot products: about half the
instructions of widening the int8 weights to fp32 (in cache a product runs ~1.7x faster on
AVX2; a whole forward, whose weights come from memory, ~5%). Measured on SmolLM2-135M (fp32 target, greedy, 8 Spec-Bench answers): the draft's
next token equals the target's at 97.1% of positions, against 97.4% with fp32 activations;
per-tensor activation scales (fbgemm's dynamic int8) were measured earlier and rejected
(28%: Llama's outlier channels), and 7-bit blocks (-63..63) gave 95.3%.

The quantized weights are :class:`~.formats.PackedWeight` matrices (I8Q8, or I8 with one group
per row where K is not a multiple of 64, or Q4), run by the same kernels as the target's;
without them the PyTorch path rounds the activations the same way and runs the dequantized
weight.

The quantized model is only ever a *draft*: speculative decoding stays lossless with
respect to the full-precision target.
"""

from __future__ import annotations

import copy
from dataclasses import replace

import torch

from .formats import PackedWeight
from .transformer import Linear, Transformer


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w (N, K)`` -> ``(w_int8 (N, K), scales (N,))`` with ``w ~= w_int8 * scales[:, None]``."""
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    w_int8 = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return w_int8, scales.to(torch.float32)


def int8_weight(w: torch.Tensor) -> PackedWeight:
    """Per-output-channel INT8: one (scale, 0) group per row."""
    q, s = quantize_weight(w.detach().float())
    return PackedWeight.int8(q, s[:, None])


def Int8Linear(linear: Linear) -> Linear:
    """An INT8 (per-channel) copy of a linear layer, with int8 activations where K allows (I8Q8)."""
    w = int8_weight(linear.weight)
    return Linear.from_packed(w.with_q8_activations() if w.takes_q8_activations else w, linear.bias)


GROUP = 32  # 4-bit weights: one (scale, min) pair per 32 consecutive inputs, as GGML's Q4_1


def quantize_weight_q4(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w (N, K)`` -> ``(packed (N, K / 2) uint8, scale_min (N, K / 32, 2))``, asymmetric 4-bit groups.

    ``w ~= d * q + mn`` with ``q`` in 0..15, ``d = (max - min) / 15`` and ``mn = min`` per group.
    A weight that was itself dequantized from Q4_1 is reproduced exactly wherever its block
    used both q = 0 and q = 15."""
    N, K = w.shape
    g = w.float().view(N, K // GROUP, GROUP)
    mn = g.amin(-1)
    d = (g.amax(-1) - mn) / 15.0
    q = torch.where(d[..., None] > 0, torch.round((g - mn[..., None]) / d[..., None].clamp(min=1e-30)), 0.0)
    q = q.clamp(0, 15).to(torch.uint8)  # (N, G, 32)
    packed = q[..., :16] | (q[..., 16:] << 4)  # byte j: element j (low nibble), element j + 16 (high)
    return packed.reshape(N, K // 2).contiguous(), torch.stack([d, mn], -1).contiguous()


def dequantize_q4(packed: torch.Tensor, scale_min: torch.Tensor) -> torch.Tensor:
    return PackedWeight.q4(packed, scale_min).dequantize()


def Int4Linear(linear: Linear) -> Linear:
    """A 4-bit copy of a linear layer (groups of 32 along the input, scale and min per group)."""
    return Linear.from_packed(PackedWeight.q4(*quantize_weight_q4(linear.weight.detach())), linear.bias)


def quantize_int4(model: Transformer) -> Transformer:
    """A 4-bit copy of a native model (decoder layers; the output projection INT8).

    Draft only, like :func:`quantize_int8`. Layers whose input is not a multiple of 32 fall back to INT8."""
    if not isinstance(model, Transformer):
        raise ValueError("4-bit quantization needs a native model (Llama, Mistral or Qwen2 family)")

    def make(parent, child):
        fits = child.in_features % GROUP == 0 and parent is not None
        return Int4Linear(child) if fits else Int8Linear(child)

    return _quantized_copy(model, make, "int4")


def _quantized_copy(model: Transformer, make, tag: str) -> Transformer:
    """Copy the module tree sharing every tensor, then replace each Linear by ``make(parent, linear)``
    (``parent`` None for the output projection). The rest (embedding table, norms) is read-only
    and shared with the original."""
    memo = {id(t): t for t in model._tensors()}
    memo.update({id(m.packed): m.packed for m in model.modules() if isinstance(m, Linear)})
    memo[id(model.tok_embeddings.packed)] = model.tok_embeddings.packed
    if isinstance(model._fused, tuple):  # C descriptors point at the original's weights: not copied
        memo[id(model._fused)] = None
    q = copy.deepcopy(model, memo)
    for parent in list(q.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Linear):
                setattr(parent, name, make(None if parent is q else parent, child))
    q._rope_cache = q._rot_cache = None
    q._place_weights(keep={t.data_ptr() for t in model._tensors()})  # its own matrices; the shared stay
    q.quantized = tag
    return q


def truncated(model: Transformer, n_layers: int, vocab: int | None = None) -> Transformer:
    """A draft made of the target's first ``n_layers`` layers (its weights shared, not copied), with
    the output head cut to the first ``vocab`` tokens (BPE vocabularies list the frequent ones
    first); the other tokens get -inf. Draft only: it never proposes a token past ``vocab``."""
    if not isinstance(model, Transformer):
        raise ValueError("a truncated draft needs a native model (Llama, Mistral or Qwen2 family)")
    a = model.args
    if not 1 <= n_layers <= a.n_layers:
        raise ValueError(f"layers must be in 1..{a.n_layers}, got {n_layers}")
    if vocab is not None and not 8 <= vocab <= a.vocab_size:
        raise ValueError(f"vocab must be in 8..{a.vocab_size}, got {vocab}")
    d = Transformer.__new__(Transformer)
    torch.nn.Module.__init__(d)

    d.args = replace(a, n_layers=n_layers)
    d.tok_embeddings, d.norm = model.tok_embeddings, model.norm
    d.layers = torch.nn.ModuleList(list(model.layers)[:n_layers])
    out = model.output
    if vocab is not None and vocab < a.vocab_size:
        vocab -= vocab % 8
        out = Linear.from_packed(out.packed.first_rows(vocab), None if out.bias is None else out.bias[:vocab])
    d.output = out
    d._rope_cache = d._rot_cache = None
    d._fused = None
    d.quantized = f"layers {n_layers}" + (f", vocab {vocab}" if vocab else "")
    return d.eval()


def quantize_int8(model: Transformer) -> Transformer:
    """Return an INT8 copy of a native model; the original is left untouched.

    The copy shares the token embedding table with the original: a lookup reads one row,
    so quantizing it would save memory but no time.
    """
    if not isinstance(model, Transformer):
        raise ValueError("INT8 quantization needs a native model (Llama, Mistral or Qwen2 family)")
    return _quantized_copy(model, lambda parent, child: Int8Linear(child), "int8")
