"""The embedded SmolLM2-135M-Instruct (slow: converts the GGUF file once, ~30 s)."""

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def smol():
    from speculative_cascade import SpeculativeGenerator

    try:
        return SpeculativeGenerator(K=5, max_len=1024)
    except Exception as e:  # the package with the GGUF file is not installed
        pytest.skip(f"embedded model unavailable: {e}")


def test_native_logits_match_transformers(smol):
    import torch
    from transformers import AutoModelForCausalLM

    from speculative_cascade.engine.loader import load_model

    lm = load_model(None)
    hf = AutoModelForCausalLM.from_pretrained(lm.path, dtype=torch.float32).eval()
    ids = torch.tensor([lm.tokenizer.encode("The capital of France is")])
    with torch.no_grad():
        torch.testing.assert_close(lm.model(ids, lm.model.new_cache(32)), hf(ids).logits, rtol=1e-3, atol=1e-3)


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
