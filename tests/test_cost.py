"""The cost model's closed forms, and its calibration on a tiny model."""

import math
from dataclasses import replace

import pytest

from conftest import tiny_native
from speculative_cascade.cost import Acceptance, ForwardCost, predict_chain
from speculative_cascade.cost.calibrate import measure_forward_cost
from speculative_cascade.errors import CascadeError
from speculative_cascade.stages.neural import ModelStage


def test_constant_acceptance_gives_leviathans_expected_length():
    for a in (0.0, 0.5, 0.9):
        for k in (1, 4, 8):
            expected = (1 - a ** (k + 1)) / (1 - a)  # Leviathan et al. 2023, eq. 1
            assert math.isclose(Acceptance.constant(a).expected_tokens(k), expected)


def test_measured_acceptance_and_extrapolation():
    acc = Acceptance.from_counts([90, 72, 0], [100, 100, 0])  # third position never drafted
    assert acc.survive == (0.9, 0.72)
    assert math.isclose(acc.rate(1), 0.8)
    assert math.isclose(acc.expected_tokens(3), 1 + 0.9 + 0.72 + 0.72 * 0.8)
    with pytest.raises(CascadeError):
        Acceptance((1.5,))


def test_forward_cost_interpolates_and_extrapolates():
    t = ForwardCost("x", ((1, 0.010), (3, 0.014), (9, 0.026)))
    assert t(1) == 0.010 and math.isclose(t(2), 0.012) and math.isclose(t(6), 0.020)
    assert math.isclose(t(15), 0.038)  # beyond the last point: the last slope
    roof = ForwardCost.roofline("r", weight_bytes=1e8, bandwidth=1e10, flops_per_token=2e8, flops_rate=1e11)
    assert math.isclose(roof(1), 0.01) and math.isclose(roof(5), 0.01) and math.isclose(roof(10), 0.02)


def test_two_stage_prediction_by_hand():
    target = ForwardCost("t", ((1, 0.030), (9, 0.048)))
    draft = ForwardCost("d", ((1, 0.010), (2, 0.013)))
    p = predict_chain(target, [draft], [Acceptance.constant(0.9)], [8], overhead=0.002)
    tokens = (1 - 0.9**9) / 0.1
    assert math.isclose(p["tokens_per_round"], tokens)
    assert math.isclose(p["round_s"], 8 * 0.010 + 0.048 + 0.002)
    assert math.isclose(p["tokens_per_s"], tokens / (0.080 + 0.048 + 0.002))


def test_three_stage_prediction_by_hand():
    target = ForwardCost("t", ((1, 0.030), (9, 0.048)))
    draft = ForwardCost("d", ((1, 0.010), (2, 0.011), (4, 0.020)))
    free = ForwardCost.free("mag")
    # stage 0 (free) drafts 1 token per draft forward, accepted half the time: a draft token costs 0.011 / 1.5
    p = predict_chain(target, [free, draft], [Acceptance.constant(0.5), Acceptance.constant(0.9)], [1, 8])
    assert math.isclose(p["draft_s"], 8 * 0.011 / 1.5)
    # a useless stage 0 only adds cost
    worse = predict_chain(target, [free, draft], [Acceptance.constant(0.0), Acceptance.constant(0.9)], [1, 8])
    plain = predict_chain(target, [draft], [Acceptance.constant(0.9)], [8])
    assert worse["tokens_per_s"] < plain["tokens_per_s"] < p["tokens_per_s"]
    with pytest.raises(CascadeError):
        predict_chain(target, [draft], [Acceptance.constant(0.9)], [0])


def test_calibration_measures_what_the_stage_costs():
    import time

    class Sleepy:  # a stage whose forward over n tokens takes n milliseconds
        name = "sleepy"

        def score(self, ids, draft):
            time.sleep(0.001 * (len(draft) + 1))

    t = measure_forward_cost(Sleepy(), list(range(2, 40)), ns=(1, 4, 32), reps=3)
    assert [n for n, _ in t.points] == [1, 4, 32]
    assert t(1) >= 0.001 and t(32) >= 0.032 and t(32) > t(4) > t(1)
    stage = ModelStage(tiny_native(seed=0), 256)  # a real stage: the cache is rolled back every time
    real = measure_forward_cost(stage, list(range(2, 40)), ns=(1, 4), reps=2)
    assert all(s > 0 for _, s in real.points) and stage.runner.length == 38 + 3


