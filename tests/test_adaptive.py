"""The adaptive round: lossless whatever it chooses, chooses by the cost model, learns, and caches."""

from collections import deque

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import decode, tiny_native
from speculative_cascade.adaptive import PROBE_EVERY, SCALE_RANGE, AdaptiveRound, Calibration
from speculative_cascade.builder import build_round, default_cascade
from speculative_cascade.cascade import Proposal, build_csd
from speculative_cascade.config import CascadeConfig
from speculative_cascade.decoding import StopChecker
from speculative_cascade.engine.quant import quantize_int8
from speculative_cascade.errors import CascadeError
from speculative_cascade.sampling import SamplingParams
from speculative_cascade.stages.mag import MaG
from speculative_cascade.stages.neural import ModelStage
from test_speculative import ALPHA, chi2_pvalue, exact_joint

TARGET = tiny_native(seed=0)
V = TARGET.vocab_size
PROMPTS = [[5, 17, 42, 7, 5, 17, 42, 7, 5, 17], [3], [100, 200, 300, 12, 13, 14, 15, 16, 17, 100, 200]]


def ar(prompt, n=32):
    return decode(TARGET, prompt, max_new_tokens=n, stop=StopChecker(()), max_len=128)[0]


def adaptive(name: str, k: int = 6, calibration=None) -> AdaptiveRound:
    if name == "mag":
        return AdaptiveRound(MaG(V), k, lookup=True, name=name, calibration=calibration)
    if name == "mag->int8":
        drafter, _ = build_csd([ModelStage(quantize_int8(TARGET), 128, name="int8"), MaG(V)], [[k, 0], [0, 2]])
        return AdaptiveRound(drafter, k, lookup=False, name=name, calibration=calibration)
    model = {"int8": quantize_int8(TARGET), "random": tiny_native(seed=11, layers=1), "same": TARGET}[name]
    return AdaptiveRound(ModelStage(model, 128, name=name), k, lookup=False, name=name, calibration=calibration)


@pytest.mark.parametrize("name", ["mag", "int8", "random", "same", "mag->int8"])
def test_greedy_output_is_the_targets_whatever_k_it_chooses(name):
    rnd = adaptive(name, calibration=Calibration("test"))  # in memory: the choices change from call to call
    for _ in range(2):
        for prompt in PROMPTS:
            out, stats = decode(TARGET, prompt, round=rnd, max_new_tokens=32, stop=StopChecker(()), max_len=128)
            assert out == ar(prompt)
            assert sum(stats.rounds_by_draft_length) == stats.rounds


def test_sampling_with_the_controller_is_the_targets_law():
    """Two sampled tokens, the controller learning across the 5000 generations (its choices vary):
    the joint law is still the target's."""
    vocab = 12
    target = tiny_native(seed=30, vocab=vocab)
    draft = ModelStage(tiny_native(seed=31, vocab=vocab, layers=1), 16, name="draft")
    rnd = AdaptiveRound(draft, 2, lookup=False, calibration=Calibration("test"))
    stage = ModelStage(target, 16, name="target")
    counts = np.zeros(vocab * vocab)
    chosen = set()
    for s in range(5000):
        out, st = decode(target, [1, 2, 3], round=rnd, target_stage=stage, max_new_tokens=2,
                         params=SamplingParams(temperature=1.0, seed=s), stop=StopChecker(()))
        counts[out[0] * vocab + out[1]] += 1
        chosen.update(k for k, n in enumerate(st.rounds_by_draft_length) if n)
    assert chi2_pvalue(counts, exact_joint(target, [1, 2, 3], vocab)) > ALPHA
    assert len(chosen) >= 2, chosen  # the test exercised more than one draft length


def _with(rnd: AdaptiveRound, ratio: float, accept: float, draft_per_token: float = 0.0) -> AdaptiveRound:
    """Set what the round has measured: T(n) = 1 + ratio (n - 1) ms, acceptance ``accept`` at every position."""
    for n in range(1, rnd.k + 2):
        for _ in range(3):
            rnd.times.setdefault(n, deque(maxlen=9)).append(1e-3 * (1 + ratio * (n - 1)))
    rnd.acc = [[1000 * accept, 1000.0] for _ in range(rnd.k)]
    rnd.draft_token_s = draft_per_token
    return rnd


