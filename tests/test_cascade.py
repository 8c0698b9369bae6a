"""The cascade: greedy equality for every mode and depth, lossless sampling, caches, bad configurations."""

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import decode, tiny_native
from speculative_cascade import verify as verify_mod
from speculative_cascade.cascade import ChainRound, Horizontal, Level, TreeRound, build_csd
from speculative_cascade.decoding import StopChecker
from speculative_cascade.engine import kernels
from speculative_cascade.engine.quant import quantize_int4, quantize_int8
from speculative_cascade.errors import CascadeError
from speculative_cascade.sampling import SamplingParams
from speculative_cascade.stages.mag import MaG, BigramTable
from speculative_cascade.stages.neural import ModelStage
from speculative_cascade.stages.tiny import TinyProjection, TinyStage
from test_speculative import ALPHA, chi2_pvalue, exact_joint

TARGET = tiny_native(seed=0)
V = TARGET.vocab_size
PROMPTS = [[5, 17, 42, 7], [3], [100, 200, 300, 12, 13, 14, 15, 16, 17, 100, 200]]
N = 24


def tiny_stage(target=TARGET, seed=0):
    torch.manual_seed(seed)
    return TinyStage(TinyProjection(target.tok_embeddings.weight))


def mag(seed=0):
    rng = np.random.default_rng(seed)
    return MaG(V, BigramTable.from_sequences([rng.integers(0, V, 400).tolist()], V))


def stages():
    """Drafting stages of increasing cost (all instances fresh)."""
    return {
        "mag": mag(),
        "tiny": tiny_stage(),
        "random": ModelStage(tiny_native(seed=11, layers=1), 128, name="random"),
        "int8": ModelStage(quantize_int8(TARGET), 128, name="int8"),
        "int4": ModelStage(quantize_int4(TARGET), 128, name="int4"),
        "same": ModelStage(TARGET, 128, name="same"),
    }


def ar(prompt, n=N, target=TARGET):
    out, _ = decode(target, prompt, max_new_tokens=n, stop=StopChecker(()), max_len=128)
    return out


def run(prompt, n=N, params=SamplingParams(), max_len=128, target=TARGET, **kw):
    return decode(target, prompt, max_new_tokens=n, stop=StopChecker(()), max_len=max_len, params=params, **kw)


CHAINS = [
    ["random"],
    ["mag"],
    ["tiny"],
    ["int8", "tiny"],
    ["random", "mag"],
    ["same", "random"],
    ["int8", "random", "tiny"],  # depth 4: tiny -> random -> int8 -> target
    ["int4", "mag"],
    ["int8", "int4", "tiny"],
    ["same", "int8", "random", "mag"],  # depth 5
]


@pytest.mark.parametrize("chain", CHAINS, ids="-".join)
@pytest.mark.parametrize("ks", [(1, 1, 1, 1), (4, 2, 3, 1), (8, 3, 2, 2)])
def test_chain_greedy_equals_target(chain, ks):
    """Vertical cascades of every depth give the target's greedy output exactly."""
    s = stages()
    drafters = [s[name] for name in chain]
    n = len(drafters)
    k_matrix = [[ks[i] if j == i else 0 for j in range(n)] for i in range(n)]  # the chain
    drafter, k = build_csd(drafters, k_matrix)
    for prompt in PROMPTS:
        out, stats = run(prompt, drafter=drafter, k=k)
        assert out == ar(prompt)
        assert [st.name for st in stats.stages][-1] == "target"
        assert stats.stages[0].name == chain[-1]


def test_chain_levels_really_verify():
    """A random tiny drafter under the INT8 draft is mostly rejected by it, yet the output is exact."""
    s = stages()
    drafter, k = build_csd([s["int8"], s["random"]], [[6, 0], [0, 3]])
    out, stats = run(PROMPTS[0], drafter=drafter, k=k)
    assert out == ar(PROMPTS[0])
    by_name = {st.name: st for st in stats.stages}
    assert by_name["random"].proposed > 0 and by_name["random"].acceptance_rate < 0.2
    assert by_name["int8"].acceptance_rate > 0.6  # its int8 activations flip some of this random model's near-ties
    assert by_name["int8"].forwards > 0 and by_name["target"].forwards == stats.rounds


