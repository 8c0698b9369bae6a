"""INT8 weight-only quantization."""

import torch

import pytest

from conftest import tiny_native
from speculative_cascade.engine import kernels
from speculative_cascade.engine.formats import Format
from speculative_cascade.engine.transformer import Linear
from speculative_cascade.engine.quant import quantize_int8, quantize_weight

RUNNABLE = [v for v in kernels.cpu_variants() if v in kernels.platform_variants()]


def test_quantize_weight_error_bound():
    w = torch.randn(64, 96)
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    assert (q.float() * s[:, None] - w).abs().max() <= s.max() / 2 + 1e-6  # half a step per channel


@pytest.mark.parametrize("variant", RUNNABLE)
def test_int8_kernels_match_reference(variant):
    """The C forward (every variant) and pure PyTorch give the same logits: int8 weights times
    activations rounded to int8 per block of 32 (I8Q8), for one token and several."""
    model = tiny_native(seed=1)
    q = quantize_int8(model)
    assert all(m.packed.fmt == Format.I8Q8 for m in q.modules() if isinstance(m, Linear))
    for ids in (torch.tensor([[4, 8, 15, 16, 23, 42]]), torch.tensor([[7]])):
        with kernels.use(variant):
            fused = q(ids, q.new_cache(16))
            assert q._fused  # the C forward ran
        with kernels.disabled():
            ref = q(ids, q.new_cache(16))
        torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)


def test_int8_copy_leaves_original_untouched_and_agrees():
    model = tiny_native(seed=2)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    before = model(ids, model.new_cache(16))
    q = quantize_int8(model)
    after = model(ids, model.new_cache(16))
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert q.output.packed.fmt == Format.I8Q8
    agree = (q(ids, q.new_cache(16)).argmax(-1) == before.argmax(-1)).float().mean()
    assert agree >= 0.75
    assert q.nbytes < model.nbytes


# -- 4-bit ---------------------------------------------------------------------------------


def test_q4_round_trip_and_requantization_is_exact():
    from speculative_cascade.engine.quant import dequantize_q4, quantize_weight_q4

    w = torch.randn(16, 64)
    packed, sm = quantize_weight_q4(w)
    assert packed.dtype == torch.uint8 and packed.shape == (16, 32) and sm.shape == (16, 2, 2)
    deq = dequantize_q4(packed, sm)
    assert (deq - w).abs().max() <= sm[..., 0].max() / 2 + 1e-6  # half a step per group
    again = dequantize_q4(*quantize_weight_q4(deq))  # a Q4_1-style weight (the embedded GGUF) is kept as is
    torch.testing.assert_close(again, deq, rtol=0, atol=1e-6)


@pytest.mark.parametrize("variant", RUNNABLE)
def test_int4_kernels_match_reference(variant):
    from speculative_cascade.engine.quant import quantize_int4

    model = tiny_native(seed=1)
    q = quantize_int4(model)
    assert q.layers[0].attention.wqkv.packed.fmt == Format.Q4 and q.output.packed.fmt == Format.I8Q8
    for T in (1, 2, 3, 5, 6):
        ids = torch.arange(4, 4 + T)[None]
        with kernels.use(variant):
            fused = q(ids, q.new_cache(16))
        with kernels.disabled():
            ref = q(ids, q.new_cache(16))
        torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    a, b = q(ids, q.new_cache(16)).flatten(), model(ids, model.new_cache(16)).flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.95  # close to the original's logits
    assert q.nbytes < quantize_int8(model).nbytes


def test_embedding_lookup_of_a_few_rows_is_the_dequantization():
    """rows() takes a NumPy path for a few ids (decoding's one-row lookups): every quantized
    format gives exactly dequantize()'s rows, in any shape, repeats included."""
    from speculative_cascade.engine.formats import PackedWeight
    from speculative_cascade.engine.quant import int8_weight, quantize_weight_q4

    torch.manual_seed(0)
    w = torch.randn(64, 96)
    packed, sm = quantize_weight_q4(w)
    i8 = int8_weight(w)
    for p in (PackedWeight.q4(packed, sm), i8, i8.with_q8_activations() if i8.takes_q8_activations else i8,
              PackedWeight.int8(torch.randint(-127, 128, (64, 96)), torch.rand(64, 3), torch.randn(64, 3))):
        for ids in (torch.tensor([5]), torch.tensor([[0, 63], [7, 7]]), torch.arange(64)):
            want = p.dequantize(ids.reshape(-1)).view(*ids.shape, 96)
            assert torch.equal(p.rows(ids), want), (p.fmt, ids.shape)
        assert p.rows(torch.arange(64)).shape == (64, 96) and p.rows(torch.arange(65) % 64).shape == (65, 96)


def test_embedding_keeps_the_rows_it_dequantized():
    """Decoding's one-row lookups come from the rows kept, equal to the table's, each a fresh copy
    (the kernels add the layers' outputs to it in place); a new table forgets them."""
    from speculative_cascade.engine.formats import PackedWeight
    from speculative_cascade.engine.quant import quantize_weight_q4
    from speculative_cascade.engine.transformer import Embedding

    torch.manual_seed(0)
    emb = Embedding(64, 96)
    packed, sm = quantize_weight_q4(torch.randn(64, 96))
    emb.use(PackedWeight.q4(packed, sm))
    want = emb.packed.dequantize(torch.tensor([5]))
    for shape in ((1,), (1, 1), (1,), ()):
        got = emb(torch.tensor(5).reshape(shape))
        assert got.shape == (*shape, 96) and torch.equal(got.reshape(1, 96), want)
        got += 1.0  # what the kernels do to their input
    assert 5 in emb._memo
    packed2, sm2 = quantize_weight_q4(torch.randn(64, 96))
    emb.use(PackedWeight.q4(packed2, sm2))
    assert torch.equal(emb(torch.tensor([5])), emb.packed.dequantize(torch.tensor([5])))
    assert torch.equal(emb(torch.tensor([[3, 5]])), emb.packed.dequantize(torch.tensor([3, 5]))[None])


def test_argmax_ids_is_torchs_argmax():
    from speculative_cascade.sampling import argmax_ids

    torch.manual_seed(0)
    x = torch.randn(5, 1000)
    x[1, 10] = x[1, 20] = x[1].max() + 1  # a tie: the first index, as torch
    x[2, 30] = float("nan")  # NaN counts as the largest, as torch
    assert argmax_ids(x) == x.argmax(-1).tolist() and argmax_ids(x)[1] == 10 and argmax_ids(x)[2] == 30
    assert argmax_ids(x[3]) == [int(x[3].argmax())]
    assert argmax_ids(x.bfloat16()) == x.bfloat16().argmax(-1).tolist()