def test_the_choice_follows_the_cost_model():
    # cheap verification, good drafts: verify everything
    assert _with(adaptive("mag"), 0.05, 0.9).choose(6) == 6
    # drafts the target rejects: plain decoding
    assert _with(adaptive("mag"), 0.05, 0.02).choose(6) == 0
    # verification costing 40% more per token than the drafts bring: plain decoding
    assert _with(adaptive("mag"), 0.4, 0.3).choose(6) == 0
    # in between: some but not all
    assert 0 < _with(adaptive("mag"), 0.25, 0.8).choose(6) < 6
    # a neural draft's own cost counts: as dear as the target, nothing pays
    assert _with(adaptive("int8"), 0.05, 0.9, draft_per_token=1e-3).choose(6) == 0
    assert _with(adaptive("int8"), 0.05, 0.9, draft_per_token=1e-4).choose(6) == 6
    # the expected rate is the closed form E(k) / (D(k) + T(k + 1))
    rnd = _with(adaptive("int8"), 0.1, 0.5, draft_per_token=2e-4)
    assert rnd.expected_rate(2) == pytest.approx((1 + 0.5 + 0.25) / (2 * 2e-4 + 1.2e-3), rel=1e-3)


def test_untried_positions_expect_what_the_one_before_did():
    """Acceptance seen only at the first positions (short drafts so far): a deeper position is
    expected to do as the one before it, not at an uninformed 1/2, so longer drafts are tried when
    they would pay (here: with 1/2 there, k = 2 would win, 1.64 against 1.56 tokens/ms for k = 3)."""
    rnd = _with(adaptive("int8"), 0.1, 0.0, draft_per_token=3e-4)
    rnd.acc = [[100.0, 100.0], [97.0, 100.0]] + [[0.0, 0.0]] * (rnd.k - 2)
    p = rnd.acceptances(rnd.k)
    assert p[0] == pytest.approx(101 / 102) and p[1] == pytest.approx((97 + 2 * p[0]) / 102)
    assert p[2:] == pytest.approx([p[1]] * (rnd.k - 2))
    assert rnd.choose(rnd.k) == rnd.k
    rnd.acc[2] = [5.0, 100.0]  # tried, and mostly rejected, at the third position: drafts stop before it
    assert rnd.choose(rnd.k) == 2


def test_a_lookup_proposal_is_judged_by_how_far_its_matches_reach():
    """MaG says how far back each proposed token's match reaches; the round judges each token by the
    acceptance seen for its reach class, learns it per class, and caches it."""
    rnd = _with(adaptive("mag"), 0.25, 0.5)
    rnd.by_reach = {16: [95.0, 100.0], 3: [10.0, 100.0]}
    rnd.kinds = [16, 16, 3, 3, 16]
    assert rnd.choose(5) == 2  # the long matches pay, the 3-token one after them does not
    rnd.kinds = [3, 16, 16, 16, 16]
    assert rnd.choose(5) == 0  # a poor first token stops the round before the good ones
    rnd.kinds = None
    assert rnd.choose(5) > 0  # without kinds: by position (acceptance 0.5 everywhere)
    rnd.kinds = [16, 3]
    rnd._learn(2, 1, 1e-3)  # the first accepted, the second rejected
    assert rnd.by_reach == {16: [96.0, 101.0], 3: [10.0, 101.0]} and rnd.kinds is None


def test_mag_rounds_learn_by_reach_and_cache_it(tmp_path):
    cal = Calibration.load(tmp_path, "k")
    rnd = adaptive("mag", calibration=cal)
    out, _ = decode(TARGET, PROMPTS[0], round=rnd, max_new_tokens=32, stop=StopChecker(()), max_len=128)
    assert out == ar(PROMPTS[0])
    assert rnd.by_reach and all(0 <= a <= t for a, t in rnd.by_reach.values())
    again = Calibration.load(tmp_path, "k")
    rows = again.acceptance["mag#reach"]
    assert {c: r for c, r in enumerate(rows) if r[1] > 0} == {c: list(v) for c, v in rnd.by_reach.items()}
    assert adaptive("mag", calibration=again).by_reach  # a later generation starts from it


def test_extra_tokens_cost_what_this_generation_measured():
    """The cache's T(n) / T(1) came from other contexts; once this generation has measured a forward
    over several tokens, the cached excess over one token is scaled to match it."""
    rnd = adaptive("mag", calibration=Calibration("test", ratios={2: 1.1, 5: 1.4}))
    rnd.times[1] = deque([1e-3] * 3, maxlen=9)
    assert rnd.target_cost(5) == pytest.approx(1.4e-3)  # nothing over several tokens measured yet
    rnd.times[2] = deque([1.3e-3], maxlen=9)  # a 2-token forward costs 3x the cached excess
    assert rnd.excess_scale() == pytest.approx(3.0)
    assert rnd.target_cost(5) == pytest.approx(1e-3 * (1 + 3 * 0.4))
    assert rnd.target_cost(2) == pytest.approx(1e-3 * 1.3)  # one timing: the scaled ratio gives it back
    rnd.times[2] = deque([1.3e-3] * 3, maxlen=9)
    assert rnd.target_cost(2) == pytest.approx(1.3e-3)  # three: measured
    rnd.times[2] = deque([50e-3], maxlen=9)  # one wild timing moves it at most SCALE_RANGE[1]
    assert rnd.excess_scale() == SCALE_RANGE[1]


