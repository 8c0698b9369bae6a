"""Cascade configuration files, the CLI's cascade options, distillation, and the seeds' APIs."""

import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch
from typer.testing import CliRunner

from conftest import tiny_native
from speculative_cascade.cli import app
from speculative_cascade.config import CascadeConfig
from speculative_cascade.errors import CascadeError
from speculative_cascade.stages.mag import REACH, BigramTable, MaG, SuffixIndex
from speculative_cascade.stages.tiny import TinyProjection

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def one_line_error(r, needle):
    assert r.exit_code == 2, r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], r.stderr


@pytest.mark.parametrize(
    "suffix,text",
    [
        (".toml", '[cascade]\nstages = ["mag", "int8"]\nmode = "chain"\nk = [2, 5]\n'),
        (".yaml", "stages: [mag, int8]\nmode: chain\nk: [2, 5]\n"),
        (".json", '{"cascade": {"stages": ["mag", "int8"], "k": [2, 5]}}'),
    ],
)
def test_config_files(tmp_path, suffix, text):
    p = tmp_path / f"c{suffix}"
    p.write_text(text)
    c = CascadeConfig.from_file(p)
    assert c.stages == ("mag", "int8") and c.k == (2, 5) and c.mode == "chain"
    assert c.chain_matrix() == [[5, 0], [0, 2]]  # CSD convention: largest drafter first
    assert CascadeConfig.from_dict(c.to_dict()) == c


@pytest.mark.parametrize(
    "settings,needle",
    [
        ({"stages": []}, "at least one"),
        ({"stages": ["int8"], "mode": "beam"}, "mode must be"),
        ({"stages": ["mag", "int8"], "k": [2]}, "one value per stage"),
        ({"stages": ["int8"], "k": [0]}, "every k"),
        ({"stages": ["int8"], "colour": "red"}, "unknown cascade setting"),
        ({"stages": ["tiny", "int8"], "mode": "tree", "tree_keep": 0}, "tree_keep"),
        ({"stages": ["a", "b", "c"], "mode": "tree"}, "one or two stages"),
        ({"stages": ["int8"], "lenience": 0.5}, "lenience"),
        ({"stages": ["int8"], "k": ["x"]}, "bad cascade setting"),
    ],
)
def test_bad_configs(settings, needle):
    with pytest.raises(CascadeError, match=needle):
        CascadeConfig.from_dict(settings)


def test_unparsable_and_missing_files(tmp_path):
    bad = tmp_path / "c.toml"
    bad.write_text("stages = [")
    with pytest.raises(CascadeError, match="cannot parse"):
        CascadeConfig.from_file(bad)
    with pytest.raises(CascadeError, match="not found"):
        CascadeConfig.from_file(tmp_path / "nope.toml")


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory, tiny_model_dir):
    """A (random) tiny projection model for the tiny target directory."""
    from speculative_cascade.engine.loader import load_model

    target = load_model(str(tiny_model_dir), progress=False).model
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny") / "tiny.safetensors"
    TinyProjection(target.tok_embeddings.weight).save(path)
    return path


def test_cli_cascades_equal_plain_decoding(tiny_model_dir, tiny_draft_dir, tiny_ckpt, tmp_path):
    base = ["generate", "the quick brown fox", "-t", tiny_model_dir, "-n", 20, "--no-chat", "--json"]
    plain = json.loads(invoke(*base, "-d", "none").stdout)["token_ids"]
    cfg = tmp_path / "c.toml"
    cfg.write_text('[cascade]\nstages = ["mag", "int8"]\nk_matrix = [[3, 2], [0, 2]]\n')
    variants = [
        ["--stages", "mag,int8", "-k", "2,4"],
        ["--stages", f"tiny:{tiny_ckpt},int8", "-k", "3,5"],
        ["--stages", f"tiny:{tiny_ckpt},int8", "--mode", "tree", "--tree-nodes", 8, "--tree-keep", 4],
        ["--stages", "mag,int8", "--k-matrix", "4,2;0,3", "--lenience", 2],
        ["--cascade", cfg],
        ["--stages", f"mag,{tiny_draft_dir},int8", "-k", "2,3,4"],  # any model directory as a stage
    ]
    for v in variants:
        r = invoke(*base, *v)
        assert r.exit_code == 0, (v, r.output)
        out = json.loads(r.stdout)
        assert out["token_ids"] == plain, v
        assert [s["name"] for s in out["stats"]["stages"]][-1] == "target"


