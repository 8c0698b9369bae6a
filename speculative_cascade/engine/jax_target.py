"""The target on JAX: the Llama-family decoder over a device mesh, for verification across devices and hosts.

The seed paper verifies with ``jax.pmap(M2.verify, ...)`` on a TPU pod. Here the same decoder as
``transformer.py`` is written once in JAX and compiled with ``jax.jit`` over a
:class:`jax.sharding.Mesh` with two named axes:

* ``model`` - tensor parallel: q/k/v, gate and up projections split by output columns, o and down
  projections by input rows, the head by vocabulary; XLA inserts the all-reduce after each
  row-split product (two per block) and gathers the logits. For targets larger than one device.
* ``data`` - the seed's replicated verification: the weights replicated, the tokens of one forward
  (a round's candidates: a draft chain or a token tree's branches) split across devices.

It is fed by the native loader (:func:`~.loader.load_model` with ``precision="fp32"``: one loading
path), keeps a static KV cache with a cursor (O(1) rollback, as :class:`~.kv_cache.KVCache`), and
compiles one program per bucket of new tokens (powers of two), so recompilation is bounded; JAX's
persistent compilation cache (under the project's cache directory) spares a second start the
compiles. The object has the native model's interface (``model(tokens, cache, positions,
tree_mask, last_only)`` -> logits as a torch tensor, ``new_cache``, ``vocab_size``, ...), so every
stage, round and cascade mode runs on it unchanged: drafts stay on the host (the PyTorch engine),
where they are cheapest; only the target's forwards run on the mesh.

Many hosts: :func:`initialize` calls ``jax.distributed.initialize``; every process runs the same
program (the decoding loop is deterministic given the replicated logits) and process 0 prints.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import partial

import numpy as np
import torch

from ..errors import CascadeError
from .transformer import ModelArgs, Transformer

AXES = ("data", "model")


def _jax():
    try:
        import jax  # the optional 'jax' extra
    except ImportError:
        raise CascadeError("the JAX backend needs JAX: pip install 'speculative-cascade[jax]'") from None
    return jax


def parse_mesh(spec: str | None) -> dict[str, int]:
    """``"model=4"``, ``"data=2,model=2"`` -> axis sizes (missing axes are 1)."""
    sizes = {"data": 1, "model": 1}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, _, n = part.partition("=")
        name = name.strip()
        if name not in AXES:
            raise CascadeError(f"--mesh: unknown axis {name!r}: expected {' and '.join(AXES)}, e.g. model=4 or data=2,model=2")
        try:
            sizes[name] = int(n)
        except ValueError:
            raise CascadeError(f"--mesh: {part!r} needs a size, e.g. {name}=2") from None
        if sizes[name] < 1:
            raise CascadeError(f"--mesh: {name} must be >= 1")
    return sizes


def initialize(coordinator: str | None, num_processes: int | None, process_id: int | None) -> None:
    """``jax.distributed.initialize`` for a multi-host run (arguments, else JAX's own environment variables)."""
    jax = _jax()
    if coordinator is None and num_processes is None and process_id is None:
        return
    if coordinator is None or num_processes is None or process_id is None:
        raise CascadeError("a multi-host run needs --coordinator HOST:PORT, --num-processes N and --process-id I")
    if not 0 <= process_id < num_processes:
        raise CascadeError(f"--process-id must be in 0..{num_processes - 1}, got {process_id}")
    try:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # collectives between CPU processes
    except (AttributeError, ValueError):
        pass  # a JAX whose CPU collectives need no choosing
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)


def process_index() -> int:
    return _jax().process_index()


CACHE_EVENTS = {"hits": 0, "misses": 0}  # the persistent compilation cache, this process


def _count(event: str, **_kw) -> None:
    if event == "/jax/compilation_cache/cache_hits":
        CACHE_EVENTS["hits"] += 1
    elif event == "/jax/compilation_cache/cache_misses":
        CACHE_EVENTS["misses"] += 1


