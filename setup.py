"""Builds the C kernels (speculative_cascade/engine/kernels/*.c) at install time.

Each instruction-set variant is its own shared library, compiled with its own flags (never
-march=native) and loaded with ctypes at run time by the CPU's features, so one build runs
at full speed on any CPU of its architecture. A variant the compiler cannot build is
skipped and recorded in _build_status.json (the package then names the reason when it falls
back); when none builds the install stops with the compiler's first error, unless
SPECULATIVE_CASCADE_KERNEL=torch asks for the pure-PyTorch engine.
"""

import importlib.util
import json
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

HERE = Path(__file__).parent
KDIR = Path("speculative_cascade/engine/kernels")
_spec = importlib.util.spec_from_file_location("_sc_kernels_meta", HERE / KDIR / "__init__.py")
meta = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = meta  # dataclasses look their module up
_spec.loader.exec_module(meta)


def _first_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower():
            return ln[:300]
    return lines[0][:300] if lines else "unknown error"


class BuildKernels(build_ext):
    """Build every variant that compiles; record failures; fail only when none builds."""

    def finalize_options(self):
        super().finalize_options()
        if not self.parallel:  # the variants compile independently: one per core at a time
            self.parallel = os.cpu_count() or 1

    def run(self):
        self.errors = {}
        super().run()
        built = [e.name.rsplit("_sc_", 1)[1] for e in self.extensions if e.name.rsplit("_sc_", 1)[1] not in self.errors]
        status = {"built": built, "errors": self.errors, "sources": {v: meta.source_digest(v) for v in built}}
        out = Path(self.get_ext_fullpath(self.extensions[0].name)).parent
        out.mkdir(parents=True, exist_ok=True)
        (out / meta.STATUS_FILE).write_text(json.dumps(status, indent=1))
        for name, err in self.errors.items():
            print(f"speculative_cascade: the {name} kernels were not built: {err}", file=sys.stderr)
        if not built and os.environ.get("SPECULATIVE_CASCADE_KERNEL") != "torch":
            raise SystemExit(
                "speculative_cascade: no C kernel variant could be built "
                f"({next(iter(self.errors.values()), 'no compiler')}). Install a C compiler with OpenMP "
                "(e.g. apt-get install gcc), or install with SPECULATIVE_CASCADE_KERNEL=torch for the slower "
                "pure-PyTorch engine."
            )

    def build_extension(self, ext):
        variant = ext.name.rsplit("_sc_", 1)[1]
        try:
            super().build_extension(ext)
        except Exception as e:  # compiler missing or failing: keep the other variants
            try:  # once more without OpenMP (a compiler without it still gives single-threaded kernels)
                ext.extra_compile_args = [a for a in ext.extra_compile_args if a != "-fopenmp"]
                ext.extra_link_args = []
                super().build_extension(ext)
                print(f"speculative_cascade: the {variant} kernels were built without OpenMP", file=sys.stderr)
            except Exception:
                self.errors[variant] = _first_error(str(e) or type(e).__name__)

    def get_export_symbols(self, ext):  # plain shared libraries loaded with ctypes, not Python modules
        return []


def extensions():
    if os.environ.get("SPECULATIVE_CASCADE_KERNEL") == "torch":
        return []
    out = []
    for v in meta.platform_variants():
        out.append(
            Extension(
                f"speculative_cascade.engine.kernels._sc_{v}",
                sources=[str(KDIR / f"{v}.c")],
                depends=[str(KDIR / name) for name in meta.HEADERS],
                extra_compile_args=meta.COMMON_FLAGS + meta.FLAGS[v],
                extra_link_args=["-fopenmp"],
                libraries=["m"],
            )
        )
    return out


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildKernels})
