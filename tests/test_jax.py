"""The JAX target: logits against the native engine, lossless cascades and sampling on it, meshes of
4 simulated CPU devices (tensor and data parallel), two processes on localhost, the compilation cache.

Mesh runs are subprocesses: XLA's host device count is fixed when JAX starts."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

jax = pytest.importorskip("jax", reason="JAX is not installed (pip install '.[jax]')")

from conftest import decode, tiny_native  # noqa: E402
from speculative_cascade.cascade import ChainRound  # noqa: E402
from speculative_cascade.decoding import StopChecker  # noqa: E402
from speculative_cascade.engine import jax_target  # noqa: E402
from speculative_cascade.engine.quant import quantize_int8  # noqa: E402
from speculative_cascade.errors import CascadeError  # noqa: E402
from speculative_cascade.sampling import SamplingParams  # noqa: E402
from speculative_cascade.stages.mag import MaG  # noqa: E402
from speculative_cascade.stages.neural import ModelRunner, ModelStage  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def one_device(native):
    return jax_target.JaxTarget(native, jax_target.make_mesh({"data": 1, "model": 1}))


@pytest.fixture(scope="module")
def tiny():
    native = tiny_native(seed=3)
    return native, one_device(native)


def test_logits_match_the_native_engine(tiny):
    native, jt = tiny
    prompt = [5, 9, 2, 7, 11, 3, 40, 41]
    c_n, c_j = native.new_cache(64), jt.new_cache(64)
    a, b = native(torch.tensor([prompt]), c_n), jt(torch.tensor([prompt]), c_j)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    for feed in ([21], [22, 23, 24], [25, 26, 27, 28, 29]):  # buckets 1, 4, 8
        a, b = native(torch.tensor([feed]), c_n), jt(torch.tensor([feed]), c_j)
        assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    c_n.rollback(4)
    c_j.rollback(4)  # O(1) rollback: the next forward overwrites the stale slots
    a, b = native(torch.tensor([[50, 51]]), c_n), jt(torch.tensor([[50, 51]]), c_j)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    assert jt.compiled_buckets == {1, 2, 4, 8}


def test_tree_forward_and_keep_path_match_the_native_engine(tiny):
    native, jt = tiny
    ids = [5, 9, 2, 7]
    tokens, parents = [21, 22, 30, 23, 31], [-1, 0, -1, 1, 2]
    rn, rj = ModelRunner(native, 64), ModelRunner(jt, 64)
    a, b = rn.forward_tree(ids, tokens, parents), rj.forward_tree(ids, tokens, parents)
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    for r in (rn, rj):
        r.keep_path(ids, [2, 4], tokens)  # the branch 30 -> 31
    a, b = rn.forward(ids + [30, 31], [60]), rj.forward(ids + [30, 31], [60])
    assert torch.allclose(a, b, atol=1e-4, rtol=1e-4)
    fresh = jt(torch.tensor([ids + [30, 31, 60]]), jt.new_cache(64))[0, -2:]
    assert torch.allclose(b, fresh, atol=1e-4, rtol=1e-4), "keep_path left the cache unlike a fresh prefill"


def test_greedy_cascades_on_the_jax_target_equal_its_plain_decoding(tiny):
    native, jt = tiny
    stop = StopChecker(())
    for prompt in ([5, 17, 42, 7], [100, 200, 300, 12, 13, 14, 15]):
        plain, _ = decode(jt, prompt, max_new_tokens=24, stop=stop, max_len=96)
        for drafter, k in (
            (ModelStage(quantize_int8(native), 96), 4),  # a draft on the host, the target on JAX
            (ModelStage(tiny_native(seed=9, layers=1), 96), 3),
            (MaG(native.vocab_size, min_ngram=1), 5),
        ):
            out, stats = decode(jt, prompt, round=ChainRound(drafter, k), max_new_tokens=24, stop=stop, max_len=96)
            assert out == plain, type(drafter).__name__
            assert stats.rounds < 24 or stats.drafted > 0


def test_sampling_on_the_jax_target_is_the_targets_law():
    """Two sampled tokens through speculative sampling on the JAX target: their joint law is the
    target's exact one (chi-square, false failure 1e-6)."""
    from test_speculative import ALPHA, chi2_pvalue, exact_joint

    V = 10
    native = tiny_native(seed=30, vocab=V)
    jt = one_device(native)
    drafter = ModelStage(tiny_native(seed=31, vocab=V, layers=1), 16)
    counts = np.zeros(V * V)
    stage = ModelStage(jt, 16, name="target")
    for s in range(3000):
        out, _ = decode(
            jt, [1, 2, 3], drafter=drafter, k=2, max_new_tokens=2, params=SamplingParams(temperature=1.0, seed=s),
            stop=StopChecker(()), max_len=16, target_stage=stage,
        )
        counts[out[0] * V + out[1]] += 1
    assert chi2_pvalue(counts, exact_joint(native, [1, 2, 3], V)) > ALPHA


