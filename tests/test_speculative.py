"""Losslessness: greedy equality with several drafters, and statistical tests of sampling."""

import math

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import decode, hf_model, tiny_native
from speculative_cascade import verify as verify_mod
from speculative_cascade.decoding import StopChecker
from speculative_cascade.stages.neural import ModelStage
from speculative_cascade.engine.hf_fallback import HFCausalLM
from speculative_cascade.engine.quant import quantize_int8
from speculative_cascade.errors import CascadeError
from speculative_cascade.sampling import SamplingParams

TARGET = tiny_native(seed=0)
PROMPTS = [[5, 17, 42, 7], [3], [100, 200, 300, 12, 13, 14, 15, 16, 17]]


def drafters():
    return {
        "same": TARGET,
        "random": tiny_native(seed=11, layers=1),
        "int8": quantize_int8(TARGET),
        "hf-fallback": HFCausalLM(hf_model("llama", seed=12, layers=1)),
    }


DRAFTERS = drafters()


def ar(prompt, n=24, **kw):
    out, _ = decode(TARGET, prompt, max_new_tokens=n, stop=StopChecker(()), max_len=128, **kw)
    return out


@pytest.mark.parametrize("name", list(DRAFTERS))
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_equals_autoregressive(name, k):
    for prompt in PROMPTS:
        out, stats = decode(
            TARGET,
            prompt,
            drafter=ModelStage(DRAFTERS[name], 128),
            k=k,
            max_new_tokens=24,
            stop=StopChecker(()),
            max_len=128,
        )
        assert out == ar(prompt)
        assert stats.new_tokens == 24
        if name == "same":
            assert stats.acceptance_rate == 1.0


def test_random_drafter_is_really_rejected():
    """The equality above is not vacuous: the random drafter disagrees with the target."""
    _, stats = decode(
        TARGET,
        PROMPTS[0],
        drafter=ModelStage(DRAFTERS["random"], 128),
        k=4,
        max_new_tokens=24,
        stop=StopChecker(()),
        max_len=128,
    )
    assert stats.acceptance_rate < 0.7


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=st.lists(st.integers(2, 319), min_size=1, max_size=20),
    k=st.integers(1, 8),
    n=st.integers(1, 20),
    seed=st.integers(0, 3),
)
def test_greedy_equality_property(prompt, k, n, seed):
    draft = [DRAFTERS["random"], DRAFTERS["int8"], DRAFTERS["same"], tiny_native(seed=20 + seed, layers=1)][seed]
    out, stats = decode(
        TARGET, prompt, drafter=ModelStage(draft, 64), k=k, max_new_tokens=n, stop=StopChecker(()), max_len=64
    )
    assert out == ar(prompt, n=n)
    assert stats.accepted <= stats.drafted
    assert sum(stats.accepted_by_position) == stats.accepted


# -- sampling ------------------------------------------------------------------------------