def enable_compilation_cache(folder) -> None:
    """JAX's persistent compilation cache: a second start loads the compiled programs
    (:data:`CACHE_EVENTS` counts the loads and the compiles)."""
    jax = _jax()
    from jax import monitoring  # jax is imported by now

    monitoring.register_event_listener(_count)
    os.makedirs(folder, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)


def make_mesh(sizes: dict[str, int]):
    jax = _jax()
    from jax.sharding import Mesh  # jax is imported by now

    n = sizes["data"] * sizes["model"]
    devices = jax.devices()
    if len(devices) < n:
        raise CascadeError(
            f"the mesh {sizes['data']}x{sizes['model']} needs {n} devices, JAX sees {len(devices)} "
            f"({devices[0].platform}); on a CPU: XLA_FLAGS=--xla_force_host_platform_device_count={n}"
        )
    return Mesh(np.array(devices[:n]).reshape(sizes["data"], sizes["model"]), AXES)


class JaxKVCache:
    """The keys/values ``(layers, n_kv_heads, slots, head_dim)`` on the mesh and a cursor.

    ``slots`` is ``max_seq_len`` plus room for the largest bucket's padding (padded tokens
    write past the cursor, where nothing reads)."""

    batch_size = 1

    def __init__(self, k, v, max_seq_len: int) -> None:
        self.k, self.v = k, v
        self.max_seq_len = max_seq_len
        self.seqlens: list[int] = [0]

    def reset(self) -> None:
        self.seqlens = [0]

    def advance(self, n: int, row: int | None = None) -> None:
        assert self.seqlens[0] + n <= self.max_seq_len, "KV cache overflow"
        self.seqlens[0] += n

    def rollback(self, n: int, row: int | None = None) -> None:
        assert 0 <= n <= self.seqlens[0], "rollback past the start of the cache"
        self.seqlens[0] -= n

    def truncate(self, length: int, row: int | None = None) -> None:
        assert 0 <= length <= self.seqlens[0], "truncate beyond the cached length"
        self.seqlens[0] = length

    def room(self, row: int = 0) -> int:
        return self.max_seq_len - self.seqlens[0]

    def compact(self, src: list[int], dst: int, row: int | None = None) -> None:
        """Move the slots ``src`` to ``dst, dst + 1, ...`` (a tree's accepted path) and keep ``dst + len(src)``."""
        idx = np.asarray(src, dtype=np.int32)
        self.k = _compact(self.k, idx, dst)
        self.v = _compact(self.v, idx, dst)
        self.seqlens[0] = dst + len(src)

    @property
    def nbytes(self) -> int:
        return int(self.k.nbytes + self.v.nbytes)


def _compact(buf, idx: np.ndarray, dst: int):
    return buf.at[:, :, dst : dst + len(idx)].set(buf[:, :, idx])


@dataclass(frozen=True)
class _Dims:
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    eps: float


