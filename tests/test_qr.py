"""QR products (kernels/sc_qr.h): GGUF blocks repacked for int8 activations and integer dot products.

On every variant this CPU runs, against an independent reference (the ``gguf`` package's
dequantization, activations rounded as llama.cpp's Q8 blocks, products in float64), and bit for
bit across row counts: a row's outputs do not depend on the rows beside it."""

import ctypes

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import dequantize

from gguf_blocks import random_blocks
from speculative_cascade.engine import kernels
from speculative_cascade.engine.formats import QR_TYPES, Format, PackedWeight, concat
from speculative_cascade.engine.transformer import sc_mat

RUNNABLE = [v for v in kernels.cpu_variants() if v in kernels.built_variants()]
TYPES = [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K]


def q8_reference(x: np.ndarray, S: int) -> np.ndarray:
    """Activations as the kernels round them: per row, per block of S, codes rint(x * (127 / amax))
    times amax / 127 (fp32 steps, ties to even)."""
    xb = x.astype(np.float32).reshape(x.shape[0], -1, S)
    amax = np.abs(xb).max(-1, keepdims=True)
    inv = np.where(amax > 0, np.float32(127) / np.where(amax > 0, amax, 1), 0).astype(np.float32)
    q = np.rint((xb * inv).astype(np.float32))
    assert np.abs(q).max() <= 127
    return (q.astype(np.float64) * (amax / np.float32(127)).astype(np.float32)).reshape(x.shape)


def matmul(k, w: PackedWeight, x: torch.Tensor, bias=None) -> torch.Tensor:
    y = torch.empty(x.shape[0], w.shape[0])
    m = sc_mat(w, bias)
    k.lib.sc_matmul(ctypes.byref(m), x.contiguous().data_ptr(), x.shape[0], y.data_ptr())
    return y


@pytest.fixture(scope="module", params=TYPES, ids=lambda t: t.name)
def case(request):
    qt = request.param
    S = QR_TYPES[qt][1]
    rng = np.random.default_rng(int(qt))
    N, K = 40, 2 * S  # N not a multiple of the 16 rows of a block: padding
    raw = random_blocks(qt, N, K, rng)
    w = PackedWeight.qr(raw, qt, (N, K), force=True)
    assert w is not None and w.fmt == Format.QR
    ref_w = dequantize(raw, qt).reshape(N, K).astype(np.float64)
    return qt, S, raw, w, ref_w


def test_repacked_weights_dequantize_to_the_files_values(case):
    qt, S, raw, w, ref_w = case
    got = w.dequantize().double().numpy()
    np.testing.assert_allclose(got, ref_w, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("variant", RUNNABLE)
def test_qr_products_match_reference_and_are_batch_invariant(case, variant):
    qt, S, raw, w, ref_w = case
    k = kernels.get(variant)
    rng = np.random.default_rng(1)
    K = w.shape[1]
    x = torch.from_numpy(rng.standard_normal((13, K)).astype(np.float32))
    x[3] = 0.0  # an all-zero row: scale 0
    bias = torch.from_numpy(rng.standard_normal(w.shape[0]).astype(np.float32))
    y = matmul(k, w, x, bias).double().numpy()
    ref = q8_reference(x.numpy(), S) @ ref_w.T + bias.numpy()
    scale = np.abs(q8_reference(x.numpy(), S)) @ np.abs(ref_w).T + 1e-6
    assert np.max(np.abs(y - ref) / scale) < 1e-5
    one = torch.stack([matmul(k, w, x[i : i + 1], bias)[0] for i in range(13)])
    for M in (2, 3, 4, 5, 7, 9, 13):
        assert torch.equal(matmul(k, w, x[:M], bias), one[:M]), f"{M} rows differ from one row at a time"
        assert torch.equal(matmul(k, w, x[13 - M :], bias), one[13 - M :])


@pytest.mark.parametrize("variant", RUNNABLE)
def test_a_chained_matrix_is_its_parts_side_by_side(variant):
    """A fused q/k/v whose parts differ in type (Q4_K, Q6_K) is one matrix chained to the next."""
    k = kernels.get(variant)
    rng = np.random.default_rng(2)
    parts = [(Q.Q4_K, 32), (Q.Q4_K, 16), (Q.Q6_K, 16)]
    ws = [PackedWeight.qr(random_blocks(qt, n, 512, rng), qt, (n, 512), force=True) for qt, n in parts]
    fused = concat(ws)
    assert fused.tail is not None and fused.shape == (64, 512)
    x = torch.randn(5, 512)
    bias = torch.randn(64)
    y = matmul(k, fused, x, bias)
    expect = torch.cat([matmul(k, ws[0], x, bias[:32]), matmul(k, ws[1], x, bias[32:48]), matmul(k, ws[2], x, bias[48:])], 1)
    assert torch.equal(y, expect)
    assert torch.equal(fused.dequantize(), torch.cat([w.dequantize() for w in ws]))


def test_q8_0_code_of_minus_128_is_left_to_the_exact_path():
    rng = np.random.default_rng(3)
    raw = random_blocks(Q.Q8_0, 16, 64, rng)
    raw[0, 2] = 0x80  # -128
    assert PackedWeight.qr(raw, Q.Q8_0, (16, 64), force=True) is None


def test_rows_are_taken_in_the_given_order():
    rng = np.random.default_rng(4)
    raw = random_blocks(Q.Q4_K, 32, 256, rng)
    order = rng.permutation(32)
    w = PackedWeight.qr(raw, Q.Q4_K, (32, 256), rows=order, force=True)
    ref = dequantize(raw, Q.Q4_K).reshape(32, 256)[order]
    np.testing.assert_allclose(w.dequantize().numpy(), ref, rtol=1e-6)
    assert torch.equal(w.rows(torch.tensor([[5, 0], [31, 7]])), w.dequantize()[torch.tensor([[5, 0], [31, 7]])])


@pytest.mark.parametrize("qt", TYPES, ids=lambda t: t.name)
def test_embedding_rows_kept_as_stored_read_the_files_values(qt):
    rng = np.random.default_rng(5)
    K = 2 * QR_TYPES[qt][1]
    raw = random_blocks(qt, 12, K, rng)
    table = PackedWeight.raw(raw, qt, (12, K))
    ref = dequantize(raw, qt).reshape(12, K)
    np.testing.assert_allclose(table.rows(torch.tensor([3, 0, 11])).numpy(), ref[[3, 0, 11]], rtol=1e-6, atol=1e-9)