def test_it_keeps_learning_after_long_plain_stretches():
    rnd = _with(adaptive("mag"), 0.05, 0.02)
    rnd.idle = PROBE_EVERY
    assert rnd.choose(6) == 1  # one token verified anyway, so acceptance is measured again
    assert rnd.choose(0) == 0
    rnd.choose(6)
    rnd.settle(Proposal([5], None, 6), 0, 1e-3)  # the probe was rejected: the next one waits twice as long
    for _ in range(2 * PROBE_EVERY):
        assert rnd.choose(6) == 0
        rnd.settle(Proposal([], None, 6), 0, 1e-3)
    assert rnd.choose(6) == 1
    rnd.settle(Proposal([5], None, 6), 1, 1e-3)  # accepted: back to the first wait
    assert rnd.probe_after == PROBE_EVERY


def test_calibration_round_trip_and_key(tmp_path):
    key = Calibration.key_for(TARGET, "cpu A", "avx2")
    assert key != Calibration.key_for(TARGET, "cpu B", "avx2")  # another machine
    assert key != Calibration.key_for(TARGET, "cpu A", "generic")  # another kernel variant
    assert key != Calibration.key_for(tiny_native(seed=0, layers=1), "cpu A", "avx2")  # another model
    cal = Calibration.load(tmp_path, key)
    assert cal.ratios == {} and cal.acceptance == {}
    rnd = adaptive("same", calibration=cal)
    decode(TARGET, PROMPTS[0], round=rnd, max_new_tokens=32, stop=StopChecker(()), max_len=128)
    again = Calibration.load(tmp_path, key)
    assert again.acceptance["same"][0][1] > 0 and again.acceptance["same"][0][0] == again.acceptance["same"][0][1]
    assert all(r > 0 for r in again.ratios.values())
    fresh = adaptive("same", calibration=again)
    # starts from what the last run measured (the draft is the target: every token accepted), not from 1/2
    assert adaptive("same").acceptance(0) == 0.5 and fresh.acceptance(0) > 0.8
    assert Calibration.load(tmp_path, Calibration.key_for(TARGET, "cpu B", "avx2")).acceptance == {}
    (tmp_path / f"adaptive-{key}.json").write_text("{not json")
    assert Calibration.load(tmp_path, key).acceptance == {}  # a corrupt cache is ignored, not an error


def test_configuration():
    cfg = CascadeConfig.from_dict({"stages": ["mag:none"], "k": [6], "adaptive": True})
    assert "adaptive" in cfg.describe()
    rnd, _ = build_round(cfg, TARGET, 128)
    assert isinstance(rnd, AdaptiveRound) and rnd.lookup and rnd.k == 6
    rnd, _ = build_round(cfg.with_(stages=("mag:none", "int8"), k=(2, 6)), TARGET, 128)
    assert isinstance(rnd, AdaptiveRound) and not rnd.lookup
    assert default_cascade(TARGET).adaptive
    with pytest.raises(CascadeError, match="adaptive"):
        CascadeConfig(stages=("tiny",), mode="tree", adaptive=True)
    with pytest.raises(CascadeError, match="adaptive must be"):
        CascadeConfig.from_dict({"stages": ["mag"], "adaptive": "yes"})


def test_stats_say_what_it_chose():
    out, stats = decode(TARGET, PROMPTS[0], round=adaptive("random"), max_new_tokens=24, stop=StopChecker(()),
                        max_len=128)
    d = stats.to_dict()
    assert sum(d["rounds_by_draft_length"]) == d["rounds"]
    assert d["rounds_without_drafting"] == pytest.approx(d["rounds_by_draft_length"][0] / d["rounds"])
    torch.testing.assert_close(torch.tensor(out), torch.tensor(ar(PROMPTS[0], 24)))


@settings(max_examples=300, deadline=None)
@given(st.lists(st.floats(0.0, 0.6), min_size=6, max_size=6), st.lists(st.integers(0, 16), min_size=1, max_size=6),
       st.dictionaries(st.integers(0, 16), st.tuples(st.integers(0, 50), st.integers(0, 50)), max_size=8))
def test_the_first_tokens_shortcut_never_changes_the_choice(extra, kinds, seen):
    """A lookup round whose first token's class is too poor for any k to pay skips reading the rest
    of the proposal: whenever it does, the full choice over the whole proposal is plain decoding too.
    (T(n): each extra token costs ``extra[n]`` of a one-token forward more.)"""
    rnd = adaptive("mag")
    for n in range(1, rnd.k + 2):
        rnd.times[n] = deque([1e-3 * (1 + sum(extra[: n - 1]))] * 3, maxlen=9)
    rnd.by_reach = {c: [float(min(a, t)), float(t)] for c, (a, t) in seen.items()}
    rnd.kinds = kinds
    if rnd._first_cannot_pay(kinds[0]):
        assert rnd.choose(len(kinds)) == 0
