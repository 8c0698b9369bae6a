"""The C kernels, on every variant: built, correct against PyTorch, batch-invariant bit for bit.

Every variant this platform has is compiled here as setup.py compiles it (a kernel that does
not build fails a test); every variant this CPU can run is compared with the PyTorch
reference, with the other formats, and with itself across row counts."""

import ctypes
import os
import shutil
import subprocess

import numpy as np
import pytest
import torch

from conftest import hf_model, native_from_hf
from speculative_cascade.engine import kernels
from speculative_cascade.engine.formats import Format, PackedWeight, concat, from_gguf, q8_activations
from speculative_cascade.engine.transformer import sc_mat

RUNNABLE = [v for v in kernels.cpu_variants() if v in kernels.platform_variants()]


def _compile_cmd(variant: str, cc: str, out, extra=()) -> list[str]:
    """setup.py's compile of one variant, as one command."""
    src = kernels.SOURCES[variant]
    return [cc, *kernels.COMMON_FLAGS, *kernels.FLAGS[variant], *extra, "-shared", str(src), "-o", str(out), "-lm"]


def _compile(variant: str, cc: str, out, extra=()) -> subprocess.CompletedProcess:
    return subprocess.run(_compile_cmd(variant, cc, out, extra), capture_output=True, text=True)


@pytest.mark.parametrize("variant", kernels.platform_variants())
def test_variant_builds_and_is_installed(variant, tmp_path):
    """Every variant compiles with the flags setup.py uses (the AVX2 and baseline variants on an
    AVX-512 machine too) and the install built it. A library the install built from these very
    sources (the digest it recorded) is that proof; otherwise the variant is compiled here."""
    status = kernels.build_status()
    assert variant not in status.get("errors", {}), status["errors"][variant]
    assert kernels.library_path(variant) is not None, f"the install did not build {variant}"
    if status.get("sources", {}).get(variant) == kernels.source_digest(variant):
        return
    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    assert cc, "no C compiler"
    r = _compile(variant, cc, tmp_path / f"{variant}.so")
    assert r.returncode == 0, r.stderr