def test_tune_writes_a_config_that_generate_reads(tiny_model_dir, tmp_path, monkeypatch):
    import json

    from typer.testing import CliRunner

    from speculative_cascade.cli import app
    from speculative_cascade.config import load_cascade

    monkeypatch.setenv("SPECULATIVE_CASCADE_CACHE", str(tmp_path / "cache"))
    prompts = tmp_path / "p.txt"
    prompts.write_text("the quick brown fox\nhello world\n")
    out = tmp_path / "c.toml"
    runner = CliRunner()
    r = runner.invoke(
        app, ["tune", "-t", str(tiny_model_dir), "--prompts", str(prompts), "-n", "16", "--out", str(out)]
    )
    assert r.exit_code == 0, r.output
    assert "predicted" in r.stdout and out.is_file()
    # tune refines the adaptive default's calibration cache and says so
    cache = list((tmp_path / "cache").glob("adaptive-*.json"))
    assert len(cache) == 1 and "adaptive calibration" in r.stdout and "n=9:" in r.stdout
    assert json.loads(cache[0].read_text())["t1"] > 0
    cfg = load_cascade(out)  # a configuration, or None when plain decoding is predicted fastest
    base = ["generate", "the quick brown fox", "-t", str(tiny_model_dir), "-n", "12", "--no-chat", "--json"]
    tuned = json.loads(runner.invoke(app, [*base, "--config", str(out)]).stdout)
    plain = json.loads(runner.invoke(app, [*base, "-d", "none"]).stdout)
    assert tuned["token_ids"] == plain["token_ids"]
    assert (tuned["cascade"] is None) == (cfg is None)


def test_plain_decoding_file(tmp_path):
    from speculative_cascade.config import load_cascade

    for name, text in (
        ("plain.toml", "[cascade]\nstages = []\n"),
        ("plain.yaml", "stages: []\n"),
        ("plain.json", '{"cascade": {"stages": []}}'),
    ):
        f = tmp_path / name
        f.write_text(text)
        assert load_cascade(f) is None, name
    assert load_cascade({"stages": ["int8"], "k": [4]}).k == (4,)


def test_tune_file_round_trips_every_kind_of_setting(tmp_path):
    """What `cascade tune` writes reads back as the same configuration, whatever it chose:
    booleans (adaptive), floats, lists and nested lists (k_matrix)."""
    from speculative_cascade.config import CascadeConfig, load_cascade
    from speculative_cascade.cost.tune import TuneResult

    for settings in (
        {"stages": ["int8"], "k": [3]},
        {"stages": ["mag", "int8"], "k": [3, 8], "adaptive": True},
        {"stages": ["mag", "int8"], "k_matrix": [[7, 2], [0, 1]], "lenience": 1.5, "precision": "fp32"},
        {"stages": ["mag", "int8"], "mode": "tree", "tree_nodes": 16, "tree_width": 2, "tree_keep": 4},
    ):
        config = CascadeConfig.from_dict(settings)
        result = TuneResult(config, 10.0, 5.0, [], None, 1.0, None, None)
        f = tmp_path / "c.toml"
        f.write_text(result.to_toml())
        assert load_cascade(f) == config, f.read_text()


def test_forward_cost_grows_with_the_context():
    t = ForwardCost("x", ((1, 0.010), (9, 0.020)), context=100, slope=((1, 1e-5), (9, 5e-5)))
    assert t(1) == 0.010 and t(1, 100) == 0.010
    assert math.isclose(t(1, 600), 0.010 + 500 * 1e-5) and math.isclose(t(9, 300), 0.020 + 200 * 5e-5)
    assert math.isclose(t(5, 200), 0.015 + 100 * 3e-5)  # the slope interpolates in n too
    assert math.isclose(t.scaled(2.0)(9, 300), 2 * t(9, 300))
    # a slope measured on a busy machine (here: more than the whole cost per context token) does not
    # take a shorter context's cost to zero: at most all of it shrinks, in proportion to the context
    noisy = ForwardCost("x", ((1, 0.010),), context=100, slope=((1, 1e-3),))
    assert math.isclose(noisy(1, 40), 0.010 * 40 / 100) and math.isclose(noisy(1, 200), 0.010 + 0.1)
    assert math.isclose(t(1, 40), 0.010 - 60 * 1e-5)  # a sane slope moves it as before


