"""The light tokenizer gives transformers' ids, text and chat prompts."""

import pytest

from speculative_cascade.engine.tokenizer import FastTokenizer

TEXTS = ["the quick brown fox", "Hello, world! It's 3.14 -- don't panic.", "  spaces\\n\\tand tabs ", "ünïcödé ✓"]
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{{ eos_token }}\\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def compare(path):
    from transformers import AutoTokenizer

    ours, ref = FastTokenizer(path), AutoTokenizer.from_pretrained(str(path))
    for t in TEXTS:
        assert ours.encode(t) == ref.encode(t)
        ids = ref.encode(t)
        assert ours.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    if ref.chat_template:
        msgs = [{"role": "user", "content": "What is 2+2?"}]
        for gen in (True, False):
            assert ours.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen) == ref.apply_chat_template(
                msgs, tokenize=False, add_generation_prompt=gen
            )
    assert ours.eos_token_id == ref.eos_token_id


def test_matches_transformers_on_tiny_tokenizer(tmp_path, tiny_tokenizer):
    tiny_tokenizer.chat_template = TEMPLATE
    tiny_tokenizer.save_pretrained(tmp_path)
    tiny_tokenizer.chat_template = None
    assert FastTokenizer.supports(tmp_path)
    compare(tmp_path)


@pytest.mark.slow
def test_matches_transformers_on_smollm2():
    from speculative_cascade.engine.loader import load_model

    try:
        lm = load_model(None)
    except Exception as e:
        pytest.skip(f"embedded model unavailable: {e}")
    assert isinstance(lm.tokenizer, FastTokenizer)
    compare(lm.path)