def chi2_pvalue(counts: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square goodness of fit; cells with expected count < 5 are pooled."""
    from scipy.stats import chisquare

    n = counts.sum()
    exp = probs * n
    small = exp < 5
    obs = np.append(counts[~small], counts[small].sum())
    ex = np.append(exp[~small], exp[small].sum())
    if ex[-1] == 0:
        obs, ex = obs[:-1], ex[:-1]
    ex = ex * obs.sum() / ex.sum()
    return float(chisquare(obs, ex).pvalue)


# Each statistical test fails by chance with probability ALPHA (chi-square at that level).
ALPHA = 1e-6


def first_token_counts(p, q, k, trials, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = np.zeros(p.shape[-1])
    for _ in range(trials):
        draft = [int(torch.multinomial(q[i], 1, generator=g)) for i in range(k)]
        n, nxt = verify_mod.verify_sampling(draft, q, p, g)
        counts[draft[0] if n >= 1 else nxt] += 1
    return counts


def random_dists(V, rows, seed, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(rows, V, generator=g) * sharp, -1)


@pytest.mark.parametrize("k", [1, 3])
def test_speculative_sampling_matches_target(k):
    V = 8
    p, q = random_dists(V, k + 1, 0), random_dists(V, k, 1)
    counts = first_token_counts(p, q, k, 20000)
    assert chi2_pvalue(counts, p[0].numpy()) > ALPHA


def test_deterministic_drafter_sampling_matches_target():
    V = 8
    p = random_dists(V, 2, 2)
    g = torch.Generator().manual_seed(0)
    counts = np.zeros(V)
    for _ in range(20000):
        n, nxt = verify_mod.verify_sampling([3], None, p, g)  # an n-gram style drafter always says 3
        counts[3 if n else nxt] += 1
    assert chi2_pvalue(counts, p[0].numpy()) > ALPHA


def test_broken_residual_is_detected(monkeypatch):
    """Resampling from p instead of norm(max(0, p - q)) is biased; the same test must fail."""
    V = 8
    p, q = random_dists(V, 2, 0), random_dists(V, 1, 1)
    monkeypatch.setattr(verify_mod, "residual_distribution", lambda p_i, q_i: p_i)
    counts = first_token_counts(p, q, 1, 20000)
    assert chi2_pvalue(counts, p[0].numpy()) < ALPHA


def exact_joint(target, prompt, vocab):
    """The target's exact law of the next two tokens: P(t1, t2) = p(t1 | prompt) p(t2 | prompt, t1)."""
    with torch.no_grad():
        p1 = torch.softmax(target(torch.tensor([prompt]), target.new_cache(8))[0, -1], -1)
        joint = torch.zeros(vocab, vocab)
        for t1 in range(vocab):
            p2 = torch.softmax(target(torch.tensor([prompt + [t1]]), target.new_cache(8))[0, -1], -1)
            joint[t1] = p1[t1] * p2
    return joint.flatten().numpy()


@pytest.mark.parametrize("residual", ["exact", "dropped"])
def test_end_to_end_sampling_matches_target_joint(residual, monkeypatch):
    """Two sampled tokens from real (tiny) models: their joint law is the target's; with the residual
    after a rejection replaced by p itself (a classic bug), the same run fails the test."""
    V = 12
    target = tiny_native(seed=30, vocab=V)
    draft = tiny_native(seed=31, vocab=V, layers=1)
    prompt = [1, 2, 3]
    if residual == "dropped":
        monkeypatch.setattr(verify_mod, "residual_distribution", lambda p, q: p)
    counts = np.zeros(V * V)
    drafter = ModelStage(draft, 16)
    for s in range(6000):
        out, _ = decode(
            target,
            prompt,
            drafter=drafter,
            k=2,
            max_new_tokens=2,
            params=SamplingParams(temperature=1.0, seed=s),
            stop=StopChecker(()),
            max_len=16,
        )
        counts[out[0] * V + out[1]] += 1
    p_value = chi2_pvalue(counts, exact_joint(target, prompt, V))
    assert p_value > ALPHA if residual == "exact" else p_value < ALPHA


def test_top_k_top_p_sampling_is_lossless():
    V = 10
    p_logits, q_logits = torch.randn(2, V, generator=torch.Generator().manual_seed(5)) * 2, torch.randn(1, V)
    params = SamplingParams(temperature=0.7, top_k=5, top_p=0.9)
    from speculative_cascade.sampling import warp

    p, q = warp(p_logits, params), warp(q_logits, params)
    assert (p[0] > 0).sum() <= 5
    counts = first_token_counts(p, q, 1, 20000)
    assert chi2_pvalue(counts, p[0].numpy()) > ALPHA


def test_seeded_sampling_is_deterministic():
    d = ModelStage(DRAFTERS["random"], 128)
    runs = [
        decode(
            TARGET,
            PROMPTS[0],
            drafter=d,
            k=3,
            max_new_tokens=20,
            params=SamplingParams(temperature=1.0, seed=s),
            stop=StopChecker(()),
            max_len=128,
        )[0]
        for s in (7, 7, 8)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


# -- stops and limits ----------------------------------------------------------------------


def test_eos_stops_and_is_dropped():
    full = ar(PROMPTS[0], n=24)
    eos = full[5]
    first = full.index(eos)
    for drafter in (None, ModelStage(DRAFTERS["int8"], 128)):
        out, stats = decode(
            TARGET, PROMPTS[0], drafter=drafter, k=4, max_new_tokens=24, stop=StopChecker({eos}), max_len=128
        )
        assert out == full[:first]
        assert stats.stop_reason == "eos"


def test_stop_string_keeps_shortest_prefix():
    full = ar(PROMPTS[0], n=24)
    text = lambda ids: " ".join(map(str, ids))  # noqa: E731
    target_str = text(full[6:8])
    out, stats = decode(
        TARGET,
        PROMPTS[0],
        drafter=ModelStage(DRAFTERS["same"], 128),
        k=5,
        max_new_tokens=24,
        stop=StopChecker((), [target_str], text),
        max_len=128,
    )
    assert target_str in text(out) and target_str not in text(out[:-1])
    assert stats.stop_reason == "stop_string"


def test_context_limit_is_a_clear_error():
    with pytest.raises(CascadeError, match="context limit"):
        decode(TARGET, [1] * 60, drafter=ModelStage(TARGET, 64), k=4, max_new_tokens=10, max_len=64)
    with pytest.raises(CascadeError, match="empty"):
        decode(TARGET, [], max_new_tokens=10, max_len=64)
    with pytest.raises(CascadeError, match="k must be"):
        decode(TARGET, [1], drafter=ModelStage(TARGET, 64), k=0, max_new_tokens=10, max_len=64)


def test_bad_sampling_params():
    for kw in ({"temperature": -1}, {"top_k": -2}, {"top_p": 0.0}, {"top_p": 1.5}, {"temperature": math.nan}):
        with pytest.raises(CascadeError):
            SamplingParams(**kw)


def test_int8_draft_shares_the_target_prefill():
    target = ModelStage(TARGET, 64, name="target")
    target.prefill([5, 6, 7, 8, 9])
    runner = target.runner
    same_shape = ModelStage(DRAFTERS["int8"], 64)
    assert same_shape.share_prefix(target, 5)
    torch.testing.assert_close(same_shape.runner.cache.k[:, :, :, :5], runner.cache.k[:, :, :, :5])
    assert same_shape.runner.length == 5
    assert not ModelStage(DRAFTERS["random"], 64).share_prefix(target, 5)  # one layer: not shareable
    assert not ModelStage(DRAFTERS["hf-fallback"], 64).share_prefix(target, 5)
