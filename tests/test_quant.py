"""INT8 weight-only quantization."""

import torch

from conftest import tiny_native
from speculative_cascade.engine.quant import Int8Linear, quantize_int8, quantize_weight


def test_quantize_weight_error_bound():
    w = torch.randn(64, 96)
    q, s = quantize_weight(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    assert (q.float() * s[:, None] - w).abs().max() <= s.max() / 2 + 1e-6  # half a step per channel


def test_int8_kernels_match_reference():
    """Fused C layer, per-op C products, and pure PyTorch give the same logits."""
    from speculative_cascade.engine import kernels

    model = tiny_native(seed=1)
    q = quantize_int8(model)
    assert all(not isinstance(m, torch.nn.Linear) for m in q.modules())
    ids = torch.tensor([[4, 8, 15, 16, 23, 42]])
    cache = q.new_cache(16)
    fused = q(ids, cache)
    assert q._fused  # the whole-layer kernel ran
    tree = torch.tril(torch.ones(1, 6, 6, dtype=torch.bool))  # causal, but through the per-op path
    per_op = q(ids, q.new_cache(16), positions=torch.arange(6)[None], tree_mask=tree)
    with kernels.disabled():
        ref = q(ids, q.new_cache(16))
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(per_op, ref, rtol=1e-4, atol=1e-4)


def test_int8_copy_leaves_original_untouched_and_agrees():
    model = tiny_native(seed=2)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    before = model(ids, model.new_cache(16))
    q = quantize_int8(model)
    after = model(ids, model.new_cache(16))
    torch.testing.assert_close(before, after, rtol=0, atol=0)
    assert isinstance(q.output, Int8Linear)
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


def test_int4_kernels_match_reference():
    from speculative_cascade.engine import kernels
    from speculative_cascade.engine.quant import Int4Linear, quantize_int4

    model = tiny_native(seed=1)
    q = quantize_int4(model)
    assert isinstance(q.layers[0].attention.wqkv, Int4Linear) and isinstance(q.output, Int8Linear)
    for T in (1, 2, 3, 5, 6):
        ids = torch.arange(4, 4 + T)[None]
        fused = q(ids, q.new_cache(16))
        assert q._fused and q._fused[0] == 2  # the whole-layer kernel ran with 4-bit weights
        tree = torch.tril(torch.ones(1, T, T, dtype=torch.bool))
        per_op = q(ids, q.new_cache(16), positions=torch.arange(T)[None], tree_mask=tree)
        with kernels.disabled():
            ref = q(ids, q.new_cache(16))
        torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(per_op, ref, rtol=1e-4, atol=1e-4)
    ids = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 8]])
    a, b = q(ids, q.new_cache(16)).flatten(), model(ids, model.new_cache(16)).flatten()
    assert torch.nn.functional.cosine_similarity(a, b, dim=0) > 0.95  # close to the original's logits
    assert q.nbytes < quantize_int8(model).nbytes
