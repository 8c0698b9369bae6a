"""The CLI and the Python API on tiny model directories; every user mistake is one line + exit 2."""

import json

import pytest
from typer.testing import CliRunner

from speculative_cascade import SpeculativeGenerator
from speculative_cascade.cli import app
from speculative_cascade.errors import CascadeError

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_generate_json_greedy_equals_plain(tiny_model_dir, tiny_draft_dir):
    base = ["generate", "the quick brown fox", "-t", tiny_model_dir, "-n", 20, "--no-chat", "--json"]
    spec = invoke(*base, "-d", tiny_draft_dir, "-k", 3)
    plain = invoke(*base, "-d", "none")
    int8 = invoke(*base)  # default draft: INT8 copy of the target
    for r in (spec, plain, int8):
        assert r.exit_code == 0, r.output
    a, b, c = (json.loads(r.stdout) for r in (spec, plain, int8))
    assert a["token_ids"] == b["token_ids"] == c["token_ids"]
    assert set(a) == {"text", "token_ids", "cascade", "stats"}
    assert a["stats"]["rounds"] > 0 and 0 <= a["stats"]["acceptance_rate"] <= 1


def test_generate_streams_and_summarizes(tiny_model_dir):
    r = invoke(
        "generate", "hello world", "-t", tiny_model_dir, "-n", 10, "--no-chat", "--temperature", 0.8, "--seed", 1
    )
    assert r.exit_code == 0, r.output
    assert "tok/s" in r.stderr and "acceptance" in r.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["generate", "", "--no-chat"], "empty"),
        (["generate", "hi", "--no-chat", "--temperature", "-1"], "temperature"),
        (["generate", "hi", "--no-chat", "--top-p", "0"], "top_p"),
        (["generate", "hi", "--no-chat", "-k", "0"], "K must be"),
        (["generate", "hi", "--no-chat", "-n", "0"], "max_new_tokens"),
        (["generate", "hi " * 600, "--no-chat", "--max-len", "256"], "context limit"),
        (["generate", "hi", "--chat"], "chat template"),
    ],
)
def test_user_mistakes_are_one_line(tiny_model_dir, args, needle):
    args = list(args)
    r = invoke(*args[:2], "-t", tiny_model_dir, *args[2:])
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr
    assert "Traceback" not in r.output


def test_missing_and_corrupt_models(tmp_path, tiny_model_dir):
    bad_gguf = tmp_path / "broken.gguf"
    bad_gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)  # right magic, truncated body
    no_config = tmp_path / "empty_dir"
    no_config.mkdir()
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((tiny_model_dir / "config.json").read_text())
    for f in tiny_model_dir.glob("tokenizer*"):
        (corrupt / f.name).write_bytes(f.read_bytes())
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    for spec, needle in [
        (tmp_path / "nope.gguf", "not found"),
        ("./does/not/exist", "not found"),
        (bad_gguf, "cannot read GGUF"),
        (no_config, "config.json"),
        (corrupt, "corrupt"),
    ]:
        r = invoke("generate", "hi", "-t", spec, "--no-chat")
        assert r.exit_code == 2, (spec, r.output)
        errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and needle in errors[0] and "Traceback" not in r.output, r.stderr


def test_vocab_mismatch(tmp_path, tiny_model_dir, tiny_tokenizer):
    from conftest import hf_model

    d = tmp_path / "other-vocab"
    hf_model("llama", seed=3, vocab=400).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    r = invoke("generate", "hi", "-t", tiny_model_dir, "-d", d, "--no-chat")
    assert r.exit_code == 2 and "vocabulary mismatch" in r.stderr


def test_info(tiny_model_dir):
    r = invoke("info", "-t", tiny_model_dir, "--json")
    assert r.exit_code == 0, r.output
    d = json.loads(r.stdout)
    assert d["target"]["architecture"] == "llama" and d["target"]["implementation"] == "native"
    assert d["draft"]["dtype"] == "int8"
    assert d["draft"]["bytes"] < d["target"]["bytes"]
    from speculative_cascade.engine import kernels

    assert d["kernels"]["kernel"] == kernels.get().variant and d["kernels"]["kernel"] in d["kernels"]["built"]
    assert d["cpu"]
    text = invoke("info", "-t", tiny_model_dir)
    assert f"kernels {kernels.get().variant}" in text.stdout


