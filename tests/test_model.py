"""The native decoder against transformers, the static cache, and tree masks."""

import pytest
import torch

from conftest import hf_model, native_from_hf
from speculative_cascade.engine import kernels

RUNNABLE = [v for v in kernels.cpu_variants() if v in kernels.platform_variants()]


@pytest.mark.parametrize(
    "kind,kw",
    [
        ("llama", {}),
        ("llama", {"tie": False}),
        ("qwen2", {}),
        ("mistral", {"tie": False}),
        (
            "llama",
            {
                "rope_scaling": {
                    "rope_type": "llama3",
                    "factor": 8.0,
                    "low_freq_factor": 1.0,
                    "high_freq_factor": 4.0,
                    "original_max_position_embeddings": 128,
                }
            },
        ),
    ],
)
@pytest.mark.parametrize("variant", RUNNABLE + ["torch"])
def test_logits_match_transformers(kind, kw, variant):
    """Every kernel variant this CPU runs, and the pure-PyTorch path."""
    with kernels.disabled() if variant == "torch" else kernels.use(variant):
        _check_logits(kind, kw)


def _check_logits(kind, kw):
    hf = hf_model(kind, seed=3, **kw)
    native = native_from_hf(hf)
    ids = torch.randint(0, hf.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = hf(ids).logits
    # prefill of 30 tokens, then 10 one at a time through the cache
    cache = native.new_cache(64)
    parts = [native(ids[:, :30], cache)] + [native(ids[:, i : i + 1], cache) for i in range(30, 40)]
    out = torch.cat(parts, dim=1)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-4)
    assert cache.seqlens == [40]


def test_qwen2_has_qkv_bias():
    hf = hf_model("qwen2", seed=0)
    native = native_from_hf(hf)
    assert native.layers[0].attention.wqkv.bias is not None
    assert native.layers[0].attention.wo.bias is None


def test_rollback_round_trip():
    """Generate, roll back, regenerate: identical logits and tokens; nothing is copied."""
    native = native_from_hf(hf_model("llama", seed=1))
    cache = native.new_cache(64)
    prompt = torch.tensor([[5, 17, 42, 7, 99]])
    native(prompt, cache)
    k_ptr = cache.k.data_ptr()

    def greedy(n):
        toks, logits = [], []
        x = torch.tensor([[3]])
        for _ in range(n):
            out = native(x, cache)
            logits.append(out)
            x = out.argmax(-1)
            toks.append(int(x))
        return toks, torch.cat(logits, 1)

    toks1, logits1 = greedy(8)
    cache.rollback(8)
    assert cache.seqlens == [5]
    toks2, logits2 = greedy(8)
    assert toks1 == toks2
    torch.testing.assert_close(logits1, logits2, rtol=0, atol=0)
    assert cache.k.data_ptr() == k_ptr


def test_verify_pass_equals_incremental():
    """One forward over n drafted tokens gives the same logits as n single-token forwards."""
    native = native_from_hf(hf_model("llama", seed=2))
    prompt = torch.tensor([[1, 2, 3, 4, 5, 6]])
    draft = torch.tensor([[10, 11, 12, 13]])
    c1 = native.new_cache(32)
    native(prompt, c1)
    block = native(draft, c1)
    c2 = native.new_cache(32)
    native(prompt, c2)
    steps = torch.cat([native(draft[:, i : i + 1], c2) for i in range(4)], 1)
    torch.testing.assert_close(block, steps, rtol=1e-5, atol=1e-5)


def test_tree_mask_matches_separate_chains():
    """Two branches verified in one forward with a tree mask equal two chain forwards."""
    native = native_from_hf(hf_model("llama", seed=4))
    prompt = torch.tensor([[7, 8, 9, 10]])
    a, b = [20, 21], [30, 31, 32]
    # tree: a0 -> a1 ; b0 -> b1 -> b2, both children of the prompt
    tokens = torch.tensor([a + b])
    positions = torch.tensor([[4, 5, 4, 5, 6]])
    m = torch.zeros(1, 5, 5, dtype=torch.bool)
    for i, anc in enumerate([[0], [0, 1], [2], [2, 3], [2, 3, 4]]):
        m[0, i, anc] = True
    cache = native.new_cache(32)
    native(prompt, cache)
    tree = native(tokens, cache, positions=positions, tree_mask=m)
    for branch, cols in ((a, [0, 1]), (b, [2, 3, 4])):
        c = native.new_cache(32)
        native(prompt, c)
        chain = native(torch.tensor([branch]), c)
        torch.testing.assert_close(tree[:, cols], chain, rtol=1e-5, atol=1e-5)