class JaxTarget:
    """A native model's weights as a JAX decoder on ``mesh`` (see the module docstring)."""

    def __init__(self, native: Transformer, mesh, *, min_bucket: int = 1) -> None:
        jax = _jax()
        import jax.numpy as jnp  # jax is imported by now
        from jax.sharding import NamedSharding, PartitionSpec as P  # jax is imported by now

        self.args: ModelArgs = native.args  # quantized weights are dequantized to fp32 here
        a = self.args
        self.mesh = mesh
        self.data = mesh.shape["data"]
        self.min_bucket = max(min_bucket, self.data)
        self.dims = _Dims(a.n_layers, a.n_heads, a.n_kv_heads, a.head_dim, a.norm_eps)
        q, kv, hid = a.n_heads * a.head_dim, a.n_kv_heads * a.head_dim, a.intermediate_size
        model = mesh.shape["model"]
        for what, n in (("q width", q), ("k/v width", kv), ("MLP width", hid), ("vocabulary", a.vocab_size)):
            if n % model:
                raise CascadeError(f"--mesh model={model} does not divide the target's {what} ({n})")

        def t(w):  # a torch weight (out, in), kept so: each output is a contiguous row (a streamed dot)
            return np.ascontiguousarray(w.detach().float().numpy())

        layers = native.layers
        stacked = {
            "attn_norm": np.stack([b.attention_norm.weight.detach().numpy() for b in layers]),
            "ffn_norm": np.stack([b.ffn_norm.weight.detach().numpy() for b in layers]),
            "wq": np.stack([t(b.attention.wqkv.weight[:q]) for b in layers]),
            "wk": np.stack([t(b.attention.wqkv.weight[q : q + kv]) for b in layers]),
            "wv": np.stack([t(b.attention.wqkv.weight[q + kv :]) for b in layers]),
            "wo": np.stack([t(b.attention.wo.weight) for b in layers]),
            "w1": np.stack([t(b.feed_forward.w13.weight[:hid]) for b in layers]),
            "w3": np.stack([t(b.feed_forward.w13.weight[hid:]) for b in layers]),
            "w2": np.stack([t(b.feed_forward.w2.weight) for b in layers]),
        }
        specs = {
            "attn_norm": P(), "ffn_norm": P(),
            "wq": P(None, "model", None), "wk": P(None, "model", None), "wv": P(None, "model", None),
            "wo": P(None, None, "model"),
            "w1": P(None, "model", None), "w3": P(None, "model", None), "w2": P(None, None, "model"),
        }
        biases = {
            "bq": (a.qkv_bias, lambda b: b.attention.wqkv.bias[:q]),
            "bk": (a.qkv_bias, lambda b: b.attention.wqkv.bias[q : q + kv]),
            "bv": (a.qkv_bias, lambda b: b.attention.wqkv.bias[q + kv :]),
            "bo": (a.o_bias, lambda b: b.attention.wo.bias),
            "b1": (a.mlp_bias, lambda b: b.feed_forward.w13.bias[:hid]),
            "b3": (a.mlp_bias, lambda b: b.feed_forward.w13.bias[hid:]),
            "b2": (a.mlp_bias, lambda b: b.feed_forward.w2.bias),
        }
        for name, (present, get) in biases.items():
            if present:
                stacked[name] = np.stack([get(b).detach().float().numpy() for b in layers])
                specs[name] = P(None, "model") if name in ("bq", "bk", "bv", "b1", "b3") else P()
        stacked["embed"] = native.tok_embeddings.weight.detach().float().numpy()
        specs["embed"] = P()
        stacked["norm"] = native.norm.weight.detach().float().numpy()
        specs["norm"] = P()
        stacked["head"] = t(native.output.weight)
        specs["head"] = P("model", None)
        top = ("embed", "norm", "head")
        self.params = {k: _put(stacked[k], NamedSharding(mesh, specs[k])) for k in top}
        self.params["layers"] = [  # one array per layer and weight: each product reads its weight in place
            {k: _put(v[i], NamedSharding(mesh, P(*specs[k][1:]))) for k, v in stacked.items() if k not in top}
            for i in range(a.n_layers)
        ]
        self._replicated = NamedSharding(mesh, P())
        self._tokens = NamedSharding(mesh, P("data"))
        rope = native._rope_table(a.max_position_embeddings + 1024)  # complex (n, hd / 2)
        self._cos = np.ascontiguousarray(rope.real.numpy())
        self._sin = np.ascontiguousarray(rope.imag.numpy())
        self._jnp = jnp
        self._step = jax.jit(partial(_forward, self.dims), static_argnums=(8,), out_shardings=self._replicated)
        self._write = jax.jit(_write, donate_argnums=(0, 1), out_shardings=self._replicated)
        self.eos_token_ids = native.eos_token_ids
        self.vocab_size = a.vocab_size
        self.max_position_embeddings = a.max_position_embeddings
        self.model_type = a.model_type
        self.compiled_buckets: set[int] = set()
        self.weight_format = "F32 (jax)" if not native.is_quantized else f"F32 (jax, from {native.weight_format})"
        devices = mesh.devices.flatten()
        self.backend_name = f"jax:{devices[0].platform} data={self.data},model={model}"

    # -- the native model's interface ----------------------------------------------------------
    device = torch.device("cpu")
    is_quantized = False

    @property
    def decode_bytes(self) -> int:
        return int(sum(leaf.nbytes for leaf in _jax().tree_util.tree_leaves(self.params)))

    def to(self, device):
        return self

    def eval(self):
        return self

    def new_cache(self, max_seq_len: int, batch_size: int = 1) -> JaxKVCache:
        if batch_size != 1:
            raise CascadeError("the JAX target decodes one sequence per cache")
        a = self.args
        slots = max_seq_len + self.bucket(max_seq_len)
        shape = (a.n_layers, a.n_kv_heads, slots, a.head_dim)
        k = _put(np.zeros(shape, np.float32), self._replicated)
        v = _put(np.zeros(shape, np.float32), self._replicated)
        return JaxKVCache(k, v, max_seq_len)

    def bucket(self, n: int) -> int:
        """The compiled size for ``n`` new tokens: the next power of two (at least ``min_bucket``)."""
        b = self.min_bucket
        while b < n:
            b *= 2
        return b

    @staticmethod
    def context_bucket(n: int) -> int:
        """The cached slots a forward's attention reads: ``n`` rounded up to a power of two, at least 256."""
        b = 256
        while b < n:
            b *= 2
        return b

    def __call__(self, tokens, cache: JaxKVCache, positions=None, tree_mask=None, last_only: bool = False):
        return self.forward(tokens, cache, positions, tree_mask, last_only)

    def forward(self, tokens: torch.Tensor, cache: JaxKVCache, positions=None, tree_mask=None, last_only=False):
        """``tokens (1, T)`` against ``cache``: logits ``(1, T, V)`` as a torch tensor (``(1, 1, V)`` if last_only)."""
        B, T = tokens.shape
        assert B == 1, "the JAX target decodes one sequence at a time"
        start = cache.seqlens[0]
        assert start + T <= cache.max_seq_len, "KV cache overflow"
        Tb = self.bucket(T)
        S = min(self.context_bucket(start), cache.k.shape[2])
        ids = np.zeros(Tb, np.int32)
        ids[:T] = tokens[0].numpy()
        pos = np.zeros(Tb, np.int32)
        pos[:T] = positions[0].numpy() if positions is not None else np.arange(start, start + T)
        pos[T:] = pos[T - 1] if T else 0
        mask = np.zeros((Tb, S + Tb), bool)  # the cached slots below the cursor, then the new tokens
        mask[:, :start] = True
        if tree_mask is None:
            mask[:T, S : S + T] = np.tril(np.ones((T, T), bool))
        else:
            mask[:T, S : S + T] = tree_mask[0].numpy()
        mask[T:, S:] = np.eye(Tb, dtype=bool)[T:]  # padding tokens see themselves: their softmax stays finite
        args = (
            _put(ids, self._tokens),
            _put(self._cos[pos], self._tokens),
            _put(self._sin[pos], self._tokens),
            _put(np.int32(start), self._replicated),
            _put(mask, self._tokens),
        )
        logits, ks, vs = self._step(self.params, cache.k, cache.v, *args, S)
        cache.k, cache.v = self._write(cache.k, cache.v, ks, vs, args[3])
        self.compiled_buckets.add(Tb)
        cache.advance(T)
        out = np.asarray(logits.addressable_data(0))[:T]
        if last_only:
            out = out[-1:]
        return torch.from_numpy(np.array(out))[None]