@pytest.mark.parametrize(
    "names,k_matrix",
    [
        (["int8", "mag"], [[3, 5], [0, 4]]),  # CSD's LLaMA shape: draft reviews MaG; MaG takes the tail
        (["int8", "random", "mag"], [[2, 3, 4], [0, 1, 3], [0, 0, 2]]),  # CSD's FLAN-T5 shape
        (["random", "tiny"], [[2, 6], [0, 0]]),  # horizontal only
    ],
)
@pytest.mark.parametrize("lenience", [1.0, 3.0])
def test_csd_greedy_equals_target(names, k_matrix, lenience):
    s = stages()
    drafter, k = build_csd([s[n] for n in names], k_matrix, lenience=lenience)
    assert k == sum(k_matrix[0])
    for prompt in PROMPTS:
        out, _ = run(prompt, drafter=drafter, k=k)
        assert out == ar(prompt)


def test_lenience_is_greedy_only():
    s = stages()
    drafter, k = build_csd([s["int8"], s["mag"]], [[3, 0], [0, 4]], lenience=2.0)
    with pytest.raises(CascadeError, match="lenience"):
        run(PROMPTS[0], drafter=drafter, k=k, params=SamplingParams(temperature=1.0, seed=0))


def test_lenience_accepts_more_below_the_target():
    s = stages()
    strict, k = build_csd([s["int8"], s["random"]], [[6, 0], [0, 3]])
    run(PROMPTS[0], drafter=strict, k=k)
    s2 = stages()
    lenient, _ = build_csd([s2["int8"], s2["random"]], [[6, 0], [0, 3]], lenience=1e6)
    out, _ = run(PROMPTS[0], drafter=lenient, k=k)
    assert out == ar(PROMPTS[0])
    assert s2["random"].stats.acceptance_rate > s["random"].stats.acceptance_rate


@pytest.mark.parametrize("filt", [None, "random", "int8", "same"])
@pytest.mark.parametrize("shape", [(8, 2, 4), (16, 4, 6), (5, 5, 2), (12, 1, 12)])
def test_tree_greedy_equals_target(filt, shape):
    n_nodes, width, keep = shape
    s = stages()
    rnd = TreeRound(s["tiny"], s[filt] if filt else None, n_nodes=n_nodes, width=width, keep=keep)
    for prompt in PROMPTS:
        out, stats = run(prompt, round=rnd)
        assert out == ar(prompt)
        assert stats.rounds < N or filt in (None, "random")  # good filters add accepted nodes


def test_tree_with_the_target_as_filter_accepts_whole_paths():
    s = stages()
    rnd = TreeRound(s["tiny"], s["same"], n_nodes=8, width=2, keep=6)
    _, stats = run(PROMPTS[0], round=rnd)
    # the filter's refinement puts the target's own next token under the root: every round accepts it
    assert stats.accepted >= stats.rounds - 1 and stats.mean_accepted_length >= 1.9


@settings(max_examples=20, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    prompt=st.lists(st.integers(2, V - 1), min_size=1, max_size=16),
    depth=st.integers(1, 3),
    data=st.data(),
    n=st.integers(1, 16),
)
def test_random_cascades_property(prompt, depth, data, n):
    """Random k_matrix cascades over random drafters, and random tree shapes: always exact."""
    s = stages()
    pool = ["mag", "tiny", "random", "int4", "int8"]
    names = data.draw(st.lists(st.sampled_from(pool), min_size=depth, max_size=depth, unique=True))
    names.sort(key=pool.index, reverse=True)  # largest first; MaG can only be the last
    km = [[data.draw(st.integers(0, 4)) if j >= i else 0 for j in range(depth)] for i in range(depth)]
    if sum(km[0]) == 0:
        km[0][0] = 1
    drafter, k = build_csd([s[x] for x in names], km)
    out, stats = run(prompt, n=n, drafter=drafter, k=k, max_len=64)
    assert out == ar(prompt, n=n)
    assert sum(stats.accepted_by_position) == stats.accepted <= stats.drafted
    tree = TreeRound(
        s["tiny"],
        s[data.draw(st.sampled_from(["random", "int8"]))],
        n_nodes=data.draw(st.integers(1, 12)),
        width=data.draw(st.integers(1, 4)),
        keep=data.draw(st.integers(1, 10)),
    )
    out, _ = run(prompt, n=n, round=tree, max_len=64)
    assert out == ar(prompt, n=n)


# -- caches --------------------------------------------------------------------------------