def test_more_mistakes_are_one_line(tmp_path, tiny_model_dir):
    """Undecodable bytes, unknown stage kinds, a model directory without tokenizer files."""
    import shutil

    bad_utf8 = b"\xff\xfe".decode("utf-8", "surrogateescape")  # what the command line hands over
    no_tok = tmp_path / "no-tokenizer"
    no_tok.mkdir()
    for f in tiny_model_dir.iterdir():
        if not f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges")):
            shutil.copy(f, no_tok / f.name)
    cases = [
        (["generate", bad_utf8, "-t", tiny_model_dir, "--no-chat"], "UTF-8"),
        (["generate", "hi", "-t", tiny_model_dir, "--no-chat", "--stages", "foo,int8"], "int8, int4, fp32, layers"),
        (["generate", "hi", "-t", no_tok, "--no-chat"], "no tokenizer files"),
        (["generate", "hi", "-t", tiny_model_dir, "--no-chat", "--precision", "fp8"], "precision"),
    ]
    for args, needle in cases:
        r = invoke(*args)
        assert r.exit_code == 2, r.output
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], r.stderr
    gen = SpeculativeGenerator(tiny_model_dir, None)
    with pytest.raises(CascadeError, match="string or a list of token ids"):
        gen.generate(123)


def test_bench_table_columns(tmp_path, tiny_model_dir):
    """The terminal table: one value under each header, 80 columns wide."""
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "category": "a", "turns": ["the quick fox"]}))
    r = invoke("bench", "--prompts", prompts, "-n", 8, "--methods", "ar,spec", "-t", tiny_model_dir, "--no-chat",
               "--no-predict", "--sampling-check", 20)
    assert r.exit_code == 0, r.output
    lines = r.stderr.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.split()[:2] == ["method", "tok/s"])
    cols = lines[head].split()
    assert cols == ["method", "tok/s", "dec/s", "pred", "vs", "ar", "accept", "tok/rd", "=ar", "samp", "p"]
    spec = lines[head + 2].split()
    assert spec[0] == "spec" and spec[4].endswith("x") and spec[5].endswith("%") and spec[7] == "yes"
    assert float(spec[8]) > 0  # the sampling check's p-value, in its own column
    assert max(len(ln) for ln in lines[head : head + 3]) <= 80


def test_bench_report_of_ar_alone(tmp_path, tiny_model_dir):
    """A run of plain decoding alone has nothing to plot against ar and no acceptance: its report
    leaves those plots out (it raised in matplotlib's legend before)."""
    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "category": "a", "turns": ["the quick fox"]}))
    r = invoke("bench", "--prompts", prompts, "-n", 6, "--methods", "ar", "-t", tiny_model_dir, "--no-chat",
               "--report", tmp_path / "rep")
    assert r.exit_code == 0, r.output
    assert sorted(p.name for p in (tmp_path / "rep").glob("*.png")) == ["predicted.png"]


