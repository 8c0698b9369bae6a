"""C kernels for decoding on CPUs, built on first use.

``gemv.c`` holds fp32 and INT8 (weight-only) products for few input rows, RMSNorm, the
SiLU gate, causal attention with RoPE and the cache write, and a whole decoder layer
(``sc_layer``) composed of them. PyTorch's fp32 GEMV (MKL) streams weights at ~9 GB/s on
the AMD CPUs this project is tuned on; these products read each block of weight rows
once for all input rows and prefetch ahead (~22-25 GB/s), and one call per layer removes
PyTorch's per-op overhead. The file is compiled with the system C compiler into the cache
directory the first time it is needed (about two seconds), keyed by source, compiler,
CPU and torch version. Without a compiler, or with ``SPECULATIVE_CASCADE_KERNEL=torch``,
the model uses its pure-PyTorch paths instead.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import torch

_SRC = Path(__file__).with_name("gemv.c")
_lib = None
_tried = False
_enabled = True


def _build() -> ctypes.CDLL | None:
    from ..loader import cache_dir

    cc = os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        return None
    src = _SRC.read_bytes()
    # -march=native: the binary is only valid on this kind of CPU, so the CPU is in the key
    cpu = platform.processor() + platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu += "".join(sorted({line for line in f if line.startswith(("model name", "flags"))}))
    except OSError:
        pass
    tag = hashlib.sha256(src + cc.encode() + torch.__version__.encode() + cpu.encode()).hexdigest()[:12]
    out = cache_dir() / "kernels" / f"gemv-{tag}.so"
    if not out.is_file():
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_suffix(f".tmp{os.getpid()}.so")
        cmd = [cc, "-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", str(_SRC), "-o", str(tmp), "-lm"]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"note: C kernels not built ({r.stderr.strip().splitlines()[-1:]}); using PyTorch", file=sys.stderr)
            return None
        os.replace(tmp, out)
    lib = ctypes.CDLL(str(out))
    lib.sc_linear_f32.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_int] * 3
    lib.sc_linear_f32.restype = None
    lib.sc_linear_i8.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 3
    lib.sc_linear_i8.restype = None
    lib.sc_linear_q4.argtypes = [ctypes.c_void_p] * 5 + [ctypes.c_int] * 3
    lib.sc_linear_q4.restype = ctypes.c_int
    lib.sc_rmsnorm.argtypes = [ctypes.c_void_p] * 3 + [ctypes.c_int] * 2 + [ctypes.c_float]
    lib.sc_rmsnorm.restype = None
    lib.sc_silu_mul.argtypes = [ctypes.c_void_p] * 2 + [ctypes.c_int] * 2
    lib.sc_silu_mul.restype = None
    lib.sc_layer.argtypes = (
        [ctypes.c_int] + [ctypes.c_void_p] * 4 + [ctypes.c_float] + [ctypes.c_void_p] * 15 + [ctypes.c_int] * 8
    )
    lib.sc_layer.restype = ctypes.c_int
    return lib


@contextlib.contextmanager
def disabled():
    """Run the pure-PyTorch paths inside this block (tests compare both)."""
    global _enabled
    old, _enabled = _enabled, False
    try:
        yield
    finally:
        _enabled = old


def _load():
    global _lib, _tried
    if not _enabled:
        return None
    if not _tried:
        _tried = True
        if os.environ.get("SPECULATIVE_CASCADE_KERNEL", "auto") != "torch":
            try:
                _lib = _build()
            except OSError:
                _lib = None
    return _lib


def linear_kernel():
    """``sc_linear_f32(x, w, b, y, M, N, K)``, or None when unavailable or disabled."""
    lib = _load()
    return None if lib is None else lib.sc_linear_f32


def linear_int8_kernel():
    """``sc_linear_i8(x, w8, scales, b, y, M, N, K)``, or None when unavailable or disabled."""
    lib = _load()
    return None if lib is None else lib.sc_linear_i8


def linear_q4_kernel():
    """``sc_linear_q4(x, w4, scale_min, b, y, M, N, K) -> status``, or None when unavailable or disabled."""
    lib = _load()
    return None if lib is None else lib.sc_linear_q4


def elementwise_kernels():
    """``(sc_rmsnorm, sc_silu_mul)``, or None when unavailable or disabled."""
    lib = _load()
    return None if lib is None else (lib.sc_rmsnorm, lib.sc_silu_mul)


def layer_kernel():
    """``sc_layer(...)``: a whole decoder layer for a few tokens of one row, or None."""
    lib = _load()
    return None if lib is None else lib.sc_layer