def test_tree_rounds_leave_the_target_cache_as_a_fresh_prefill():
    s = stages()
    target = ModelStage(TARGET, 128, name="target")
    rnd = TreeRound(s["tiny"], s["int8"], n_nodes=12, width=3, keep=6)
    prompt = PROMPTS[2]
    out, stats = run(prompt, round=rnd, target_stage=target)
    assert stats.rounds < N  # some tree nodes were accepted and compacted
    seq = prompt + out
    n = target.runner.length
    assert target.runner.seq[:n] == seq[:n] and n >= len(seq) - 2
    fresh = TARGET.new_cache(128)
    TARGET(torch.tensor([seq[:n]]), fresh)
    torch.testing.assert_close(target.runner.cache.k[:, :, :, :n], fresh.k[:, :, :, :n], atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(target.runner.cache.v[:, :, :, :n], fresh.v[:, :, :, :n], atol=1e-4, rtol=1e-4)


def test_runner_rolls_back_to_the_common_prefix():
    """Generate, roll back, regenerate: the logits are those of a fresh cache."""
    stage = ModelStage(TARGET, 64)
    a = stage.score([5, 6, 7], [8, 9, 10])
    stage.score([5, 6, 7, 8, 11], [12])  # diverges after 8: the cursor goes back, 11 and 12 are fed
    again = stage.score([5, 6, 7], [8, 9, 10])
    torch.testing.assert_close(a, again, atol=1e-4, rtol=1e-4)
    fresh = ModelStage(TARGET, 64).score([5, 6, 7, 8, 11], [12])
    torch.testing.assert_close(stage.score([5, 6, 7, 8, 11], [12]), fresh, atol=1e-4, rtol=1e-4)


def test_greedy_next_needs_the_cache_to_hold_all_but_the_last_token():
    """The runner's one-token greedy step runs only where the cache holds ``ids[:-1]`` exactly, and
    gives the argmax of the general path's logits; elsewhere it declines (None) and changes nothing."""
    if kernels.get() is None:
        pytest.skip("no C kernels: the one-token step is theirs")
    stage = ModelStage(TARGET, 64)

    def fresh_next(ids):
        return int(ModelStage(TARGET, 64).score(ids, [])[-1].argmax())

    ids = [5, 6, 7]
    stage.prefill(ids[:-1])
    t = stage.greedy_next(ids)
    assert t == fresh_next(ids) and stage.runner.seq == ids
    ids.append(t)
    assert stage.greedy_next([5, 9, 7, t]) is None  # another sequence: the comparison finds it
    stage.score(ids, [1, 2])  # the cache now holds ids and two drafted tokens beyond them
    assert stage.greedy_next(ids) is None and stage.runner.length == len(ids) + 2
    stage.commit(len(ids) - 1)  # the round kept none of the draft
    assert stage.greedy_next(ids) == fresh_next(ids)
    assert stage.stats.forwards == 3 and stage.stats.tokens_in == 1 + 3 + 1


def test_autoregressive_decoding_is_greedy_by_whole_forwards(monkeypatch):
    """Plain decoding (its rounds by the runner's one-token step, with the C kernels) emits the tokens
    of greedy decoding by the model's general forward, and takes that step every round after the
    prefill."""
    from speculative_cascade.engine.transformer import Transformer

    for prompt in PROMPTS:
        cache = TARGET.new_cache(128)
        logits = TARGET(torch.tensor([prompt]), cache)[0, -1]
        ref = []
        for _ in range(N):
            ref.append(int(logits.argmax()))
            logits = TARGET(torch.tensor([[ref[-1]]]), cache)[0, -1]
        calls = []
        forward = Transformer.forward
        monkeypatch.setattr(Transformer, "forward", lambda self, *a, **k: calls.append(1) or forward(self, *a, **k))
        assert ar(prompt) == ref
        monkeypatch.undo()
        if kernels.get() is not None:
            assert len(calls) == (1 if len(prompt) > 1 else 0)


# -- sampling ------------------------------------------------------------------------------


SMALL_V = 12


@pytest.fixture(scope="module")
def small():
    target = tiny_native(seed=30, vocab=SMALL_V)
    return {
        "target": target,
        "draft": tiny_native(seed=31, vocab=SMALL_V, layers=1),
        "draft2": tiny_native(seed=32, vocab=SMALL_V, layers=1),
    }


def sample_pairs(small, make_round, trials=5000):
    counts = np.zeros(SMALL_V * SMALL_V)
    rnd = make_round()
    for s in range(trials):
        out, _ = run(
            [1, 2, 3],
            n=2,
            target=small["target"],
            round=rnd,
            max_len=32,
            params=SamplingParams(temperature=1.0, seed=s),
        )
        counts[out[0] * SMALL_V + out[1]] += 1
    return counts


def test_chain_sampling_matches_target_joint(small):
    """Depth-3 chain (draft2 -> draft -> target), sampled: the joint law of two tokens is the target's."""

    def make():
        d1, d2 = ModelStage(small["draft"], 32), ModelStage(small["draft2"], 32)
        drafter, k = build_csd([d1, d2], [[2, 0], [0, 2]])
        return ChainRound(drafter, k)

    counts = sample_pairs(small, make)
    assert chi2_pvalue(counts, exact_joint(small["target"], [1, 2, 3], SMALL_V)) > ALPHA


def test_tree_sampling_matches_target_joint(small):
    def make():
        torch.manual_seed(1)
        tiny = TinyStage(TinyProjection(small["target"].tok_embeddings.weight))
        return TreeRound(tiny, ModelStage(small["draft"], 32), n_nodes=6, width=3, keep=4)

    counts = sample_pairs(small, make)
    assert chi2_pvalue(counts, exact_joint(small["target"], [1, 2, 3], SMALL_V)) > ALPHA


def tree_first_token_counts(p, tokens, parents, trials, seed=0):
    g = torch.Generator().manual_seed(seed)
    counts = np.zeros(p.shape[-1])
    for _ in range(trials):
        path, nxt = verify_mod.verify_tree_sampling(tokens, parents, p, g)
        counts[tokens[path[0]] if path else nxt] += 1
    return counts


def test_tree_verification_distribution_and_broken_residual(monkeypatch):
    """Three candidates under the root: the first token follows p; the same verifier with its residual
    update dropped (each candidate tried against p itself) fails the test."""
    Vs = 8
    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(5, Vs, generator=g) * 2, -1)
    tokens, parents = [int(p[0].argmax()), 2, 5, 1], [-1, -1, -1, 0]
    counts = tree_first_token_counts(p, tokens, parents, 20000)
    assert chi2_pvalue(counts, p[0].numpy()) > ALPHA

    monkeypatch.setattr(verify_mod, "residual_after_rejection", lambda r, x: r)
    counts = tree_first_token_counts(p, tokens, parents, 20000)
    assert chi2_pvalue(counts, p[0].numpy()) < ALPHA