@pytest.fixture(scope="module")
def cross_builds(tmp_path_factory):
    """The aarch64 variants, compiled side by side (one per core) by the cross compiler."""
    cc = shutil.which("aarch64-linux-gnu-gcc")
    if kernels.machine() == "aarch64":
        pytest.skip("native aarch64: covered by test_variant_builds_and_is_installed")
    if cc is None:
        pytest.skip("no aarch64 cross compiler (apt-get install gcc-aarch64-linux-gnu)")
    out = tmp_path_factory.mktemp("aarch64")
    procs = {
        v: subprocess.Popen(_compile_cmd(v, cc, out / f"{v}.so"), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for v in ("neon", "generic")
    }
    done = {v: p.communicate()[1] for v, p in procs.items()}  # each one's stderr, as it ends
    return {v: (procs[v].returncode, err) for v, err in done.items()}


@pytest.mark.parametrize("variant", ["neon", "generic"])
def test_aarch64_variants_cross_compile(variant, cross_builds):
    returncode, stderr = cross_builds[variant]
    assert returncode == 0, stderr


def test_kernels_are_in_use():
    """The suite runs on kernels, never silently on the PyTorch fallback."""
    if os.environ.get("SPECULATIVE_CASCADE_KERNEL") == "torch":
        pytest.skip("SPECULATIVE_CASCADE_KERNEL=torch")
    k = kernels.get()
    assert k is not None, kernels.status()["reason"]
    assert k.variant == RUNNABLE[0]  # the best variant this CPU runs


@pytest.mark.skipif(not os.path.isdir("/proc/self/task") or (os.cpu_count() or 1) < 2, reason="counts threads in /proc")
def test_release_threads_hands_the_openmp_workers_back():
    """A thread that ran a parallel kernel holds OpenMP workers (threads of the process) until it hands
    them back; a server's engine does so for the thread that loaded the model (see sc_release_threads)."""
    import threading
    import time

    k = kernels.get()
    if k is None:
        pytest.skip("no C kernels")
    buf = torch.ones(1 << 20)

    def tasks() -> int:
        return len(os.listdir("/proc/self/task"))

    seen = {}

    def work():
        k.lib.sc_stream_sum(buf.data_ptr(), buf.numel())  # a parallel region: this thread's pool
        seen["held"] = tasks()
        kernels.release_threads()
        end = time.monotonic() + 5
        while tasks() >= seen["held"] and time.monotonic() < end:
            time.sleep(0.01)
        seen["after"] = tasks()
        k.lib.sc_stream_sum(buf.data_ptr(), buf.numel())  # and the kernels still run: a new pool
        seen["again"] = tasks()

    t = threading.Thread(target=work)
    t.start()
    t.join()
    assert seen["after"] < seen["held"] <= seen["again"], seen


# -- products ----------------------------------------------------------------------------------


def _weights(N: int, K: int, seed: int = 0) -> dict[str, PackedWeight]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(N, K, generator=g)
    q8 = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    q4 = torch.randint(0, 256, (N, K // 2), generator=g, dtype=torch.uint8)
    return {
        "f32": PackedWeight.dense(w),
        "f16": PackedWeight.dense(w.half()),
        "bf16": PackedWeight.dense(w.bfloat16()),
        "i8-row": PackedWeight.int8(q8, torch.rand(N, 1, generator=g) / 50),
        "i8-16": PackedWeight.int8(q8, torch.rand(N, K // 16, generator=g) / 50, torch.randn(N, K // 16, generator=g)),
        "i8-32": PackedWeight.int8(q8, torch.rand(N, K // 32, generator=g) / 50),
        "q4": PackedWeight.q4(q4, torch.stack([torch.rand(N, K // 32, generator=g) / 5,
                                                torch.randn(N, K // 32, generator=g)], -1)),
        # scales exact in fp16 are kept as fp16, as a GGUF file stores them
        "q4-f16": PackedWeight.q4(q4, torch.stack([torch.rand(N, K // 32, generator=g) / 5,
                                                    torch.randn(N, K // 32, generator=g)], -1).half().float()),
    }


def _matmul(k, w: PackedWeight, x: torch.Tensor, bias=None) -> torch.Tensor:
    x = x.contiguous()
    y = torch.empty(x.shape[0], w.shape[0])
    mat = sc_mat(w, bias)
    k.lib.sc_matmul(ctypes.byref(mat), x.data_ptr(), x.shape[0], y.data_ptr())
    return y


def _assert_rows_as_one_row(k, w: PackedWeight, x: torch.Tensor, bias, one: torch.Tensor, what: str) -> None:
    """Every pass shape over the 13 rows of x: each row bit-identical to its one-row product ``one``."""
    for M in (2, 3, 4, 5, 6, 7, 9, 13):
        for start in (0, 13 - M):
            got = _matmul(k, w, x[start : start + M], bias)
            assert torch.equal(got, one[start : start + M]), f"{what}: M={M} differs from one row"


@pytest.mark.parametrize("variant", RUNNABLE)
@pytest.mark.parametrize("fmt", ["f32", "f16", "bf16", "i8-row", "i8-16", "i8-32", "q4", "q4-f16", "q4-odd"])
def test_matmul_matches_reference_and_is_batch_invariant(variant, fmt):
    k = kernels.get(variant)
    # N not a multiple of any block size; 4-bit rows come in blocks of 8 (else they are stored as int8)
    N, K = (37 if fmt.endswith("-odd") or not fmt.startswith("q4") else 40), 96
    w = _weights(N, K)[fmt.removesuffix("-odd")]
    assert (w.fmt == Format.Q4) == (fmt in ("q4", "q4-f16"))
    assert w.sm is None or (w.sm.dtype == torch.float16) == fmt.endswith("f16")
    bias = torch.randn(N)
    x = torch.randn(13, K)
    ref = x.double() @ w.dequantize().double().T + bias.double()
    one = torch.cat([_matmul(k, w, x[i : i + 1], bias) for i in range(13)])
    torch.testing.assert_close(one.double(), ref, rtol=1e-5, atol=1e-4)
    _assert_rows_as_one_row(k, w, x, bias, one, f"{variant} {fmt}")
    dense = _matmul(k, PackedWeight.dense(w.dequantize()), x, bias)
    if w.fmt == Format.I8:  # int8 takes each group's scale out of its sum: close to the dequantized product
        torch.testing.assert_close(_matmul(k, w, x, bias), dense, rtol=1e-5, atol=1e-4)
    else:  # 4-bit weights are dequantized in registers: exactly what the fp32 kernel gives on the dequantization
        assert torch.equal(_matmul(k, w, x, bias), dense)


@pytest.mark.parametrize("variant", RUNNABLE)
def test_i8q8_matches_its_reference_and_is_batch_invariant(variant):
    """I8Q8 (drafts only): the activations rounded per block of 32 as q8_activations rounds them,
    then integer products. Extremes included (weights and codes of +-127: a saturating pair sum
    would show), an all-zero block, blocks of very different scales."""
    k = kernels.get(variant)
    g = torch.Generator().manual_seed(3)
    N, K = 37, 192
    q = torch.randint(-127, 128, (N, K), generator=g, dtype=torch.int8)
    q[0], q[1] = 127, -127
    w = PackedWeight.int8(q, torch.rand(N, 1, generator=g) / 50).with_q8_activations()
    assert w.fmt == Format.I8Q8
    bias = torch.randn(N, generator=g)
    x = torch.randn(13, K, generator=g) * torch.linspace(0.01, 10, K)
    x[0], x[1] = 3.0, -3.0  # every code +-127
    x[2, :32] = 0.0
    ref = q8_activations(x).double() @ w.dequantize().double().T + bias.double()
    one = torch.cat([_matmul(k, w, x[i : i + 1], bias) for i in range(13)])
    torch.testing.assert_close(one.double(), ref, rtol=1e-5, atol=1e-3)
    exact = x.double() @ w.dequantize().double().T + bias.double()
    assert (one.double() - exact).abs().max() > 1e-2  # the activations were rounded: not the exact product
    _assert_rows_as_one_row(k, w, x, bias, one, f"{variant} i8q8")


def test_i8q8_only_for_rows_with_one_scale():
    ws = _weights(40, 128)
    assert ws["i8-row"].with_q8_activations().fmt == Format.I8Q8
    for name in ("i8-16", "i8-32", "q4", "f32"):
        with pytest.raises(ValueError):
            ws[name].with_q8_activations()
    with pytest.raises(ValueError):  # K not a multiple of 64
        _weights(40, 96)["i8-row"].with_q8_activations()


def test_concat_of_mixed_formats_is_exact():
    ws = _weights(16, 64)
    mixed = concat([ws["q4"], ws["i8-16"], ws["i8-32"]])
    assert mixed.fmt == Format.I8 and mixed.group == 16
    ref = torch.cat([ws["q4"].dequantize(), ws["i8-16"].dequantize(), ws["i8-32"].dequantize()])
    assert torch.equal(mixed.dequantize(), ref)
    assert concat([ws["f16"], ws["q4"]]).fmt == Format.F32


# -- GGUF blocks ---------------------------------------------------------------------------------


def _random_blocks(qtype, n_blocks: int, rng) -> np.ndarray:
    """Random but valid blocks: finite fp16 scales, random codes."""
    from gguf import GGML_QUANT_SIZES
    from gguf import GGMLQuantizationType as Q

    _, size = GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, (n_blocks, size), dtype=np.uint8)
    f16 = lambda n: rng.uniform(0.001, 0.05, (n_blocks, n)).astype(np.float16).view(np.uint8)  # noqa: E731
    if qtype == Q.Q4_K:
        raw[:, 0:4] = f16(2)
    elif qtype == Q.Q6_K:
        raw[:, 208:210] = f16(1)
    return raw


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q4_K", "Q6_K"])
def test_gguf_repacking_is_exact(qtype):
    """Every supported GGUF type dequantizes to exactly what the gguf package reads."""
    from gguf import GGMLQuantizationType as Q
    from gguf import dequantize, quantize

    t = Q[qtype]
    N, K = 8, 512
    rng = np.random.default_rng(0)
    if t in (Q.Q4_K, Q.Q6_K):
        data = _random_blocks(t, N * K // 256, rng).reshape(N, -1)
    else:
        data = quantize(rng.standard_normal((N, K)).astype(np.float32), t)
    w = from_gguf(data, t, (N, K))
    ref = dequantize(data, t).reshape(N, K)
    assert np.array_equal(w.dequantize().numpy(), ref.astype(np.float32))
    expect = {"F32": Format.F32, "F16": Format.F16, "BF16": Format.BF16, "Q8_0": Format.I8, "Q6_K": Format.I8,
              "Q5_0": Format.F32}.get(qtype, Format.Q4)
    assert w.fmt == expect


# -- the decoder ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny():
    return native_from_hf(hf_model("llama", seed=7))


@pytest.mark.parametrize("variant", RUNNABLE)
def test_forward_is_batch_invariant(variant, tiny):
    """Prefill, chain verification, tree verification and batched rows: each token's logits
    bit-identical to a one-token forward at its position."""
    prompt = torch.tensor([[5, 9, 2, 7, 11, 3]])
    seq = [21, 22, 23, 24, 25, 26, 27, 28, 29]
    with kernels.use(variant):
        c = tiny.new_cache(64)
        pre = tiny(prompt, c)
        steps = torch.cat([tiny(torch.tensor([[t]]), c) for t in seq], 1)
        c1 = tiny.new_cache(64)
        one_by_one = torch.cat([tiny(prompt[:, i : i + 1], c1) for i in range(prompt.shape[1])], 1)
        assert torch.equal(pre, one_by_one), "a prefill differs from one-token forwards"
        for n in (2, 3, 5, 9):
            c2 = tiny.new_cache(64)
            tiny(prompt, c2)
            block = tiny(torch.tensor([seq[:n]]), c2)
            assert torch.equal(block, steps[:, :n]), f"an {n}-token forward differs from one-token forwards"
        # a tree: branch a = seq[0:3], branch b = [40, 41] under seq[0]
        tokens = torch.tensor([[seq[0], seq[1], seq[2], 40, 41]])
        positions = torch.tensor([[6, 7, 8, 7, 8]])
        m = torch.zeros(1, 5, 5, dtype=torch.bool)
        for i, anc in enumerate([[0], [0, 1], [0, 1, 2], [0, 3], [0, 3, 4]]):
            m[0, i, anc] = True
        c3 = tiny.new_cache(64)
        tiny(prompt, c3)
        tree = tiny(tokens, c3, positions=positions, tree_mask=m)
        assert torch.equal(tree[:, :3], steps[:, :3])
        c4 = tiny.new_cache(64)
        tiny(prompt, c4)
        branch_b = tiny(torch.tensor([[seq[0], 40, 41]]), c4)
        assert torch.equal(tree[:, 3:], branch_b[:, 1:])
        # two rows at different cursors in one forward
        cb = tiny.new_cache(64, batch_size=2)
        tiny(torch.cat([prompt, prompt]), cb)
        cb.rollback(2, row=1)
        both = tiny(torch.tensor([[seq[0], seq[1]], [30, 31]]), cb)
        assert torch.equal(both[:1], steps[:, :2])
        c5 = tiny.new_cache(64)
        tiny(prompt[:, :4], c5)
        assert torch.equal(both[1:], tiny(torch.tensor([[30, 31]]), c5))


@pytest.mark.parametrize("variant", RUNNABLE)
def test_forward_batch_of_sequences_is_bit_identical_to_each_alone(variant, tiny):
    """Continuous batching: sequences at different cursors (a prefill, one-token steps, a chain
    verification, a context past one attention chunk) in one forward give each token the logits of
    its sequence run alone; the caches end up the same too."""
    import random

    rng = random.Random(0)
    prompts = [[rng.randrange(2, 300) for _ in range(n)] for n in (3, 7, 70, 1, 12)]
    feeds = [[rng.randrange(2, 300) for _ in range(n)] for n in (1, 4, 1, 9, 2)]
    with kernels.use(variant):
        alone, caches_a = [], []
        for p, f in zip(prompts, feeds):
            c = tiny.new_cache(128)
            tiny(torch.tensor([p]), c)
            alone.append(tiny(torch.tensor([f]), c)[0])
            caches_a.append(c)
        caches_b = []
        for p in prompts:
            c = tiny.new_cache(128)
            tiny(torch.tensor([p]), c)
            caches_b.append(c)
        together = tiny.forward_batch([(torch.tensor(f), c) for f, c in zip(feeds, caches_b)])
        for i, (a, b) in enumerate(zip(alone, together)):
            assert torch.equal(a, b), f"sequence {i}: batched logits differ from its forward alone"
        for a, b in zip(caches_a, caches_b):
            n = a.seqlens[0]
            assert b.seqlens[0] == n and torch.equal(a.k[:, :, :, :n], b.k[:, :, :, :n])
        last = tiny.forward_batch([(torch.tensor(f), c) for f, c in zip(feeds, caches_b)], last_only=True)
        assert [x.shape[0] for x in last] == [1] * len(feeds)
        # the batched prefill (last_only) equals the last rows of each prefill alone
        fresh = [tiny.new_cache(128) for _ in prompts]
        pre = tiny.forward_batch([(torch.tensor(p), c) for p, c in zip(prompts, fresh)], last_only=True)
        for p, x in zip(prompts, pre):
            assert torch.equal(x[0], tiny(torch.tensor([p]), tiny.new_cache(128))[0, -1])


@pytest.mark.parametrize("variant", RUNNABLE)
def test_forward_matches_pytorch(variant, tiny):
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with kernels.use(variant):
        got = tiny(ids, tiny.new_cache(16))
    with kernels.disabled():
        ref = tiny(ids, tiny.new_cache(16))
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-4)


def test_long_context_attention_does_not_overflow_the_stack():
    """Llama-3.2-1B's attention shape (32 heads, 8 KV heads, head size 64): 9 new tokens at a
    context of 8000 and 32 at 4000 (the stack allocation per job that used to crash)."""
    from speculative_cascade.engine.transformer import ModelArgs, Transformer

    args = ModelArgs(vocab_size=64, dim=2048, n_layers=1, n_heads=32, n_kv_heads=8, head_dim=64,
                     intermediate_size=64, max_position_embeddings=8192)
    model = Transformer(args).eval()
    cache = model.new_cache(8200)
    for start, T in ((8000, 9), (4000, 32)):
        cache.seqlens = [start]
        out = model(torch.arange(T)[None] % 64, cache)
        assert torch.isfinite(out).all() and out.shape == (1, T, 64)