def _put(x: np.ndarray, sharding):
    """A global array from host data, in single- and multi-process runs alike."""
    jax = _jax()
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def _write(cache_k, cache_v, ks, vs, start):
    """The new tokens' keys and values into the (donated) cache, in place: its only use here."""
    import jax  # inside the compiled function: the module imports JAX only when the backend is used

    return (jax.lax.dynamic_update_slice(cache_k, ks, (0, 0, start, 0)),
            jax.lax.dynamic_update_slice(cache_v, vs, (0, 0, start, 0)))


def _forward(d: _Dims, params, cache_k, cache_v, tokens, cos, sin, start, mask, Sb: int):
    """Every layer for the bucket's tokens: (logits (Tb, V), their keys and values (layers, nkv, Tb, hd)).

    ``mask`` (Tb, Sb + Tb): which cached slots (the first Sb columns: those below the cursor; ``Sb``, a
    bucket of the context, bounds what attention reads) and which new tokens (the last Tb) each new token sees. The layers read the cache; :func:`_write` stores
    the new keys and values afterwards (a program of its own, so that XLA updates the cache in place)."""
    import jax  # inside the compiled function: the module imports JAX only when the backend is used
    import jax.numpy as jnp  # with jax, above

    nh, nkv, hd = d.n_heads, d.n_kv_heads, d.head_dim
    group = nh // nkv
    Tb = tokens.shape[0]
    S = Sb
    scale = 1.0 / jnp.sqrt(jnp.float32(hd))

    def rms(x, w):
        return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + d.eps) * w

    def rotate(x):  # (Tb, heads, hd), interleaved pairs (2i, 2i + 1)
        x = x.reshape(Tb, -1, hd // 2, 2)
        a, b = x[..., 0], x[..., 1]
        c, s = cos[:, None, :], sin[:, None, :]
        return jnp.stack([a * c - b * s, a * s + b * c], axis=-1).reshape(Tb, -1, hd)

    def layer(x, p, ck, cv):
        """One block; p: its weights, ck, cv: its cache (nkv, slots, hd). Returns x and its new keys/values."""

        def lin(h, w, b):
            return jnp.einsum("ti,oi->to", h, p[w]) + (p[b] if b in p else 0.0)

        h = rms(x, p["attn_norm"])
        q = rotate(lin(h, "wq", "bq").reshape(Tb, nh, hd)).reshape(Tb, nkv, group, hd)
        k = rotate(lin(h, "wk", "bk").reshape(Tb, nkv, hd))
        v = lin(h, "wv", "bv").reshape(Tb, nkv, hd)
        old = jnp.einsum("tgqd,gsd->gqts", q, ck) * scale  # against the cache
        new = jnp.einsum("tgqd,ugd->gqtu", q, k) * scale  # against this forward's tokens
        scores = jnp.where(mask[None, None], jnp.concatenate([old, new], axis=-1), -jnp.inf)
        w = jax.nn.softmax(scores, axis=-1)
        y = jnp.einsum("gqts,gsd->tgqd", w[..., :S], cv) + jnp.einsum("gqtu,ugd->tgqd", w[..., S:], v)
        x = x + lin(y.reshape(Tb, nh * hd), "wo", "bo")
        h = rms(x, p["ffn_norm"])
        x = x + lin(jax.nn.silu(lin(h, "w1", "b1")) * lin(h, "w3", "b3"), "w2", "b2")
        return x, k.transpose(1, 0, 2), v.transpose(1, 0, 2)

    x = params["embed"][tokens]
    new_k, new_v = [], []
    for i, p in enumerate(params["layers"]):  # unrolled: each product reads its weight where it lies
        x, k, v = layer(x, p, cache_k[i, :, :S], cache_v[i, :, :S])  # only the context's bucket is read
        new_k.append(k)
        new_v.append(v)
    ks, vs = jnp.stack(new_k), jnp.stack(new_v)
    logits = jnp.einsum("ti,oi->to", rms(x, params["norm"]), params["head"])
    return logits, ks, vs