def test_cli_stats_breakdown(tiny_model_dir):
    r = invoke(
        "generate",
        "hello world",
        "-t",
        tiny_model_dir,
        "-n",
        16,
        "--no-chat",
        "--stages",
        "mag,int8",
        "-k",
        "2,4",
        "--stats",
    )
    assert r.exit_code == 0, r.output
    assert "cascade: chain mag -> int8 -> target" in r.stderr
    assert "g_{1|0}" in r.stderr and "g_{2|1}" in r.stderr and "(other)" in r.stderr


@pytest.mark.parametrize(
    "args,needle",
    [
        (["--stages", "mag,int8", "-k", "2"], "one value per stage"),
        (["--stages", "int8", "--k-matrix", "x;y"], "k_matrix must look like"),
        (["--stages", "mag,int8", "--k-matrix", "1,2"], "2 x 2"),
        (["--stages", "int8", "--mode", "tree"], "cannot draft a tree"),
        (["--stages", "mag,int8", "--lenience", 2, "--temperature", 1], "lenience"),
        (["--stages", "tiny:/nonexistent.safetensors,int8"], "not found"),
        (["--cascade", "/nonexistent.toml"], "not found"),
        (["--stages", "int8", "--tree-width", 0, "--mode", "tree"], "tree_width"),
    ],
)
def test_cli_cascade_mistakes_are_one_line(tiny_model_dir, args, needle):
    r = invoke("generate", "hi", "-t", tiny_model_dir, "-n", 4, "--no-chat", *args)
    one_line_error(r, needle)


def test_tiny_checkpoint_checks_its_target(tiny_ckpt, tiny_draft_dir, tmp_path):
    from speculative_cascade.engine.loader import load_model

    other = load_model(str(tiny_draft_dir), progress=False).model
    with pytest.raises(CascadeError, match="another target"):
        TinyProjection.load(tiny_ckpt, other.tok_embeddings.weight)
    with pytest.raises(CascadeError, match="vocabulary mismatch"):
        TinyProjection.load(tiny_ckpt, torch.zeros(100, 64))
    corrupt = tmp_path / "bad.safetensors"
    corrupt.write_bytes(b"\x00" * 64)
    with pytest.raises(CascadeError, match="not a tiny-model checkpoint"):
        TinyProjection.load(corrupt, other.tok_embeddings.weight)


def test_tiny_checkpoint_round_trip(tmp_path):
    target = tiny_native(seed=0)
    torch.manual_seed(0)
    m = TinyProjection(target.tok_embeddings.weight)
    x = torch.arange(0, 50)
    ref = m(x)
    m.save(tmp_path / "fp32.safetensors", int8=False)
    m.save(tmp_path / "int8.safetensors", int8=True)
    torch.testing.assert_close(TinyProjection.load(tmp_path / "fp32.safetensors", target.tok_embeddings.weight)(x), ref)
    q = TinyProjection.load(tmp_path / "int8.safetensors", target.tok_embeddings.weight)(x)
    assert (q.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_mag_prefers_the_prompt_then_generated_text_then_bigrams(tmp_path):
    table = BigramTable.from_sequences([[7, 8, 7, 8, 7, 9]], 20)
    assert table.next[7] == 8 and table.next[8] == 7 and table.next[3] == -1
    table.save(tmp_path / "b.npz")
    assert np.array_equal(BigramTable.load(tmp_path / "b.npz").next, table.next)
    mag = MaG(20, table)
    prompt = [1, 2, 3, 4, 5, 1, 2]
    toks, q = mag.propose(prompt, 3)
    assert q is None and toks[:3] == [3, 4, 5]  # suffix [1, 2] found in the prompt
    assert mag.kinds == [2, 3, 4]  # its match reaches 2 back; each copied token's one further
    toks, _ = MaG(20, table).propose([7], 3)  # nothing to match: bigrams
    assert toks == [8, 7, 8]
    assert MaG(20, None).propose([7], 3)[0] == []
    (tmp_path / "bad.npz").write_bytes(b"nope")
    with pytest.raises(CascadeError, match="not a bigram table"):
        BigramTable.load(tmp_path / "bad.npz")


def _reference_match(arr: list[int], end: int, k: int, max_ngram: int, min_ngram: int) -> tuple[list[int], int]:
    """MaG's lookup written plainly: the longest suffix (max_ngram..min_ngram) seen before, the latest
    occurrence starting in the prompt (ending before ``end``), else the latest one; and how many
    tokens before the continuation equal the sequence's last ones (at most REACH)."""
    n = len(arr)
    for L in range(min(max_ngram, n - 1), min_ngram - 1, -1):
        starts = [s for s in range(n - L) if arr[s : s + L] == arr[n - L :]]
        if starts:
            in_prompt = [s for s in starts if s + L <= end]
            s = (in_prompt or starts)[-1] + L
            reach = max(r for r in range(min(s, REACH) + 1) if arr[s - r : s] == arr[n - r :])
            return arr[s : s + k], reach
    return [], 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=1, max_size=40), st.integers(0, 40), st.integers(1, 6),
       st.integers(1, 5), st.integers(0, 4))
