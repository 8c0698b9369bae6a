"""The front page cannot rot: the README's cheap commands and Python examples run as written (fewer
tokens), and so do the seed README's Quick Start and benchmark commands (the models named: the
embedded one, or a tiny random one for the benchmarks; few tokens and prompts)."""

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")
SEED = next((ROOT.parent / "shared" / "seeds").glob("000_*.txt"), None)


def blocks(text: str, lang: str) -> list[str]:
    return re.findall(rf"```{lang}\n(.*?)```", text, re.S)


def run(argv: list[str], cwd=ROOT, timeout=600) -> subprocess.CompletedProcess:
    r = subprocess.run(argv, cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(argv)}\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}"
    return r


def readme_commands() -> list[list[str]]:
    """The `cascade` lines of the README that run on the embedded model in seconds."""
    out = []
    for block in blocks(README, "bash"):
        for line in block.splitlines():
            line = line.split("  #")[0].strip()
            if not line.startswith("cascade ") or "model.gguf" in line:
                continue
            argv = shlex.split(line)
            if argv[1] in ("serve", "bench", "bench-serve", "distill", "tune"):  # long-running: their own tests
                continue
            out.append(argv)
    return out


def test_the_readme_names_cheap_commands():
    names = {argv[1] for argv in readme_commands()}
    assert {"generate", "perplexity"} <= names


@pytest.mark.parametrize("argv", readme_commands(), ids=lambda a: " ".join(a[:3]))
def test_readme_command_runs(argv):
    argv = [a for a in argv]
    if "-n" in argv:
        argv[argv.index("-n") + 1] = "8"
    elif argv[1] == "generate":
        argv += ["-n", "8"]
    run([sys.executable, "-m", "speculative_cascade.cli", *argv[1:]])


def test_help_and_info_run():
    run([sys.executable, "-m", "speculative_cascade.cli", "--help"])
    assert "kernels" in run([sys.executable, "-m", "speculative_cascade.cli", "info"]).stdout


def _fewer_tokens(code: str) -> str:
    code = re.sub(r"max_new_tokens=\d+", "max_new_tokens=8", code)
    return re.sub(r"max_tokens=\d+", "max_tokens=8", code)


@pytest.mark.parametrize("i", range(len(blocks(README, "python"))))
def test_readme_python_example_runs(i):
    code = _fewer_tokens(blocks(README, "python")[i])
    run([sys.executable, "-c", code])


@pytest.mark.skipif(SEED is None, reason="the seed README is not beside the project (../shared/seeds)")
def test_seed_quick_start_runs_as_written():
    text = SEED.read_text(encoding="utf-8")
    quick = text.split("## Quick Start", 1)[1]
    code = blocks(quick, "python")[0]
    code = re.sub(r'from_pretrained\("[^"]+"', 'from_pretrained("default"', code)  # the models it names
    assert "from speculative_cascade.models import TinyModel, DraftModel, TargetModel" in code
    r = run([sys.executable, "-c", _fewer_tokens(code)])
    assert r.stdout.strip()


def _seed_bench_commands() -> list[list[str]]:
    text = SEED.read_text(encoding="utf-8")
    bench = blocks(text.split("## Benchmarking", 1)[1], "bash")[0]
    return [shlex.split(c) for c in bench.replace("\\\n", " ").splitlines() if c.strip().startswith("python -m")]


@pytest.mark.skipif(SEED is None, reason="the seed README is not beside the project (../shared/seeds)")
def test_seed_compare_methods_runs_as_written(tmp_path, tiny_model_dir):
    """compare_methods as written (medusa and eagle skipped with a note), on a tiny model, 2 prompts, 2 tokens."""
    argv = next(c for c in _seed_bench_commands() if c[2].endswith("compare_methods"))
    argv[argv.index("--sequences") + 1] = "2"
    argv += ["--max-new-tokens", "2", "--target", str(tiny_model_dir)]
    r = subprocess.run([sys.executable, *argv[1:]], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, f"{argv}\n{r.stderr[-1500:]}"
    assert "skipping 'medusa'" in r.stderr


@pytest.mark.skipif(SEED is None, reason="the seed README is not beside the project (../shared/seeds)")
def test_seed_run_benchmarks_is_cascade_bench_of_every_method():
    """run_benchmarks as written becomes `cascade bench` of every method on the Spec-Bench prompts (pg19 is
    not on this machine), its report in results/; running it all takes minutes, which compare_methods' test
    and the bench's own tests cover."""
    from speculative_cascade.seed.benchmarks import ALL_METHODS, bench_argv, parser

    argv = next(c for c in _seed_bench_commands() if c[2].endswith("run_benchmarks"))
    args = parser("run_benchmarks", ALL_METHODS).parse_args(argv[3:])
    out = bench_argv(args, args.methods)
    assert out[:3] == ["bench", "--methods", ALL_METHODS] and "--prompts" not in out
    assert out[out.index("--json") + 1] == "results/report.json"
