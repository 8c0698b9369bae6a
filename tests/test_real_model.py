"""The embedded SmolLM2-135M-Instruct (slow: converts the GGUF file once, ~30 s)."""

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from speculative_cascade import SpeculativeGenerator

    try:
        return SpeculativeGenerator(draft_model="int8", K=5, max_len=1024)
    except Exception as e:  # the package with the GGUF file is not installed
        pytest.skip(f"embedded model unavailable: {e}")


def test_native_logits_match_transformers(smol):
    import torch
    from transformers import AutoModelForCausalLM

    from speculative_cascade.engine.loader import load_model

    lm = load_model(None)  # the GGUF file's own Q4_1 / Q8_0 blocks, fp32 activations
    src = Path(lm.source)
    hf = AutoModelForCausalLM.from_pretrained(str(src.parent), gguf_file=src.name, dtype=torch.float32).eval()
    ids = torch.tensor([lm.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        ref = hf(ids).logits
        torch.testing.assert_close(lm.model(ids, lm.model.new_cache(32)), ref, rtol=1e-3, atol=1e-3)
        # the same blocks with int8 activations (llama.cpp's arithmetic): close, the same argmax
        stored = load_model(None, precision="int8")
        got = stored.model(ids, stored.model.new_cache(32))
    assert stored.model.weight_format.startswith("QR")
    assert float((got - ref).norm() / ref.norm()) < 0.05
    assert torch.equal(got.argmax(-1), ref.argmax(-1))
    fp32 = load_model(None, precision="fp32")
    assert fp32.model.weight_format.startswith("F32") and lm.model.weight_format.startswith("Q4")
    assert lm.model.nbytes < fp32.model.nbytes / 4 and stored.model.nbytes < fp32.model.nbytes / 4


@pytest.mark.parametrize(
    "prompt",
    ["Write a haiku about the sea.", "What is 17 times 23?", "List three uses of a paperclip."],
)
def test_speculative_greedy_equals_autoregressive(smol, prompt):
    spec = smol.generate_ids(prompt, max_new_tokens=48, chat=True)
    stats = smol.get_stats()
    plain = smol.generate_ids(prompt, max_new_tokens=48, chat=True, speculative=False)
    assert spec == plain
    assert stats["acceptance_rate"] > 0.6  # the INT8 copy agrees closely with the target


@pytest.mark.parametrize(
    "cascade",
    [
        None,  # the default cascade for this (4-bit) target: MaG -> target
        "dense",  # the default for a dense target: MaG -> INT8 -> target
        {"stages": ["tiny", "int8"], "mode": "tree", "tree_nodes": 16, "tree_width": 4, "tree_keep": 8},
        {"stages": ["mag", "int8"], "k_matrix": [[7, 2], [0, 1]]},
        {"stages": ["int4"], "k": [12]},
    ],
)
def test_cascades_greedy_equal_autoregressive(smol, cascade):
    from speculative_cascade import SpeculativeGenerator
    from speculative_cascade.builder import default_cascade

    gen = SpeculativeGenerator(
        smol.target, tokenizer=smol.tokenizer, max_len=1024, cascade=default_cascade(smol.target) if cascade is None else default_cascade() if cascade == "dense" else cascade
    )
    prompt = "Explain why the sky is blue in two sentences."
    out = gen.generate_ids(prompt, max_new_tokens=48, chat=True)
    assert out == smol.generate_ids(prompt, max_new_tokens=48, chat=True, speculative=False)
    names = [s["name"] for s in gen.get_stats()["stages"]]
    assert names[-1] == "target" and len(names) == len(gen.config.stages) + 1


def test_shipped_tiny_model_and_bigram_table_fit_the_embedded_target(smol):
    import torch

    from speculative_cascade.builder import SHIPPED_BIGRAM, SHIPPED_TINY
    from speculative_cascade.stages.mag import BigramTable
    from speculative_cascade.stages.tiny import TinyProjection

    assert SHIPPED_TINY.stat().st_size <= 25e6
    tiny = TinyProjection.load(SHIPPED_TINY, smol.target.tok_embeddings.weight)
    assert tiny.info["heldout_agreement"] > 0.15
    table = BigramTable.load(SHIPPED_BIGRAM)
    assert table.vocab_size == smol.target.vocab_size
    ids = smol.tokenizer.encode(" the United")
    assert int(tiny(torch.tensor(ids[-1:])).argmax()) == smol.tokenizer.encode(" States")[0]


@pytest.fixture(scope="module")
def smol_int8():
    from speculative_cascade import SpeculativeGenerator

    try:
        return SpeculativeGenerator(draft_model=None, max_len=1024, precision="int8")
    except Exception as e:  # the package with the GGUF file is not installed
        pytest.skip(f"embedded model unavailable: {e}")


@pytest.mark.parametrize(
    "cascade",
    [
        {"stages": ["mag:none", "int8"], "k": [3, 8]},
        {"stages": ["tiny", "int8"], "mode": "tree", "tree_nodes": 16, "tree_width": 4, "tree_keep": 8},
        {"stages": ["int4"], "k": [12]},
    ],
)
def test_int8_activations_target_keeps_greedy_identity(smol_int8, cascade):
    """With the QR products (int8 activations) the target is still batch-invariant: every cascade's greedy
    output is its plain decoding's, drafts made from the QR matrices included."""
    from speculative_cascade import SpeculativeGenerator

    assert smol_int8.target.weight_format.startswith("QR")
    gen = SpeculativeGenerator(smol_int8.target, tokenizer=smol_int8.tokenizer, max_len=1024, cascade=cascade)
    prompt = "List three uses of a paperclip."
    assert gen.generate_ids(prompt, max_new_tokens=40, chat=True) == smol_int8.generate_ids(
        prompt, max_new_tokens=40, chat=True, speculative=False
    )