def test_mag_lookup_matches_its_plain_definition(seq, end, k, max_ngram, extra):
    min_ngram = max(1, max_ngram - extra)
    index = SuffixIndex(max_ngram, end, min_ngram)
    index.extend(seq)
    assert index.match(k) == _reference_match(seq, end, k, max_ngram, min_ngram)
    index.extend([0, 1, 2])  # a draft appended for one lookup, then cut back
    index.truncate(len(seq))
    assert index.match(k) == _reference_match(seq, end, k, max_ngram, min_ngram)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.integers(0, 3), min_size=2, max_size=30), st.lists(st.integers(1, 4), min_size=1, max_size=8),
       st.integers(0, 2**16))
def test_mag_keeps_its_index_across_a_generation(seq, steps, seed):
    """One MaG over a growing sequence (with drafted tokens looked up after the committed ones and
    rolled back, then over other sequences, with and without a reset) proposes what a fresh MaG
    given the whole sequence proposes at every step."""
    rng = np.random.default_rng(seed)
    kept = MaG(4, max_ngram=3, min_ngram=1)
    other = [(seq[0] + 1) % 4] + seq[1:]  # another sequence; the stage's contract: reset between generations
    for prompt, reset in ((seq, True), (list(reversed(seq)), True), (other, False), (seq, False)):
        if reset:
            kept.reset()
        ids = list(prompt)
        for grow in steps:
            for look in (ids + rng.integers(0, 4, grow).tolist(), ids):  # a draft's tokens, then rolled back
                fresh = MaG(4, max_ngram=3, min_ngram=1)
                fresh.prompt_len = kept.prompt_len = len(prompt)
                assert kept.propose(look, 4)[0] == fresh.propose(look, 4)[0]
                assert kept.kinds == fresh.kinds
            ids = ids + rng.integers(0, 4, grow).tolist()
        inplace, same = MaG(4, max_ngram=3, min_ngram=1), list(prompt)  # a decoding loop's list, grown in place
        for grow in steps:
            fresh = MaG(4, max_ngram=3, min_ngram=1)
            fresh.prompt_len = len(prompt)
            assert inplace.propose(same, 4) == fresh.propose(list(same), 4) and inplace.kinds == fresh.kinds
            same.extend(rng.integers(0, 4, grow).tolist())


