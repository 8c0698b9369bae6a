"""The architecture holds: the layers of docs/architecture.md, typed seams the type checker accepts,
one place for each rule. Each check fails the day someone breaks it."""

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "speculative_cascade"
# the cascade's core: its seams are typed and checked
TYPED = ["cascade.py", "adaptive.py", "stages", "decoding.py", "verify.py", "sampling.py", "builder.py", "serve/batching.py"]


def test_layers_and_no_import_cycles():
    """import-linter's layers contract (pyproject.toml): no module imports a layer above its own,
    which also rules out import cycles between layers."""
    exe = shutil.which("lint-imports")
    assert exe is not None, "import-linter is a test dependency: pip install -e '.[test]'"
    r = subprocess.run([exe], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "1 kept, 0 broken" in r.stdout


def test_no_import_cycle_between_modules():
    """Finer than the layers: no two project modules import each other, directly or not, at any level
    (function-level imports included)."""
    import grimp  # import-linter's graph library
    graph = grimp.build_graph("speculative_cascade")
    modules = sorted(m for m in graph.modules if m.startswith("speculative_cascade."))
    for m in modules:
        for dep in graph.find_modules_directly_imported_by(m):
            if dep.startswith(m + ".") or m.startswith(dep + "."):
                continue  # a package and its own submodules
            assert not graph.chain_exists(importer=dep, imported=m), f"import cycle: {m} <-> {dep}"


def test_typed_seams_pass_the_type_checker():
    r = subprocess.run(
        [sys.executable, "-m", "mypy", "--follow-imports=silent", "--ignore-missing-imports",
         *[str(PKG / p) for p in TYPED]],
        cwd=ROOT, capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]


def _sources():
    return {p: p.read_text(encoding="utf-8") for p in PKG.rglob("*.py")}


def test_the_cascade_calls_methods_instead_of_probing_attributes():
    text = (PKG / "cascade.py").read_text(encoding="utf-8")
    assert not re.search(r"\b(getattr|hasattr)\(", text)


def test_one_place_for_each_rule():
    """The chain's k_matrix, the default draft lengths and the chat template each live in one module."""
    where = {
        r"def chain_matrix\b|\[\[.*if j == i else 0": {"config.py"},
        r"\(3,\) \* \(": {"config.py"},
        r"apply_chat_template\(": {"prompts.py", "tokenizer.py"},
        r"\b(ChainRound|TreeRound)\(": {"cascade.py", "builder.py", "generator.py", "decoding.py"},
    }
    for pattern, allowed in where.items():
        found = {p.name for p, text in _sources().items() if re.search(pattern, text)}
        assert found <= allowed, f"{pattern!r} found in {sorted(found - allowed)}"


def test_function_level_imports_say_why():
    """A function-level import is for a heavy or optional module, with the reason on its line."""
    bare = []
    for p, text in _sources().items():
        lines = text.splitlines()
        for i, line in enumerate(lines):
            if re.match(r"\s+(from \S+ )?import ", line) and "#" not in line:
                if line.strip().startswith(("from speculative_cascade", "import speculative_cascade")):
                    continue  # usage examples in docstrings
                bare.append(f"{p.relative_to(ROOT)}:{i + 1}: {line.strip()}")
    assert not bare, "\n".join(bare)


def test_weight_format_enum_is_the_kernels_enum():
    """``Format`` on the Python side and ``SC_*`` in the C kernels are one enum."""
    from speculative_cascade.engine.formats import Format

    header = (PKG / "engine" / "kernels" / "sc_kernels.h").read_text(encoding="utf-8")
    body = re.search(r"enum\s*\{([^}]*SC_F32[^}]*)\}", header).group(1)
    c_side = {name: int(value) for name, value in re.findall(r"SC_(\w+)\s*=\s*(\d+)", body)}
    assert c_side == {f.name: int(f) for f in Format}