def test_bench_report(tmp_path, tiny_model_dir):
    prompts = tmp_path / "q.jsonl"
    rows = [
        {"question_id": i, "category": c, "turns": [t, "second turn"]}
        for i, (c, t) in enumerate([("a", "the quick fox"), ("a", "hello"), ("b", "lazy dog"), ("b", "x")])
    ]
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    out = tmp_path / "r.json"
    r = invoke(
        "bench",
        "--prompts",
        prompts,
        "--per-category",
        1,
        "-n",
        12,
        "--methods",
        "hf,hf-pld,hf-assisted,ar,spec",
        "-t",
        tiny_model_dir,
        "--no-chat",
        "--json",
        out,
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    assert rep["config"]["prompts"] == 2
    for m in ("hf", "hf-pld", "hf-assisted", "ar", "spec"):
        assert rep["methods"][m]["identical_to_ar"] is True
        # identical outputs, identical perplexity under the target (the paper's PPL column for lossless methods)
        assert rep["methods"][m]["perplexity"] == pytest.approx(rep["methods"]["ar"]["perplexity"], rel=1e-9)
        assert rep["methods"][m]["peak_rss_mb"] is None or rep["methods"][m]["peak_rss_mb"] > 0
        assert rep["methods"][m]["tokens_per_s"] > 0
    assert "acceptance_rate" in rep["methods"]["spec"]
    for m in ("ar", "spec"):  # the cost model's prediction, from the two prompts the run held out
        assert rep["methods"][m]["predicted_decode_tokens_per_s"] > 0
        assert rep["methods"][m]["predicted"]["tokens_per_round"] >= 1.0
    assert "predicted" not in rep["methods"]["hf"]
    terms = rep["methods"]["spec"]["prediction_terms"]  # each predicted term beside its measured value
    m, pred = terms["measured"], rep["methods"]["spec"]["predicted"]
    assert m["tokens_per_round"] == rep["methods"]["spec"]["mean_accepted_length"]
    assert m["draft_ms"] > 0 and m["verify_ms"] > 0
    assert terms["largest"] in terms["miss"]
    assert terms["miss"]["acceptance"] == pytest.approx(pred["tokens_per_round"] / m["tokens_per_round"] - 1)
    check = rep["methods"]["spec"]["sampling_check"]
    assert check["samples"] == 100 and check["p_value"] > 1e-4  # fails by chance once in 10,000 runs
    assert rep["config"]["repeats"] == 3  # each method ran each prompt three times; the median run counts
    for p in rep["prompts"]:
        for name in ("ar", "spec"):
            runs = sorted(t["decode_s"] for t in p["runs"][name])
            assert len(runs) == 3 and p["decode_seconds"][name] == runs[1]
    cats = {p["category"] for p in rep["prompts"]}
    for name in ("ar", "spec"):  # by category: decode tok/s of the median runs
        by = rep["methods"][name]["by_category"]
        assert rep["methods"][name]["by_category_basis"] == "decode" and set(by) == cats
        for c in cats:
            ps = [p for p in rep["prompts"] if p["category"] == c]
            toks = sum(p["new_tokens"][name] for p in ps)
            assert by[c] == pytest.approx(toks / sum(p["decode_seconds"][name] for p in ps))
    assert rep["methods"]["hf"]["by_category_basis"] == "wall"  # no prefill timing of its own
    assert "categories at or above ar (tok/s by category): " in r.stderr
    cfg = rep["config"]  # the probe read at the start and after each prompt; the bound from their median
    lo, hi = cfg["bandwidth_range_gb_s"]
    assert cfg["bandwidth_samples"] == 3
    assert lo <= cfg["bandwidth_first_gb_s"] <= hi and lo <= cfg["bandwidth_gb_s"] <= hi
    assert cfg["bound_tokens_per_s"] == pytest.approx(cfg["bandwidth_gb_s"] * 1e3 / cfg["decode_mb"])
    ar_rate = rep["methods"]["ar"]["decode_tokens_per_s"]
    assert cfg["ar_share_of_bound"] == pytest.approx(ar_rate / cfg["bound_tokens_per_s"])
    said = " ".join(r.stderr.split())  # (the console wraps long lines)
    assert "median of 3 readings through the run" in said and "`ar` decodes at" in said
    fwd = rep["config"]["target_forward_ms"]  # the target's measured t(n), and t(9) / t(1) beside the bound
    assert rep["config"]["forward_9_over_1"] == pytest.approx(fwd["9"] / fwd["1"]) and "9 tokens" in r.stderr
    bad = invoke("bench", "--prompts", prompts, "--methods", "warp-drive", "-t", tiny_model_dir)
    assert bad.exit_code == 2 and "unknown method" in bad.stderr
    prompts.write_text("not json\n")
    bad = invoke("bench", "--prompts", prompts, "-t", tiny_model_dir)
    assert bad.exit_code == 2 and "Spec-Bench" in bad.stderr


def test_python_api(tiny_model_dir, tiny_draft_dir):
    gen = SpeculativeGenerator(target_model=str(tiny_model_dir), draft_model=str(tiny_draft_dir), K=4, max_len=128)
    text = gen.generate("the lazy dog", max_new_tokens=16)
    assert isinstance(text, str)
    stats = gen.get_stats()
    assert {"acceptance_rate", "mean_accepted_length", "tokens_per_s"} <= set(stats)
    plain = SpeculativeGenerator(target_model=str(tiny_model_dir), draft_model=None, max_len=128)
    assert plain.generate_ids("the lazy dog", max_new_tokens=16) == gen.last_token_ids
    with pytest.raises(CascadeError):
        gen.generate("   ")


def test_concurrent_calls_on_one_generator_each_get_their_own_output(tiny_model_dir, tiny_draft_dir):
    from concurrent.futures import ThreadPoolExecutor

    gen = SpeculativeGenerator(target_model=str(tiny_model_dir), draft_model=str(tiny_draft_dir), K=4, max_len=128)
    prompts = ["the lazy dog", "a quick brown fox jumps", "over the hill and far away", "one two three"]
    alone = [gen.generate_ids(p, max_new_tokens=24) for p in prompts]
    assert len(set(map(tuple, alone))) > 1  # different prompts, different outputs: a mix-up would show
    with ThreadPoolExecutor(4) as pool:
        together = list(pool.map(lambda p: gen.generate_ids(p, max_new_tokens=24), prompts * 3))
    assert together == alone * 3


def test_transformers_model_objects_are_accepted(tiny_tokenizer):
    """Seed 002's usage: transformers models and a tokenizer passed in directly."""
    from conftest import hf_model

    target = hf_model("llama", seed=0)
    draft = hf_model("llama", seed=9, layers=1)
    gen = SpeculativeGenerator(target_model=target, draft_model=draft, tokenizer=tiny_tokenizer, K=3, max_len=128)
    ids = gen.generate_ids("hello world", max_new_tokens=12)
    plain = SpeculativeGenerator(target_model=target, draft_model=None, tokenizer=tiny_tokenizer, max_len=128)
    assert plain.generate_ids("hello world", max_new_tokens=12) == ids


def test_other_architectures_run_through_transformers(tmp_path, tiny_tokenizer, tiny_model_dir):
    """A GPT-2 model (no native implementation) works as target and as draft."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    d = tmp_path / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(vocab_size=320, n_positions=256, n_embd=32, n_layer=2, n_head=2)).save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    base = ["generate", "the lazy dog", "-n", 12, "--no-chat", "--json"]
    plain = invoke(*base, "-t", d, "-d", "none")
    spec = invoke(*base, "-t", d, "-d", tiny_model_dir, "-k", 3)
    assert plain.exit_code == 0 and spec.exit_code == 0, plain.output + spec.output
    assert json.loads(plain.stdout)["token_ids"] == json.loads(spec.stdout)["token_ids"]
    as_draft = invoke(*base, "-t", tiny_model_dir, "-d", d)
    reference = invoke(*base, "-t", tiny_model_dir, "-d", "none")
    assert json.loads(as_draft.stdout)["token_ids"] == json.loads(reference.stdout)["token_ids"]
    info = json.loads(invoke("info", "-t", d, "-d", "none", "--json").stdout)
    assert info["target"]["implementation"] == "transformers"
    r = invoke(*base, "-t", d, "-d", "int8")  # the INT8 self-draft needs a native target
    assert r.exit_code == 2 and "native target" in r.stderr
    default = invoke(*base, "-t", d)  # the default cascade for such a target: MaG
    assert default.exit_code == 0 and json.loads(default.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]
    assert json.loads(default.stdout)["cascade"]["stages"] == ["mag:none"]


def test_unknown_hub_id_is_a_clear_error(monkeypatch, tiny_model_dir):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True, raising=False)
    r = invoke("generate", "hi", "-t", "no-such-org/no-such-model", "--no-chat")
    assert r.exit_code == 2 and "neither a local path nor reachable" in r.stderr, r.output


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["generate", "hi", "--temperature", "abc"], "Invalid value for '--temperature'"),
        (["generate"], "Missing argument"),
        (["frobnicate"], "No such command"),
    ],
)
def test_usage_errors_are_one_line(monkeypatch, capsys, argv, needle):
    from speculative_cascade.cli import main

    monkeypatch.setattr("sys.argv", ["cascade", *argv])
    with pytest.raises(SystemExit) as exit_info:
        main()
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and needle in err[0], err


def test_seed_benchmark_aliases(tmp_path, tiny_model_dir):
    import subprocess
    import sys

    prompts = tmp_path / "q.jsonl"
    prompts.write_text(json.dumps({"question_id": 1, "category": "a", "turns": ["the quick fox"]}))
    base = [
        sys.executable,
        "-m",
        "speculative_cascade.seed.compare_methods",
        "--dataset",
        str(prompts),
        "--target",
        str(tiny_model_dir),
        "--max-new-tokens",
        "8",
        "--output",
        str(tmp_path / "out"),
    ]
    r = subprocess.run([*base, "--methods", "standard,cascade"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    rep = json.loads((tmp_path / "out" / "report.json").read_text())
    assert set(rep["methods"]) == {"ar", "spec", "chain"}  # 'ar' is always run as the reference
    r = subprocess.run([*base, "--methods", "medusa"], capture_output=True, text=True)
    assert r.returncode != 0 and r.stderr.strip().startswith("error:") and len(r.stderr.strip().splitlines()) == 1


def test_chi2_test_agrees_with_scipy_and_rejects_a_wrong_distribution():
    import numpy as np
    import torch
    from scipy.stats import chisquare

    from speculative_cascade.bench.runner import chi2_test

    probs = torch.tensor([0.5, 0.3, 0.15, 0.04, 0.01])
    counts = torch.tensor([52.0, 27.0, 16.0, 5.0, 0.0])
    stat, df, p = chi2_test(counts, probs)
    # cells expected below 5 (0.04 and 0.01 of 100) are pooled into one
    ref = chisquare(np.array([52, 27, 16, 5]), np.array([50, 30, 15, 5]))
    assert stat == pytest.approx(ref.statistic) and df == 3 and p == pytest.approx(ref.pvalue)
    _, _, p_bad = chi2_test(torch.tensor([25.0, 30.0, 35.0, 8.0, 2.0]), probs)
    assert p_bad < 1e-6


def test_median_run_and_categories_vs_ar():
    from speculative_cascade.bench.methods import Result
    from speculative_cascade.bench.report import BenchReport, MethodReport, categories_vs_ar
    from speculative_cascade.bench.runner import median_run

    runs = [Result([1], 2.0, 1.5), Result([1], 1.0, 0.9), Result([1], 3.0, 1.2)]
    assert median_run(runs) is runs[2]  # by decoding time, not wall time
    assert median_run(runs[:2]) is runs[1]  # an even number: the faster middle run
    wall = [Result([1], 2.0), Result([1], 1.0), Result([1], 3.0)]
    assert median_run(wall) is wall[0]  # no decoding time: wall time

    def m(by, basis="decode"):
        return MethodReport(1, 1.0, 1.0, 1.0, by, basis)

    rep = BenchReport({}, {"ar": m({"a": 10.0, "b": 10.0, "c": 10.0}), "x": m({"a": 10.0, "b": 11.0, "c": 9.9}),
                           "hf": m({"a": 99.0, "b": 99.0, "c": 99.0}, "wall")})
    assert categories_vs_ar(rep) == {"x": (2, 3)}  # level counts; a different basis is not compared


def test_paired_vs_ar_by_turn():
    from speculative_cascade.bench.report import BenchReport, MethodReport, markdown, paired_vs_ar

    def runs(*secs):
        return [{"decode_s": s, "s": s + 0.1} for s in secs]

    # category a: two prompts; the method's turn 2 falls in a slow spell with ar's own turn 2
    def prompt(category, tokens, ar, x, y):
        return {"category": category, "new_tokens": dict(zip(("ar", "x", "y"), tokens)),
                "runs": {"ar": runs(*ar), "x": runs(*x), "y": runs(*y)}}

    prompts = [
        prompt("a", (10, 10, 5), (1.0, 2.0, 1.0), (0.5, 1.0, 0.8), (1.0, 1.0, 1.0)),
        prompt("a", (10, 10, 5), (1.0, 2.0, 1.0), (0.5, 1.0, 0.8), (1.0, 1.0, 1.0)),
        prompt("b", (20, 20, 20), (2.0, 2.0, 2.0), (4.0, 2.0, 1.0), (2.0, 2.0, 2.0)),
    ]
    m = MethodReport(1, 1.0, 1.0, 1.0, {"a": 1.0, "b": 1.0}, "decode")
    cfg = {"repeats": 3, "prompts": 3, "max_new_tokens": 20, "target": "t", "threads": 2, "torch": "-", "date": "-"}
    rep = BenchReport(cfg, {"ar": m, "x": m, "y": m}, prompts)
    got = paired_vs_ar(rep)
    assert got["x"]["a"] == (2.0, 1.25, 2.0)  # turns: 2/1, 4/2, 2/1.6
    assert got["x"]["b"] == (1.0, 0.5, 2.0)
    # speed, not time: y's prompts end after 5 tokens, so half of ar's tokens in the same time
    assert got["y"]["a"] == (0.5, 0.5, 1.0)
    assert got["y"]["b"] == (1.0, 1.0, 1.0)
    md = markdown(rep)
    assert "## Against ar turn by turn" in md and "| x | 2.00x (1.25-2.00) | 1.00x (0.50-2.00) |" in md
    prompts[2]["runs"]["y"][0]["decode_s"] = None  # a method without decode times is left out
    assert set(paired_vs_ar(rep)) == {"x"}
    assert paired_vs_ar(BenchReport({}, {"x": m}, [{"category": "a", "runs": {"x": runs(1.0)}}])) == {}