def test_ragged_rows_match_single_rows():
    """Batch of two rows at different cursors (ragged acceptance) equals each row alone."""
    native = native_from_hf(hf_model("llama", seed=5))
    p0, p1 = [1, 2, 3, 4, 5, 6], [9, 8, 7]
    cache = native.new_cache(32, batch_size=2)
    # fill rows to different lengths: pad row 1, then roll only row 1 back
    native(torch.tensor([p0, p1 + [0, 0, 0]]), cache)
    cache.rollback(3, row=1)
    assert cache.seqlens == [6, 3]
    out = native(torch.tensor([[40, 41], [50, 51]]), cache)
    for row, (p, new) in enumerate(((p0, [40, 41]), (p1, [50, 51]))):
        c = native.new_cache(32)
        native(torch.tensor([p]), c)
        ref = native(torch.tensor([new]), c)
        torch.testing.assert_close(out[row : row + 1], ref, rtol=1e-5, atol=1e-5)


def test_cache_overflow_is_refused():
    native = native_from_hf(hf_model("llama", seed=0))
    cache = native.new_cache(8)
    with pytest.raises(AssertionError):
        native(torch.zeros(1, 9, dtype=torch.long), cache)


@pytest.mark.parametrize("tie", [True, False])
def test_dense_weights_placed_in_one_block(monkeypatch, tie):
    """fp32 weights are copied into one 2 MiB-aligned block in the order a forward reads them;
    tied tensors stay one tensor, and the logits are bit-identical to the weights left in place."""
    import mmap

    from speculative_cascade.engine import pages
    from speculative_cascade.engine.transformer import Transformer

    hf = hf_model("llama", seed=3, vocab=12288, tie=tie)  # a 3 MiB embedding table: a block of its own
    placed = native_from_hf(hf)
    monkeypatch.setattr(Transformer, "_place_weights", lambda self: None)
    unplaced = native_from_hf(hf)
    monkeypatch.undo()

    order = []
    for blk in placed.layers:
        att, ff = blk.attention, blk.feed_forward
        order += [blk.attention_norm.weight, att.wqkv.packed.data, att.wo.packed.data, blk.ffn_norm.weight,
                  ff.w13.packed.data, ff.w2.packed.data]
    order += [placed.norm.weight, placed.output.packed.data]
    ptrs = [t.data_ptr() for t in order]
    assert ptrs == sorted(ptrs) and len(set(ptrs)) == len(ptrs)
    assert all(p % pages.ALIGN == 0 for p in ptrs)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert ptrs[0] % pages.HUGE_PAGE == 0
    assert ptrs[-1] - ptrs[0] < placed.decode_bytes + pages.ALIGN * len(ptrs)  # one block, nothing between
    emb = placed.tok_embeddings.packed.data.data_ptr()
    assert (emb == ptrs[-1]) == tie and (emb in ptrs) == tie
    assert [t.data_ptr() for t in unplaced.parameters()] != [t.data_ptr() for t in placed.parameters()]

    tokens = torch.tensor([[5, 17, 42, 7, 99, 3]])
    a = placed(tokens, placed.new_cache(16))
    b = unplaced(tokens, unplaced.new_cache(16))
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_quantized_weights_stay_where_loaded():
    """int8 and 4-bit layers are not copied (their products are bound by dequantization, not by
    the reads): a stored matrix is the very tensor the checkpoint gave."""
    from speculative_cascade.engine.formats import PackedWeight
    from speculative_cascade.engine.quant import quantize_weight
    from speculative_cascade.engine.transformer import ModelArgs, Transformer

    hf = hf_model("llama", seed=4, vocab=12288)
    sd = dict(hf.state_dict())
    for name in [n for n in sd if n.endswith("proj.weight")]:
        sd[name] = PackedWeight.int8(*quantize_weight(sd[name]))
    native = Transformer(ModelArgs.from_hf_config(hf.config))
    native.load_hf_state_dict(sd, precision="stored")
    down = native.layers[1].feed_forward.w2.packed
    assert down.fmt != 0 and down.data.data_ptr() == sd["model.layers.1.mlp.down_proj.weight"].data.data_ptr()
    fp32 = Transformer(ModelArgs.from_hf_config(hf.config))
    fp32.load_hf_state_dict(sd, precision="fp32")  # dequantized: dense, placed
    assert fp32.layers[1].feed_forward.w2.packed.data.data_ptr() > fp32.layers[0].attention_norm.weight.data_ptr()