def test_generation_rate_charges_the_cut_last_round():
    from speculative_cascade.cost.analytic import generation_rate

    assert math.isclose(generation_rate(1.0, 0.03, 128), 1 / 0.03)  # autoregressive: exactly N rounds
    assert math.isclose(generation_rate(8.0, 0.1), 80.0)
    assert math.isclose(generation_rate(8.0, 0.1, 128), 128 / ((16 + 0.5 * 7 / 8) * 0.1))
    assert generation_rate(8.0, 0.1, 32) < generation_rate(8.0, 0.1, 128) < 80.0


def test_budgeted_positions_count_a_drafter_that_proposes_nothing_as_rejected():
    from speculative_cascade.cascade import RoundResult
    from speculative_cascade.decoding import GenerationStats

    st = GenerationStats()
    st.record(RoundResult([1], drafted=0, accepted=0, budget=4))  # a drafter with nothing to say (MaG, no match)
    st.record(RoundResult([1, 2, 3], drafted=4, accepted=2, budget=4))
    st.record(RoundResult([1, 2, 3], drafted=2, accepted=2, budget=2))  # the token budget allowed only 2 positions
    assert st.budgeted_by_position == [3, 3, 2, 2]
    assert st.drafted_by_position == [2, 2, 1, 1]
    acc = Acceptance.from_counts(st.accepted_by_position, st.budgeted_by_position)
    assert acc.survive == (2 / 3, 2 / 3, 0.0, 0.0)


def _profile(rnd, target, prompts, n=16):
    from speculative_cascade.cost.calibrate import measure_target_cost, profile_round

    stage = ModelStage(target, 256, name="target")
    cost = measure_target_cost(stage, prompts, 256, short=8, long=64)
    return profile_round("x", rnd, stage, prompts, cost, max_new_tokens=n)


def test_profile_of_an_exact_drafter_and_its_closed_form():
    from speculative_cascade.cascade import ChainRound

    target = tiny_native(seed=0)
    prompts = [[5, 17, 42, 7], [3, 9, 11]]
    exact = _profile(ChainRound(ModelStage(target, 256, name="same"), 4), target, prompts)
    assert exact.accept.survive == (1.0, 1.0, 1.0, 1.0) and exact.drafts.survive == (1.0,) * 4
    assert exact.context_forwards > 0  # a self-draft's forwards grow with the context
    p = exact.predict()
    assert math.isclose(p["tokens_per_round"], 5.0) and math.isclose(exact.drafted(4), 4.0)
    assert math.isclose(p["round_s"], p["draft_s"] + p["verify_s"] + exact.overhead)
    assert math.isclose(p["draft_s"], 4 * exact.token_cost)
    # the verification term is the measured one at the calibrated k; longer contexts cost more
    assert math.isclose(p["verify_s"], exact.verify_per_round, rel_tol=0.35)
    # longer contexts cost more: by the measured slope (never negative; on a tiny model it can be lost in
    # the timing noise of a busy machine), and strictly with a known one
    assert exact.predict(context=exact.context + 200)["round_s"] >= p["round_s"]
    tc = exact.target_cost
    known = replace(exact, target_cost=ForwardCost(tc.name, tc.points, tc.context, ((1, 1e-6), (17, 2e-6))))
    assert known.predict(context=known.context + 200)["round_s"] > known.predict()["round_s"]
    # an absurd slope (a busy machine's) and a shorter context: every term stays positive
    absurd = replace(exact, target_cost=ForwardCost(tc.name, tc.points, tc.context, ((1, 1.0), (17, 1.0))))
    short = absurd.predict(context=exact.context / 2)
    assert short["draft_s"] > 0 and short["verify_s"] > 0 and short["tokens_per_s"] > 0
    assert exact.predict(k=2)["tokens_per_round"] == 3.0
    # a drafter the target never agrees with: one token a round, whatever k
    wrong = _profile(ChainRound(ModelStage(tiny_native(seed=7), 256, name="other"), 4), target, prompts)
    assert wrong.accept.expected_tokens(4) < 1.5
    assert wrong.predict()["tokens_per_s"] < exact.predict()["tokens_per_s"]