def test_distill_cli_trains_a_tiny_model(tiny_model_dir, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("the quick brown fox\nhello world\nspeculative decoding\n")
    out = tmp_path / "tiny.safetensors"
    args = [
        "distill",
        "-t",
        tiny_model_dir,
        "--prompts",
        prompts,
        "-n",
        24,
        "--epochs",
        2,
        "--out",
        out,
        "--bigram-out",
        tmp_path / "b.npz",
        "--work-dir",
        tmp_path / "w",
        "--batch-size",
        16,
    ]
    r = invoke(*args)
    assert r.exit_code == 0, r.output
    assert out.is_file() and (tmp_path / "b.npz").is_file() and (tmp_path / "w" / "train.pt").is_file()
    assert "held-out greedy agreement" in r.stdout
    r = invoke(*args, "--resume", "--epochs", 3)
    assert r.exit_code == 0, r.output
    r = invoke("distill", "-t", tiny_model_dir, "--prompts", tmp_path / "none.txt", "--work-dir", tmp_path / "w2")
    one_line_error(r, "not found")


def test_distillation_raises_agreement():
    """Training must move the tiny model toward the teacher (a broken loss would not)."""
    from speculative_cascade import distill as D

    teacher = tiny_native(seed=0)
    rng = np.random.default_rng(0)
    seqs = [rng.integers(2, 300, 40).tolist() for _ in range(30)]
    data = D.soft_labels(teacher, seqs)
    torch.manual_seed(0)
    tiny = TinyProjection(teacher.tok_embeddings.weight)
    before = D.agreement(tiny, data[0], data[1])
    D.train(tiny, data, D.DistillConfig(epochs=30, batch_size=256, lr=1e-2))
    after = D.agreement(tiny, data[0], data[1])
    assert after > before + 0.15, (before, after)  # a context-free model cannot follow every context


def test_seed_apis(tiny_model_dir, tiny_ckpt):
    from speculative_cascade import CascadeInference
    from speculative_cascade.seed.csd import csd, get_mag_model
    from speculative_cascade.seed.inference import DraftModel, TargetModel, TinyModel

    target = TargetModel.from_pretrained(str(tiny_model_dir), progress=False)
    draft = DraftModel.from_pretrained(str(tiny_model_dir), quantize_int8=True, progress=False)
    tiny = TinyModel.from_pretrained(str(tiny_ckpt))
    plain = CascadeInference(target_model=target).generate("the quick brown fox", max_tokens=16)
    for mode in ("chain", "tree"):
        cascade = CascadeInference(
            tiny_model=tiny, draft_model=draft, target_model=target, speculation_horizon=4, mode=mode
        )
        assert cascade.generate("the quick brown fox", max_tokens=16) == plain
        names = [s["name"] for s in cascade.get_stats()["stages"]]
        assert names == ["tiny", "draft", "target"]
    ids = target.tokenizer("the quick brown fox", return_tensors="pt")["input_ids"]
    ref = CascadeInference(target_model=target)._gen.generate_ids(ids[0].tolist(), max_new_tokens=12)
    res = csd(
        [draft.model, get_mag_model(None, target.model.vocab_size)],
        target.model,
        ids,
        ids,
        k_matrix=[[3, 2], [0, 2]],
        max_length=12,
    )
    assert res.shape[0] == 1 and res[0, ids.shape[1] :].tolist() == ref
    with pytest.raises(CascadeError, match="vocabulary mismatch"):
        CascadeInference(draft_model=DraftModel(tiny_native(seed=2, vocab=100)), target_model=target)


def test_bench_cascade_methods(tmp_path, tiny_model_dir, tiny_ckpt):
    prompts = tmp_path / "q.jsonl"
    rows = [{"question_id": i, "category": c, "turns": [t]} for i, (c, t) in enumerate([("a", "the fox"), ("b", "x")])]
    prompts.write_text("\n".join(json.dumps(r) for r in rows))
    cfg = tmp_path / "tree.toml"
    cfg.write_text(f'stages = ["tiny:{tiny_ckpt}", "int8"]\nmode = "tree"\ntree_nodes = 8\ntree_keep = 4\n')
    out = tmp_path / "r.json"
    r = invoke(
        "bench",
        "--prompts",
        prompts,
        "-n",
        12,
        "--methods",
        "ar,mag,chain,csd,spec4,auto",
        "-t",
        tiny_model_dir,
        "--no-chat",
        "--cascade",
        cfg,
        "--json",
        out,
        "--report",
        tmp_path / "rep",
    )
    assert r.exit_code == 0, r.output
    rep = json.loads(out.read_text())
    for m in ("mag", "chain", "csd", "spec4", "custom", "auto"):
        assert rep["methods"][m]["identical_to_ar"] is True, m
    assert [s["name"] for s in rep["methods"]["chain"]["stages"]] == ["mag", "int8", "target"]
    assert rep["config"]["cascades"]["custom"].startswith("tree")
    assert rep["methods"]["auto"]["predicted_decode_tokens_per_s"] > 0
    md = (tmp_path / "rep" / "report.md").read_text()
    assert "## Table 1" in md and "## Throughput breakdown: chain" in md and "| auto |" in md
    for png in ("speedup.png", "acceptance.png", "predicted.png"):
        assert (tmp_path / "rep" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "per stage" in r.stderr
    bad = invoke("bench", "--prompts", prompts, "--methods", "custom", "-t", tiny_model_dir)
    one_line_error(bad, "needs --cascade")