@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("embedding", ["fp32", "int8", "bf16"])
def test_greedy_next_is_a_one_token_forward(variant, embedding):
    """The one-token greedy step writes the logits of a one-token forward bit for bit, returns their
    argmax and leaves the same keys and values, with the embedding table stored in each way."""
    from speculative_cascade.engine.formats import PackedWeight
    from speculative_cascade.engine.quant import quantize_weight

    model = native_from_hf(hf_model("llama", seed=5, tie=False))
    emb = model.tok_embeddings.weight
    if embedding == "int8":
        q, s = quantize_weight(emb)
        model.tok_embeddings.use(PackedWeight.int8(q, s[:, None]))
    elif embedding == "bf16":
        model.tok_embeddings.use(PackedWeight.dense(emb.to(torch.bfloat16)))
    prompt = torch.tensor([[5, 9, 2, 7]])
    with kernels.use(variant):
        a, b = model.new_cache(64), model.new_cache(64)
        model(prompt, a)
        model(prompt, b)
        x, logits = torch.empty(model.args.dim), torch.empty(model.output.out_features)
        token = 3
        for _ in range(12):
            ref = model(torch.tensor([[token]]), a)[0, -1]
            nxt = model.greedy_next(token, b, x, logits)
            assert torch.equal(logits, ref) and nxt == int(ref.argmax())
            token = nxt
        n = a.seqlens[0]
        assert b.seqlens == [n] == [4 + 12]
        assert torch.equal(a.k[:, :, :, :n], b.k[:, :, :, :n]) and torch.equal(a.v[:, :, :, :n], b.v[:, :, :, :n])
    with kernels.disabled():
        assert model.greedy_next(token, b, x, logits) is None and b.seqlens == [n]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_kv_cache_buffers_zeroed_and_apart(dtype):
    """The cache's keys and values: zeroed, contiguous, of the cache's dtype, and apart (a write to
    one leaves the other as it was) in one block (2 MiB-aligned where the system has huge pages)."""
    import mmap

    from speculative_cascade.engine import pages
    from speculative_cascade.engine.kv_cache import KVCache

    c = KVCache(3, 2, 2, 4096, 64, dtype=dtype)  # 6 MiB each
    assert c.k.shape == c.v.shape == (3, 2, 2, 4096, 64) and c.k.dtype == c.v.dtype == dtype
    assert c.k.is_contiguous() and c.v.is_contiguous()
    assert not c.k.any() and not c.v.any()
    c.k.fill_(1)
    assert not c.v.any() and c.k.all()
    assert c.v.data_ptr() >= c.k.data_ptr() + c.k.nbytes
    if hasattr(mmap, "MADV_HUGEPAGE"):
        assert c.k.data_ptr() % pages.HUGE_PAGE == 0


def test_quantized_copy_places_its_own_matrices():
    """An INT8 copy moves its new matrices into one block, in forward order, and leaves what it
    shares with the original (norms, embedding table) where it is; the original is untouched."""
    from speculative_cascade.engine.quant import quantize_int8

    target = native_from_hf(hf_model("llama", seed=5, vocab=40960))  # an int8 head of 2.5 MiB: a block
    before = [t.data_ptr() for t in target._tensors()]
    draft = quantize_int8(target)
    assert [t.data_ptr() for t in target._tensors()] == before
    assert draft.layers[0].attention_norm.weight.data_ptr() == target.layers[0].attention_norm.weight.data_ptr()
    assert draft.tok_embeddings.packed.data.data_ptr() == target.tok_embeddings.packed.data.data_ptr()
    mats = [m.packed.data for blk in draft.layers for m in (blk.attention.wqkv, blk.attention.wo,
                                                             blk.feed_forward.w13, blk.feed_forward.w2)]
    ptrs = [t.data_ptr() for t in mats + [draft.output.packed.data]]
    assert ptrs == sorted(ptrs) and not set(ptrs) & set(before)
    assert ptrs[-1] - ptrs[0] < sum(m.packed.nbytes for m in draft.modules() if hasattr(m, "packed")) + 2**16
    import mmap

    from speculative_cascade.engine import pages

    if hasattr(mmap, "MADV_HUGEPAGE"):  # the block's first tensor: layer 0's fused q/k/v
        assert ptrs[0] % pages.HUGE_PAGE == 0