def test_mesh_errors_are_clear():
    with pytest.raises(CascadeError, match="unknown axis"):
        jax_target.parse_mesh("pipeline=2")
    with pytest.raises(CascadeError, match="needs a size"):
        jax_target.parse_mesh("model=two")
    with pytest.raises(CascadeError, match="xla_force_host_platform_device_count"):
        jax_target.make_mesh({"data": 1, "model": 64})
    with pytest.raises(CascadeError, match="--process-id"):
        jax_target.initialize("127.0.0.1:1", 2, 5)


# -- meshes and hosts (the embedded model, in subprocesses) ---------------------------------------

MESH_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from speculative_cascade.generator import SpeculativeGenerator
    from speculative_cascade.engine.loader import as_model
    prompts = ["The capital of France is", "Write a haiku about the sea."]
    model, tok = as_model(None, progress=False, precision="fp32")
    out = {}
    ref = SpeculativeGenerator(model, None, tok, max_len=256, progress=False)
    out["torch"] = [ref.generate_ids(p, max_new_tokens=48, chat=True) for p in prompts]
    for mesh in ("model=4", "data=2,model=2", ""):
        g = SpeculativeGenerator(model, None, tok, max_len=256, progress=False, backend="jax", mesh=mesh)
        out[mesh or "one"] = [g.generate_ids(p, max_new_tokens=48, chat=True) for p in prompts]
    g = SpeculativeGenerator(model, "default", tok, max_len=256, progress=False, backend="jax", mesh="model=4")
    out["default model=4"] = [g.generate_ids(p, max_new_tokens=48, chat=True) for p in prompts]
    out["default drafted"] = g.get_stats()["drafted"]
    print(json.dumps(out))
    """
)


def _env(**extra):
    env = dict(os.environ)
    env.update(extra)
    return env


@pytest.mark.slow
def test_sharded_meshes_give_the_native_engines_tokens():
    """model=4, data=2,model=2 and one device (4 simulated CPU devices): the PyTorch engine's fp32
    greedy token ids, with plain decoding and with the default cascade on model=4."""
    r = subprocess.run(
        [sys.executable, "-c", MESH_SCRIPT], capture_output=True, text=True, timeout=900, cwd=ROOT,
        env=_env(XLA_FLAGS="--xla_force_host_platform_device_count=4"),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    for name in ("model=4", "data=2,model=2", "one", "default model=4"):
        assert out[name] == out["torch"], name
    assert out["default drafted"] > 0, "the default cascade never drafted"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_on_localhost():
    """`generate --backend jax --mesh model=2` over two processes, one CPU device each: process 0's
    token ids are the native engine's fp32 ones; both exit 0; process 1 prints nothing."""
    port = _free_port()
    base = [sys.executable, "-m", "speculative_cascade.cli", "generate", "The capital of France is", "-n", "24", "--json"]
    env = _env(XLA_FLAGS="")
    procs = [
        subprocess.Popen(
            base + ["--backend", "jax", "--mesh", "model=2", "-d", "none", "--coordinator", f"127.0.0.1:{port}",
                    "--num-processes", "2", "--process-id", str(i)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env,
        )
        for i in range(2)
    ]
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    assert outs[1][0] == ""
    ref = subprocess.run(base + ["--precision", "fp32", "-d", "none"], capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert json.loads(outs[0][0])["token_ids"] == json.loads(ref.stdout)["token_ids"]


@pytest.mark.slow
def test_second_start_does_not_recompile(tmp_path, tiny_model_dir):
    cmd = [sys.executable, "-m", "speculative_cascade.cli", "generate", "hello world", "-t", str(tiny_model_dir),
           "-n", "12", "--json", "--backend", "jax", "--no-chat", "-d", "none"]  # plain: the same shapes each run
    env = _env(SPECULATIVE_CASCADE_CACHE=str(tmp_path), XLA_FLAGS="")
    runs = []
    for _ in range(2):
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
        assert r.returncode == 0, r.stderr[-2000:]
        runs.append(json.loads(r.stdout)["jax"])
    assert runs[0]["compile_cache_misses"] > 0
    assert runs[1]["compile_cache_misses"] == 0 and runs[1]["compile_cache_hits"] > 0
