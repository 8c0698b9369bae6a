"""Tiny random models built from configs (no downloads), and a tiny byte-level tokenizer."""

from __future__ import annotations

import pytest
import torch

from speculative_cascade.engine.transformer import ModelArgs, Transformer

VOCAB = 320


def hf_config(kind: str = "llama", vocab: int = VOCAB, layers: int = 2, tie: bool = True, **kw):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tie,
        bos_token_id=0,
        eos_token_id=1,
    )
    common.update(kw)
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}[kind]
    if kind == "mistral":
        common.setdefault("sliding_window", None)
    return cls(**common)


def hf_model(kind: str = "llama", seed: int = 0, **kw):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = hf_config(kind, **kw)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).eval()
    with torch.no_grad():  # larger weights than the default init: peakier, more varied logits
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0, 0.15)
    return model


def native_from_hf(model) -> Transformer:
    native = Transformer(ModelArgs.from_hf_config(model.config))
    native.load_hf_state_dict(model.state_dict())
    return native.eval()


def tiny_native(seed: int = 0, kind: str = "llama", **kw) -> Transformer:
    return native_from_hf(hf_model(kind, seed, **kw))


@pytest.fixture(scope="session")
def tiny_tokenizer():
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    text = ["the quick brown fox jumps over the lazy dog. " * 3, "hello world, speculative decoding is lossless."]
    bpe.train_from_iterator(text, vocab_size=VOCAB - 8, special_tokens=["<s>", "</s>"], show_progress=False)
    tok = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    assert len(tok) <= VOCAB
    return tok


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory, tiny_tokenizer):
    """A Hugging Face directory (config, safetensors, tokenizer) of a tiny Llama."""
    d = tmp_path_factory.mktemp("tiny-llama")
    hf_model("llama", seed=0).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture(scope="session")
def tiny_draft_dir(tmp_path_factory, tiny_tokenizer):
    d = tmp_path_factory.mktemp("tiny-llama-draft")
    hf_model("llama", seed=1, layers=1).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


def decode(target, prompt, *, drafter=None, k=0, round=None, max_len=128, target_stage=None, **kw):
    """``generate_tokens`` for a plain model: its stage (cache of ``max_len``) and a chain round of
    ``drafter``/``k`` (None: autoregressive) unless a stage or a round is given."""
    from speculative_cascade.cascade import ChainRound
    from speculative_cascade.decoding import generate_tokens
    from speculative_cascade.stages.neural import ModelStage

    stage = target_stage if target_stage is not None else ModelStage(target, max_len, name="target")
    return generate_tokens(stage, prompt, round=round if round is not None else ChainRound(drafter, k), **kw)
