"""Weight matrices in the formats the kernels read: the model's stored format, not fp32 copies.

A :class:`PackedWeight` is an ``(N, K)`` matrix in one of the layouts of ``Format`` (the same
numbers as ``SC_*`` in ``kernels/sc_kernels.h``; docs/kernels.md):

========  =====================================================  ==============================
format    data                                                   activations
========  =====================================================  ==============================
F32/F16/  dense (N, K)                                           fp32
BF16
I8, Q4    int8 or 4-bit codes, an exact (scale, min) per group   fp32 (``--precision stored``)
I8Q8      I8, one scale per row (drafts only)                    int8 per 32
QR        GGUF Q4_0/Q4_1/Q8_0/Q4_K/Q6_K blocks repacked, rows    int8 per super-block (``int8``)
          interleaved by 16 (``kernels/sc_qr.h``)
RAW       GGUF blocks as stored (embedding lookups only)         -
========  =====================================================  ==============================

Every GGUF value is kept exactly in each layout; only QR and I8Q8 round the activations. Other
GGUF types are dequantized to F32 by the ``gguf`` package.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, dequantize

from . import kernels, pages


class Format(IntEnum):
    F32 = 0
    F16 = 1
    BF16 = 2
    I8 = 3
    Q4 = 4
    I8Q8 = 5
    QR = 6
    RAW = 7


_QUANTIZED = (Format.I8, Format.Q4, Format.I8Q8, Format.QR, Format.RAW)
# GGUF types the QR layout holds (kernels/sc_qr.h): type -> (QR type, inputs per activation scale)
QR_TYPES = {
    GGMLQuantizationType.Q4_0: (0, 32),
    GGMLQuantizationType.Q4_1: (1, 32),
    GGMLQuantizationType.Q8_0: (2, 32),
    GGMLQuantizationType.Q4_K: (3, 256),
    GGMLQuantizationType.Q6_K: (4, 256),
}
QR_ROWS = 16
Q8_BLOCK = 32  # I8Q8: activation inputs per scale
Q4_ROWS = 8  # rows interleaved per block in the Q4 layout
_TORCH_DTYPE = {Format.F32: torch.float32, Format.F16: torch.float16, Format.BF16: torch.bfloat16}


@dataclass
class PackedWeight:
    fmt: Format
    data: torch.Tensor
    sm: torch.Tensor | None  # (N, K / group, 2): scale, min (quantized formats only); fp16 where exact, else fp32
    group: int  # inputs per (scale, min) pair; K when unquantized
    shape: tuple[int, int]  # (N, K)
    qtype: int = -1  # QR: the layout's type (sc_qr.h); RAW: the GGUF type
    tail: "PackedWeight | None" = None  # QR: further rows in another QR type (a fused q/k/v)
    rope_ordered: bool = False  # q/k rows already in the decoder's interleaved RoPE order

    # -- construction ------------------------------------------------------------------
    @classmethod
    def dense(cls, w: torch.Tensor) -> "PackedWeight":
        """An unquantized matrix kept in its dtype (fp32, fp16 or bf16; anything else becomes fp32)."""
        fmt = {torch.float16: Format.F16, torch.bfloat16: Format.BF16}.get(w.dtype, Format.F32)
        w = w.to(_TORCH_DTYPE[fmt]).contiguous()
        return cls(fmt, w, None, w.shape[1], tuple(w.shape))

    @classmethod
    def int8(cls, q: torch.Tensor, scale: torch.Tensor, minimum: torch.Tensor | None = None) -> "PackedWeight":
        """int8 ``q (N, K)`` with ``scale (N, G)`` (and ``minimum``): groups of K / G inputs."""
        N, K = q.shape
        scale = scale.reshape(N, -1).float()
        minimum = torch.zeros_like(scale) if minimum is None else minimum.reshape(N, -1).float()
        sm = _compact(torch.stack([scale, minimum], -1))
        return cls(Format.I8, q.to(torch.int8).contiguous(), sm, K // scale.shape[1], (N, K))

    @property
    def takes_q8_activations(self) -> bool:
        """Can this matrix run as I8Q8: I8 with one group per row, no mins, K a multiple of 64?"""
        return self.fmt == Format.I8 and self.group == self.shape[1] and not self.has_min and self.shape[1] % 64 == 0

    def with_q8_activations(self) -> "PackedWeight":
        """This I8 matrix run against int8-quantized activations (I8Q8, drafts only); the same
        weights, shared. Needs :attr:`takes_q8_activations`."""
        if not self.takes_q8_activations:
            raise ValueError("I8Q8 needs I8 weights with one scale per row, no mins, and K a multiple of 64")
        return PackedWeight(Format.I8Q8, self.data, self.sm, self.group, self.shape)

    @classmethod
    def q4(cls, packed: torch.Tensor, sm: torch.Tensor) -> "PackedWeight":
        """Nibbles ``(N, K / 2)`` in GGML Q4_1 order with ``sm (N, K / 32, 2)``, rows interleaved in
        blocks of eight: ``(N / 8, K / 32, 8, 16)``. N not a multiple of 8: I8 (exact)."""
        N, half = packed.shape
        G = half // 16
        if N % Q4_ROWS:
            b = packed.view(N, G, 16)
            q = torch.cat([b & 15, b >> 4], -1).reshape(N, 2 * half).to(torch.int8)
            return cls.int8(q, sm[..., 0], sm[..., 1])
        data = packed.reshape(N // Q4_ROWS, Q4_ROWS, G, 16).transpose(1, 2).contiguous()
        sm = _compact(sm.float()).reshape(N // Q4_ROWS, Q4_ROWS, G, 2).transpose(1, 2).contiguous()
        return cls(Format.Q4, data, sm, 32, (N, 2 * half))

    @classmethod
    def qr(cls, data: np.ndarray, qtype, shape: tuple[int, int], rows: np.ndarray | None = None,
           force: bool = False, out: torch.Tensor | None = None) -> "PackedWeight | None":
        """GGUF blocks ``data`` (one row of blocks per row) repacked for integer dot products with
        int8 activations (Format.QR, kernels/sc_qr.h), rows taken in the order ``rows`` (None: as
        stored); without copying the file's values to fp32. None where the layout cannot hold them
        (another type, K not a multiple of its super-block, a Q8_0 code of -128) or where the kernels
        in use have no vector QR products (none, or the baseline build: ``force`` packs anyway).
        ``out``: the uint8 memory to fill (:func:`qr_bytes` of it), e.g. a slice of a fused matrix's."""
        k = _any_kernels()
        if k is None or qtype not in QR_TYPES:
            return None
        if not force:
            if kernels.get() is None or not kernels.get().lib.sc_qr_native():
                return None
        qt, S = QR_TYPES[qtype]
        N, K = shape
        nbytes = k.lib.sc_qr_bytes(qt, N, K)
        if nbytes < 0:
            return None
        raw = np.ascontiguousarray(data)
        order = None if rows is None else np.ascontiguousarray(rows, dtype=np.int32)
        if out is None:
            out = pages.block(int(nbytes))
        assert out.numel() == nbytes and out.dtype == torch.uint8 and out.is_contiguous()
        rc = k.lib.sc_qr_repack(qt, raw.ctypes.data, None if order is None else order.ctypes.data, N, K, out.data_ptr())
        if rc != 0:
            return None
        return cls(Format.QR, out, None, S, (N, K), qt)

    @classmethod
    def raw(cls, data: np.ndarray, qtype, shape: tuple[int, int]) -> "PackedWeight":
        """GGUF blocks kept as stored, row by row (Format.RAW): an embedding table whose lookups
        dequantize the rows they read (the ``gguf`` package), never a kernel's matrix."""
        N, K = shape
        t = torch.from_numpy(np.ascontiguousarray(data, dtype=np.uint8).reshape(N, -1).copy())
        return cls(Format.RAW, t, None, K, (N, K), int(qtype))

    # -- reading -------------------------------------------------------------------------
    @property
    def quantized(self) -> bool:
        return self.fmt in _QUANTIZED

    def _q4_rows(self, rows) -> tuple[torch.Tensor, torch.Tensor]:
        """(nibbles (n, K / 32, 16), sm (n, K / 32, 2)) of some rows, in row order."""
        idx = torch.arange(self.shape[0])[rows].reshape(-1)
        b, j = idx // Q4_ROWS, idx % Q4_ROWS
        return self.data[b, :, j, :], self.sm[b, :, j, :]

    def row_sm(self, rows=slice(None)) -> torch.Tensor:
        """(scale, min) pairs of some rows (quantized formats), in row order: (n, K / group, 2)."""
        return self._q4_rows(rows)[1] if self.fmt == Format.Q4 else self.sm[rows]

    def codes(self, rows=slice(None)) -> torch.Tensor:
        """Integer codes as float32 (quantized formats): (n, K)."""
        if self.fmt in (Format.I8, Format.I8Q8):
            return self.data[rows].float()
        b = self._q4_rows(rows)[0]
        return torch.cat([b & 15, b >> 4], -1).reshape(b.shape[0], -1).float()

    def dequantize(self, rows=slice(None)) -> torch.Tensor:
        """The fp32 matrix (or some of its rows), exactly as the kernels see it."""
        if self.fmt == Format.QR:
            return self._qr_dequantize()[rows]
        if self.fmt == Format.RAW:
            idx = torch.arange(self.shape[0])[rows].reshape(-1).numpy()
            k, qtype = _any_kernels(), GGMLQuantizationType(self.qtype)
            if k is not None and qtype in QR_TYPES:  # the kernels' reading of the blocks (the same values)
                src = np.ascontiguousarray(self.data.numpy()[idx])
                out = torch.empty(len(idx), self.shape[1])
                k.lib.sc_gguf_dequant(QR_TYPES[qtype][0], src.ctypes.data, len(idx), self.shape[1], out.data_ptr())
                return out
            w = dequantize(self.data.numpy()[idx], qtype)
            return torch.from_numpy(np.ascontiguousarray(w, dtype=np.float32).reshape(len(idx), self.shape[1]))
        if not self.quantized:
            return self.data[rows].float()
        q = self.codes(rows)
        n, K = q.shape
        sm = self.row_sm(rows)
        q = q.view(n, K // self.group, self.group)
        # q * scale + min with one rounding, as the kernels' fused multiply-add: in float64
        # q * scale is exact (an integer times a float32), so the single rounding is the add's.
        w = (q.double() * sm[..., :1].double() + sm[..., 1:].double()).float()
        return w.reshape(n, K)

    def _qr_dequantize(self, row0: int = 0, n: int | None = None) -> torch.Tensor:
        """QR rows row0..row0+n-1 (all: the matrix and its tail) as fp32, from the kernels."""
        if n is None:
            parts, p = [], self
            while p is not None:
                own = p.shape[0] - (p.tail.shape[0] if p.tail is not None else 0)
                parts.append(p._qr_dequantize(0, own))
                p = p.tail
            return torch.cat(parts)
        out = torch.empty(n, self.shape[1])
        _any_kernels().lib.sc_qr_dequant(self.qtype, self.data.data_ptr(), self.shape[1], row0, n, out.data_ptr())
        return out

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Embedding lookup: dequantized rows ``ids`` (any shape) -> (*ids.shape, K)."""
        flat = ids.reshape(-1)
        if self.fmt == Format.QR and self.tail is None:
            out = torch.cat([self._qr_dequantize(int(i), 1) for i in flat]) if flat.numel() else torch.empty(0, self.shape[1])
            return out.view(*ids.shape, self.shape[1])
        if self.fmt in (Format.QR, Format.RAW):
            return self.dequantize(flat).view(*ids.shape, self.shape[1])
        if self.quantized and flat.numel() <= 64 and self.data.device.type == "cpu":
            return self._few_rows(flat.cpu().numpy()).view(*ids.shape, self.shape[1])
        return self.dequantize(flat).view(*ids.shape, self.shape[1])

    def _few_rows(self, idx: np.ndarray) -> torch.Tensor:
        """:meth:`dequantize` of a few rows in NumPy: the same float64 arithmetic, a few times less
        overhead (decoding looks one embedding row up a token; measured 69 -> 20 us)."""
        data, sm = self.data.numpy(), self.sm.numpy()
        if self.fmt == Format.Q4:
            b, j = idx // Q4_ROWS, idx % Q4_ROWS
            nib, sm = data[b, :, j, :], sm[b, :, j, :]  # (n, K / 32, 16), (n, K / 32, 2)
            q = np.concatenate([nib & 15, nib >> 4], -1)
        else:
            q, sm = data[idx], sm[idx]
        q = q.astype(np.float64).reshape(len(idx), -1, self.group)
        sm = sm.astype(np.float64)
        w = (q * sm[..., :1] + sm[..., 1:]).astype(np.float32)
        return torch.from_numpy(w.reshape(len(idx), self.shape[1]))

    @functools.cached_property
    def has_min(self) -> bool:
        """Is some group's min not 0 (quantized formats)? The kernels skip the mins' term otherwise."""
        return self.sm is not None and bool(self.sm[..., 1].any())

    @property
    def nbytes(self) -> int:
        own = self.data.numel() * self.data.element_size() + (0 if self.sm is None else self.sm.nbytes)
        return own + (0 if self.tail is None else self.tail.nbytes)

    def tensors(self) -> list[torch.Tensor]:
        return [self.data] + ([] if self.sm is None else [self.sm]) + ([] if self.tail is None else self.tail.tensors())

    # -- reshaping -----------------------------------------------------------------------
    def select_rows(self, perm: torch.Tensor) -> "PackedWeight":
        """Rows reordered (exact in every format; QR and RAW: through fp32, then I8 of the values)."""
        if self.fmt in (Format.QR, Format.RAW):
            return PackedWeight.dense(self.dequantize()[perm])
        if self.fmt == Format.Q4:
            b, sm = self._q4_rows(perm)
            return PackedWeight.q4(b.reshape(len(perm), -1), sm)
        return PackedWeight(self.fmt, self.data[perm].contiguous(), None if self.sm is None else
                            self.sm[perm].contiguous(), self.group, (len(perm), self.shape[1]))

    def first_rows(self, n: int) -> "PackedWeight":
        """The first ``n`` rows, sharing memory (Q4: n a multiple of 8; QR: of 16)."""
        if self.fmt == Format.QR:
            assert n % QR_ROWS == 0 and self.tail is None
            per_block = self.data.numel() // -(-self.shape[0] // QR_ROWS)
            return PackedWeight(self.fmt, self.data[: n // QR_ROWS * per_block], None, self.group,
                                (n, self.shape[1]), self.qtype)
        if self.fmt == Format.Q4:
            assert n % Q4_ROWS == 0
            return PackedWeight(self.fmt, self.data[: n // Q4_ROWS], self.sm[: n // Q4_ROWS], self.group,
                                (n, self.shape[1]))
        return PackedWeight(self.fmt, self.data[:n], None if self.sm is None else self.sm[:n], self.group,
                            (n, self.shape[1]))

    def regroup(self, group: int) -> "PackedWeight":
        """Quantized weights as I8 with smaller groups (exact)."""
        assert self.quantized and self.group % group == 0
        q = self.codes().to(torch.int8)
        sm = self.row_sm().repeat_interleave(self.group // group, dim=1)
        return PackedWeight(Format.I8, q.contiguous(), sm.contiguous(), group, self.shape)


def q8_activations(x: torch.Tensor) -> torch.Tensor:
    """``x (..., K)`` as I8Q8's kernels see it: each block of 32 inputs rounded to ``q * s`` with
    ``s = amax / 127`` and ``q = round(x * (127 / amax))`` (ties to even) in -127..127."""
    xb = x.float().reshape(*x.shape[:-1], x.shape[-1] // Q8_BLOCK, Q8_BLOCK)
    amax = xb.abs().amax(-1, keepdim=True)
    inv = torch.where(amax > 0, 127.0 / amax, torch.zeros_like(amax))
    q = torch.round(xb * inv).clamp(-127, 127)
    return (q * (amax / 127.0)).reshape(x.shape)


def concat(parts: list[PackedWeight]) -> PackedWeight:
    """Stack matrices along N (fused q/k/v, gate/up). QR matrices chain (each keeps its type; runs
    of one type are joined). Mixed formats meet in the narrowest exact common one: quantized ones
    as I8 with the smallest group; otherwise fp32."""
    if all(p.fmt == Format.QR and p.tail is None for p in parts) and {p.shape[1] for p in parts} == {parts[0].shape[1]}:
        K = parts[0].shape[1]
        runs: list[PackedWeight] = []
        for p in parts:  # consecutive parts of one type: one matrix (whole blocks of rows)
            if runs and runs[-1].qtype == p.qtype and runs[-1].shape[0] % QR_ROWS == 0:
                q = runs[-1]
                base = q.data._base if q.data._base is not None else q.data
                if p.data._base is base and q.data.storage_offset() + q.data.numel() == p.data.storage_offset():
                    data = base[q.data.storage_offset() : p.data.storage_offset() + p.data.numel()]  # side by side already
                else:
                    data = pages.block(q.data.numel() + p.data.numel())
                    data[: q.data.numel()] = q.data
                    data[q.data.numel():] = p.data
                runs[-1] = PackedWeight(Format.QR, data, None, q.group,
                                        (q.shape[0] + p.shape[0], K), q.qtype)
            else:
                runs.append(p)
        out = runs[-1]
        for p in reversed(runs[:-1]):
            out = PackedWeight(Format.QR, p.data, None, p.group, (p.shape[0] + out.shape[0], K), p.qtype, out)
        return out
    if any(p.fmt in (Format.QR, Format.RAW) for p in parts):
        parts = [PackedWeight.dense(p.dequantize()) if p.fmt in (Format.QR, Format.RAW) else p for p in parts]
    fmts = {p.fmt for p in parts}
    groups = {p.group for p in parts}
    if len(fmts) == 1 and len(groups) == 1:
        p0 = parts[0]
        sm = None
        if p0.sm is not None:
            sm = _compact(torch.cat([p.sm.float() for p in parts]))
        N = sum(p.shape[0] for p in parts)
        return PackedWeight(p0.fmt, torch.cat([p.data for p in parts]).contiguous(), sm, p0.group, (N, p0.shape[1]))
    if all(p.quantized for p in parts):
        g = min(groups)
        return concat([p if (p.fmt == Format.I8 and p.group == g) else p.regroup(g) for p in parts])
    return concat([PackedWeight.dense(p.dequantize()) for p in parts])


def qr_bytes(qtype, shape: tuple[int, int]) -> int:
    """Bytes of a GGUF matrix of ``qtype`` in the QR layout; -1 where it cannot hold it."""
    k = _any_kernels()
    if k is None or qtype not in QR_TYPES:
        return -1
    return int(k.lib.sc_qr_bytes(QR_TYPES[qtype][0], *shape))


def _any_kernels():
    """A built kernel library (the one in use, else any): the QR layout is the same in every variant."""
    k = kernels.get()
    if k is None:
        for v in [v for v in kernels.cpu_variants() if v in kernels.built_variants()]:
            try:
                k = kernels.get(v)
            except OSError:
                continue
            if k is not None:
                break
    return k


def _compact(sm: torch.Tensor) -> torch.Tensor:
    """Scales and mins as fp16 when that loses nothing (GGUF's Q8_0, Q4_0 and Q4_1 store fp16 ones):
    a quarter of the weight bytes less for 4-bit weights."""
    sm = sm.contiguous()
    if sm.dtype == torch.float32 and torch.isfinite(sm).all():
        half = sm.half()
        if torch.equal(half.float(), sm):
            return half
    return sm


# -- GGUF blocks -------------------------------------------------------------------------------


def _f16(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a).view(np.float16).astype(np.float32)


def _nibbles_q41_order(v: np.ndarray) -> np.ndarray:
    """Values 0..15 (n, 32) per group -> 16 bytes (n, 16): byte i = v[i] | v[i + 16] << 4."""
    return (v[:, :16] | (v[:, 16:] << 4)).astype(np.uint8)


def _k4_scales(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes per super-block -> 8 six-bit scales and 8 six-bit mins (n, 8) each."""
    s = s.astype(np.uint8)
    sc = np.empty((s.shape[0], 8), np.uint8)
    mn = np.empty((s.shape[0], 8), np.uint8)
    sc[:, :4] = s[:, 0:4] & 63
    mn[:, :4] = s[:, 4:8] & 63
    sc[:, 4:] = (s[:, 8:12] & 0xF) | ((s[:, 0:4] >> 6) << 4)
    mn[:, 4:] = (s[:, 8:12] >> 4) | ((s[:, 4:8] >> 6) << 4)
    return sc, mn


def from_gguf(data: np.ndarray, qtype, shape: tuple[int, int]) -> PackedWeight:
    """A GGUF tensor (``GGUFReader``'s raw ``data``, type, logical ``(N, K)``) in a kernel format."""
    Q = GGMLQuantizationType
    N, K = shape
    if qtype == Q.F32:
        return PackedWeight.dense(torch.from_numpy(np.array(data, np.float32).reshape(N, K)))
    if qtype == Q.F16:
        return PackedWeight.dense(torch.from_numpy(np.array(data).view(np.float16).reshape(N, K).copy()))
    if qtype == Q.BF16:
        bits = np.array(data).view(np.int16).reshape(N, K).copy()
        return PackedWeight.dense(torch.from_numpy(bits).view(torch.bfloat16))
    block, size = GGML_QUANT_SIZES[qtype]
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(N * K // block, size)
    if qtype == Q.Q8_0:  # d (f16), 32 x int8
        q = raw[:, 2:].view(np.int8).reshape(N, K)
        return PackedWeight.int8(torch.from_numpy(q.copy()), torch.from_numpy(_f16(raw[:, :2]).reshape(N, -1)))
    if qtype in (Q.Q4_0, Q.Q4_1):  # d (f16)[, m (f16)], 16 bytes of nibbles
        d = _f16(raw[:, :2]).reshape(-1)
        if qtype == Q.Q4_0:
            m, qs = -8.0 * d, raw[:, 2:]  # (q - 8) * d == q * d - 8 d, both exact
        else:
            m, qs = _f16(raw[:, 2:4]).reshape(-1), raw[:, 4:]
        sm = np.stack([d, m], -1).reshape(N, K // 32, 2)
        return PackedWeight.q4(torch.from_numpy(qs.reshape(N, K // 2).copy()), torch.from_numpy(sm))
    if qtype == Q.Q4_K:  # d, dmin (f16), 12 bytes of scales, 128 bytes: 4 x (32 low nibbles, 32 high)
        d, dmin = _f16(raw[:, 0:2]), _f16(raw[:, 2:4])
        sc, mn = _k4_scales(raw[:, 4:16])
        qs = raw[:, 16:].reshape(-1, 4, 32)
        vals = np.stack([qs & 15, qs >> 4], 2).reshape(-1, 8, 32)  # sub-block 2j: low, 2j + 1: high
        scale = d * sc.astype(np.float32)  # exact: 11-bit by 6-bit
        minimum = -(dmin * mn.astype(np.float32))
        packed = _nibbles_q41_order(vals.reshape(-1, 32)).reshape(N, K // 2)
        sm = np.stack([scale, minimum], -1).reshape(N, K // 32, 2)
        return PackedWeight.q4(torch.from_numpy(packed), torch.from_numpy(sm.astype(np.float32)))
    if qtype == Q.Q6_K:  # ql[128], qh[64], 16 int8 scales, d (f16)
        ql, qh = raw[:, :128].reshape(-1, 2, 64), raw[:, 128:192].reshape(-1, 2, 32)
        scales = raw[:, 192:208].view(np.int8).astype(np.float32)
        d = _f16(raw[:, 208:210])
        lo = np.concatenate([ql[..., :32] & 15, ql[..., 32:] & 15, ql[..., :32] >> 4, ql[..., 32:] >> 4], -1)
        hi = np.concatenate([(qh >> 0) & 3, (qh >> 2) & 3, (qh >> 4) & 3, (qh >> 6) & 3], -1)
        q = (lo.astype(np.int16) | (hi.astype(np.int16) << 4)) - 32  # (n, 2, 128)
        return PackedWeight.int8(
            torch.from_numpy(q.reshape(N, K).astype(np.int8)), torch.from_numpy((d * scales).reshape(N, -1))
        )
    w = dequantize(np.asarray(data), qtype).reshape(N, K).astype(np.float32)  # every other type: exact fp32
    return PackedWeight.dense(torch.from_numpy(w))


__all__ = ["Format", "PackedWeight", "concat", "from_gguf"]