# -- configuration errors --------------------------------------------------------------------


def test_bad_configurations_are_one_line_errors():
    s = stages()
    with pytest.raises(CascadeError, match="at least one drafter"):
        build_csd([], [[1]])
    with pytest.raises(CascadeError, match="2 x 2"):
        build_csd([s["int8"], s["mag"]], [[1, 2]])
    with pytest.raises(CascadeError, match=">= 0"):
        build_csd([s["int8"], s["mag"]], [[1, -2], [0, 1]])
    with pytest.raises(CascadeError, match="at least one token"):
        build_csd([s["int8"]], [[0]])
    with pytest.raises(CascadeError, match="vocabulary mismatch"):
        build_csd([s["int8"], ModelStage(tiny_native(seed=3, vocab=100), 64)], [[2, 0], [0, 2]])
    with pytest.raises(CascadeError, match="k must be"):
        ChainRound(s["int8"], 0)
    with pytest.raises(CascadeError, match="cannot draft a tree"):
        TreeRound(s["mag"], s["int8"])
    with pytest.raises(CascadeError, match="cannot score a tree"):
        TreeRound(s["tiny"], s["mag"])
    with pytest.raises(CascadeError, match="tree width"):
        TreeRound(s["tiny"], s["int8"], width=0)
    with pytest.raises(CascadeError, match="context limit"):  # the tree does not fit the cache room
        run(list(range(2, 40)), n=8, round=TreeRound(s["tiny"], s["int8"], n_nodes=30), max_len=64)
    with pytest.raises(CascadeError, match="lenience must be"):
        Level(s["int8"], Horizontal([s["mag"]], [2], V), lenience=0.5)
    with pytest.raises(CascadeError, match="vocabulary mismatch"):
        MaG(V + 1, BigramTable.from_sequences([[1, 2, 3]], V))
