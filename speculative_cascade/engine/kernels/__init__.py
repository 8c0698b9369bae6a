"""The C kernels: one shared library per instruction set, built when the package is installed.

``sc_kernels.h`` holds every kernel once (products of few fp32 rows with weights in their
stored format, RMSNorm, attention with RoPE and the cache write, and ``sc_forward``: every
decoder layer of a forward in one call); ``avx512.c``, ``avx2.c``, ``generic.c`` and
``neon.c`` compile it for one instruction set each, with that set's register blocking.
``setup.py`` builds every variant the platform has (x86-64: avx512, avx2, generic;
aarch64: neon, generic), each with its own flags and none with ``-march=native``, so a
wheel built on one machine runs at full speed on another. At load time the best variant
this CPU runs is picked; ``SPECULATIVE_CASCADE_KERNEL=<variant>`` picks one by name and
``SPECULATIVE_CASCADE_KERNEL=torch`` turns them off (pure PyTorch, slower, not
batch-invariant). If none could be built, the first use prints one line with the reason.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import json
import os
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

_HERE = Path(__file__).parent
VARIANTS = {"x86_64": ("avx512vnni", "avx512", "avxvnni", "avx2", "generic"), "aarch64": ("neon", "generic")}
# CFLAGS per variant: what setup.py and the tests' build check both use.
FLAGS = {
    "avx512vnni": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx512vnni", "-mavx2", "-mfma", "-mf16c"],
    "avx512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq", "-mavx2", "-mfma", "-mf16c"],
    "avxvnni": ["-mavxvnni", "-mavx2", "-mfma", "-mf16c"],
    "avx2": ["-mavx2", "-mfma", "-mf16c"],
    "generic": [],
    "neon": [],
}
COMMON_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-fPIC"]
SOURCES = {name: _HERE / f"{name}.c" for name in FLAGS}
STATUS_FILE = "_build_status.json"
HEADERS = ("sc_kernels.h", "sc_qr.h", "scalar_convert.h", "x86_dot_i8.h")
# a variant that is another one with more instructions compiles that one's file
INCLUDES = {"avx512vnni": ("avx512.c",), "avxvnni": ("avx2.c",)}


def source_digest(variant: str) -> str:
    """A digest of what a variant is compiled from (its file, the shared headers, its flags): the
    install records it beside each library it built, so a build can be matched to the sources."""
    h = hashlib.sha256(" ".join(COMMON_FLAGS + FLAGS[variant]).encode())
    for path in (SOURCES[variant], *(_HERE / name for name in INCLUDES.get(variant, ()) + HEADERS)):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


def machine() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def platform_variants() -> tuple[str, ...]:
    return VARIANTS.get(machine(), ("generic",))


class SCMat(ctypes.Structure):
    _fields_ = [
        ("fmt", ctypes.c_int),
        ("group", ctypes.c_int),
        ("n", ctypes.c_int),
        ("k", ctypes.c_int),
        ("sm_f16", ctypes.c_int),
        ("has_min", ctypes.c_int),
        ("w", ctypes.c_void_p),
        ("sm", ctypes.c_void_p),
        ("bias", ctypes.c_void_p),
        ("next", ctypes.c_void_p),
    ]


class SCDims(ctypes.Structure):
    _fields_ = [(n, ctypes.c_int) for n in ("dim", "n_heads", "n_kv_heads", "head_dim", "hidden")] + [
        ("eps", ctypes.c_float)
    ]


class SCLayer(ctypes.Structure):
    _fields_ = [("attn_norm", ctypes.c_void_p), ("ffn_norm", ctypes.c_void_p)] + [
        (n, SCMat) for n in ("qkv", "o", "gate_up", "down")
    ]


def library_path(variant: str) -> Path | None:
    found = sorted(_HERE.glob(f"_sc_{variant}*.so")) + sorted(_HERE.glob(f"_sc_{variant}*.pyd"))
    return found[0] if found else None


def build_status() -> dict:
    try:
        return json.loads((_HERE / STATUS_FILE).read_text())
    except (OSError, ValueError):
        return {}


@dataclass
class Kernels:
    variant: str
    lib: ctypes.CDLL
    vector_width: int
    rows_per_pass: int
    build: str = ""  # the library's size and modification time: a rebuilt library is another build

    @classmethod
    def open(cls, variant: str, path: Path) -> "Kernels":
        lib = ctypes.CDLL(str(path))
        lib.sc_variant.restype = ctypes.c_char_p
        lib.sc_matmul.argtypes = [ctypes.POINTER(SCMat), ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p]
        lib.sc_matmul.restype = None
        lib.sc_rmsnorm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2 + [ctypes.c_float]
        lib.sc_rmsnorm.restype = None
        lib.sc_forward.argtypes = [
            ctypes.POINTER(SCLayer),
            ctypes.c_int,
            ctypes.POINTER(SCDims),
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_void_p,
            ctypes.c_longlong,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.POINTER(SCMat),
            ctypes.c_void_p,
            ctypes.c_int,
        ]
        lib.sc_forward.restype = ctypes.c_int
        P = ctypes.c_void_p
        lib.sc_forward_batch.argtypes = [
            ctypes.POINTER(SCLayer), ctypes.c_int, ctypes.POINTER(SCDims), P, ctypes.c_int, P,  # ..., x, n_seq, Ts
            P, P, P, P, ctypes.c_longlong, P, P,  # rot, masks, kcs, vcs, layer_stride, starts, S_maxs
            P, ctypes.POINTER(SCMat), P, P,  # norm_w, head, logits, n_outs
        ]
        lib.sc_forward_batch.restype = ctypes.c_int
        lib.sc_stream_sum.argtypes = [ctypes.c_void_p, ctypes.c_longlong]
        lib.sc_stream_sum.restype = ctypes.c_float
        lib.sc_release_threads.argtypes = []
        lib.sc_release_threads.restype = None
        lib.sc_qr_bytes.argtypes = [ctypes.c_int] * 3
        lib.sc_qr_bytes.restype = ctypes.c_longlong
        lib.sc_qr_repack.argtypes = [ctypes.c_int, P, P, ctypes.c_int, ctypes.c_int, P]
        lib.sc_qr_repack.restype = ctypes.c_int
        lib.sc_qr_dequant.argtypes = [ctypes.c_int, P, ctypes.c_int, ctypes.c_int, ctypes.c_int, P]
        lib.sc_qr_dequant.restype = None
        lib.sc_qr_native.restype = ctypes.c_int
        lib.sc_gguf_dequant.argtypes = [ctypes.c_int, P, ctypes.c_int, ctypes.c_int, P]
        lib.sc_gguf_dequant.restype = None
        st = path.stat()
        return cls(variant, lib, lib.sc_vector_width(), lib.sc_rows_per_pass(), f"{st.st_size:x}-{int(st.st_mtime):x}")

    def stream_bandwidth(self, megabytes: int = 512, repeats: int = 5) -> float:
        """This machine's streaming read bandwidth in bytes/s (best of ``repeats`` reads of a buffer
        much larger than the caches, in the 2 MiB pages the weights are in), with the threads the
        kernels use."""
        import torch  # the kernels load without torch (setup.py); this probe runs with it

        from .. import pages  # (imports torch)

        buf = pages.block(megabytes * 2**20).view(torch.float32)
        buf.fill_(1.0)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            self.lib.sc_stream_sum(buf.data_ptr(), buf.numel())
            best = min(best, time.perf_counter() - t0)
        return buf.numel() * 4 / best


def cpu_variants() -> list[str]:
    """The variants this CPU can run, best first (whether or not they were built)."""
    if machine() == "aarch64":
        return ["neon", "generic"]
    if machine() != "x86_64":
        return ["generic"]
    probe = library_path("generic")
    level = 0
    if probe is not None:
        level = ctypes.CDLL(str(probe)).sc_cpu_level()
    bits = {"avx512vnni": 4, "avx512": 2, "avxvnni": 8, "avx2": 1}
    return [v for v in VARIANTS["x86_64"] if v == "generic" or level & bits[v]]


def built_variants() -> list[str]:
    return [v for v in platform_variants() if library_path(v) is not None]


_cache: dict[str, Kernels | None] = {}
_enabled = True
_reason: str | None = None  # why no kernels are in use


def _choose() -> Kernels | None:
    global _reason
    want = os.environ.get("SPECULATIVE_CASCADE_KERNEL", "auto").strip().lower() or "auto"
    if want == "torch":
        _reason = "SPECULATIVE_CASCADE_KERNEL=torch"
        return None
    runnable = cpu_variants()
    if want != "auto":
        if want not in FLAGS:
            raise ValueError(f"SPECULATIVE_CASCADE_KERNEL={want!r}: expected auto, torch or one of {', '.join(FLAGS)}")
        if want not in runnable:
            raise ValueError(f"SPECULATIVE_CASCADE_KERNEL={want}: this CPU runs {', '.join(runnable) or 'none'}")
        runnable = [want]
    for v in runnable:
        path = library_path(v)
        if path is not None:
            try:
                return Kernels.open(v, path)
            except OSError as e:
                _reason = f"cannot load {path.name}: {e}"
    errors = build_status().get("errors", {})
    first = next((f"{v}: {errors[v]}" for v in runnable if v in errors), None)
    _reason = _reason or (
        f"not built at install ({first})" if first else "not built (reinstall with a C compiler: pip install -e .)"
    )
    return None


def get(variant: str | None = None) -> Kernels | None:
    """The kernels in use (or a named built variant, for tests); None when disabled or unavailable."""
    if variant is not None:
        if variant not in _cache:
            path = library_path(variant)
            _cache[variant] = None if path is None else Kernels.open(variant, path)
        return _cache[variant]
    if not _enabled:
        return None
    if "auto" not in _cache:
        _cache["auto"] = _choose()
        if _cache["auto"] is None:
            print(f"note: C kernels unavailable ({_reason}); using PyTorch (slower)", file=sys.stderr)
    return _cache["auto"]


def release_threads() -> None:
    """Hand the calling thread's OpenMP workers back (``sc_release_threads``): for a thread that has run
    kernels (or PyTorch's parallel operations, on the same runtime) and leaves the forwards to another
    one, such as a server's scheduler. Its next kernel call makes them again."""
    k = get()
    if k is not None:
        k.lib.sc_release_threads()


def status() -> dict:
    """What ``cascade info`` shows: variant in use, built, runnable, and why none if none."""
    k = get()
    return {
        "kernel": k.variant if k is not None else "torch",
        "built": built_variants(),
        "cpu_runs": cpu_variants(),
        "reason": None if k is not None else _reason,
    }


@contextlib.contextmanager
def disabled():
    """Run the pure-PyTorch paths inside this block (tests compare both)."""
    global _enabled
    old, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = old


@contextlib.contextmanager
def use(variant: str):
    """Run with a named built variant inside this block (tests run every variant)."""
    k = get(variant)
    if k is None:
        raise RuntimeError(f"kernel variant {variant} is not built")
    old = _cache.get("auto", "unset")
    _cache["auto"] = k
    try:
        yield k
    finally:
        if old == "unset":
            _cache.pop("auto", None)
        else:
            _cache["auto"] = old


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model", "Hardware")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or machine()


__all__ = ["Kernels", "SCMat", "SCDims", "SCLayer", "get", "status", "disabled", "use", "cpu_name", "release_threads", "FLAGS"]
