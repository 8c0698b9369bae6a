"""Cascade configuration, read from options, a dict, or a TOML/YAML/JSON file (``builder.build_round``
turns it into stages and a round). Stages are listed smallest first and exclude the target::

    [cascade]
    stages = ["mag", "int8"]   # stage 0 drafts for stage 1 (the INT8 draft), which drafts for the target
    mode = "chain"             # "chain" (vertical cascade) or "tree" (the seed paper's Algorithm 1)
    k = [2, 8]                 # chain: tokens stage i drafts per review by stage i + 1
    adaptive = false           # chain: the target's k is the most a round verifies; each round chooses
                               #        how many (0: plain decoding) from what it measured (adaptive.py)
    # k_matrix = [[6, 3], [0, 2]]   # instead of k: CSD's matrix (drafters largest first, increments)
    lenience = 1.0             # CSD's lenience below the target (greedy only; never at the target)
    tree_nodes = 32            # tree: nodes stage 0 drafts, at most tree_width per level;
    tree_width = 4             #       the filter stage keeps tree_keep of them for the target
    tree_keep = 8
    precision = "stored"       # the target as stored (GGUF blocks, bf16), "int8" (int8 activations) or "fp32"

A stage is ``int8`` (an INT8 copy of the target), ``int4`` (a 4-bit copy: groups of 32
with scale and min, INT8 output projection), ``fp32`` (the target's own weights with a cache
of their own: the unquantized draft of the "no INT8" ablation), ``layers:N[:V]`` (the target's first
N layers, weights shared, with the head cut to the first V tokens), ``tiny`` (the tiny projection model
shipped for the embedded target, or ``tiny:PATH``), ``mag`` (MaG with the shipped bigram
table for the embedded target, ``mag:PATH`` with another, ``mag:none`` with suffix matches
only; ``mag_min_ngram`` sets the shortest match it proposes), or any model spec (a .gguf
file, a model directory, a hub id) used as a neural draft.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import yaml

from .errors import CascadeError

if sys.version_info >= (3, 11):
    import tomllib  # in the standard library from Python 3.11
else:
    import tomli as tomllib  # the same parser, as a package, before Python 3.11

MODES = ("chain", "tree")
TWO_STAGE_K = 8  # draft tokens per round when one draft model drafts for the target (--draft)


def default_k(n_stages: int) -> tuple[int, ...]:
    """Draft lengths of a chain given only its stages: 3 per review below the top drafter, 8 for the target."""
    return (3,) * (n_stages - 1) + (8,)


@dataclass(frozen=True)
class CascadeConfig:
    stages: tuple[str, ...] = ("int8",)
    mode: str = "chain"
    k: tuple[int, ...] = (8,)
    k_matrix: tuple[tuple[int, ...], ...] | None = None
    lenience: float = 1.0
    tree_nodes: int = 32
    tree_width: int = 4
    tree_keep: int = 8
    mag_min_ngram: int = 1  # MaG proposes only suffix matches at least this long (then bigrams)
    precision: str = "stored"  # the target's weights: as stored ("stored") or dequantized ("fp32")
    adaptive: bool = False  # chain: choose the target's k (up to k[-1]) before each round
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self) -> None:
        if not self.stages:
            raise CascadeError("the cascade needs at least one drafting stage")
        if self.mode not in MODES:
            raise CascadeError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if self.precision not in ("stored", "int8", "fp32"):
            raise CascadeError(f"precision must be 'stored', 'int8' or 'fp32', got {self.precision!r}")
        if self.lenience < 1.0:
            raise CascadeError(f"lenience must be >= 1, got {self.lenience}")
        if not 1 <= self.mag_min_ngram <= 8:
            raise CascadeError(f"mag_min_ngram must be in 1..8, got {self.mag_min_ngram}")
        if self.adaptive and (self.mode != "chain" or self.k_matrix is not None):
            raise CascadeError("adaptive draft lengths are for chains given by k (not trees or k_matrix)")
        if self.mode == "tree":
            if len(self.stages) > 2:
                raise CascadeError("tree mode takes one or two stages: the proposer, then the filter")
            for name in ("tree_nodes", "tree_width", "tree_keep", "mag_min_ngram"):
                if getattr(self, name) < 1:
                    raise CascadeError(f"{name} must be >= 1, got {getattr(self, name)}")
        elif self.k_matrix is None:
            if len(self.k) != len(self.stages):
                raise CascadeError(f"k needs one value per stage ({len(self.stages)}), got {list(self.k)}")
            if any(k < 1 for k in self.k):
                raise CascadeError(f"every k must be >= 1, got {list(self.k)}")

    @property
    def depth(self) -> int:
        """Number of models including the target."""
        return len(self.stages) + 1

    def chain_matrix(self) -> list[list[int]]:
        """The k_matrix (CSD convention: drafters largest first) of this configuration."""
        if self.k_matrix is not None:
            return [list(r) for r in self.k_matrix]
        n = len(self.stages)
        return [[self.k[n - 1 - i] if j == i else 0 for j in range(n)] for i in range(n)]

    def describe(self) -> str:
        chain = " -> ".join(list(self.stages) + ["target"])
        if self.mode == "tree":
            return f"tree {chain} (nodes {self.tree_nodes}, width {self.tree_width}, keep {self.tree_keep})"
        if self.k_matrix is not None:
            return f"csd {chain} (k_matrix {json.dumps([list(r) for r in self.k_matrix])}, lenience {self.lenience:g})"
        if self.adaptive:
            below = f"k {', '.join(map(str, self.k[:-1]))}; " if len(self.k) > 1 else ""
            return f"adaptive chain {chain} ({below}target verifies 0..{self.k[-1]} a round)"
        return f"chain {chain} (k {', '.join(map(str, self.k))})"

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        d["stages"], d["k"] = list(self.stages), list(self.k)
        d["k_matrix"] = [list(r) for r in self.k_matrix] if self.k_matrix is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CascadeConfig":
        d = dict(d.get("cascade", d))
        known = {f.name for f in fields(cls)} - {"extra"}
        unknown = set(d) - known
        if unknown:
            raise CascadeError(f"unknown cascade setting(s): {', '.join(sorted(unknown))}")
        try:
            if "stages" in d:
                st = d["stages"]
                d["stages"] = tuple(s.strip() for s in (st.split(",") if isinstance(st, str) else st))
            if "k" in d:
                d["k"] = tuple(int(x) for x in (d["k"] if isinstance(d["k"], (list, tuple)) else [d["k"]]))
            if d.get("k_matrix") is not None:
                d["k_matrix"] = tuple(tuple(int(x) for x in row) for row in d["k_matrix"])
            for name in ("tree_nodes", "tree_width", "tree_keep", "mag_min_ngram"):
                if name in d:
                    d[name] = int(d[name])
            if "lenience" in d:
                d["lenience"] = float(d["lenience"])
            if "adaptive" in d:
                if not isinstance(d["adaptive"], bool):
                    raise ValueError(f"adaptive must be true or false, got {d['adaptive']!r}")
        except (TypeError, ValueError) as e:
            raise CascadeError(f"bad cascade setting: {e}") from e
        if "stages" in d and "k" not in d and d.get("k_matrix") is None and d.get("mode", "chain") == "chain":
            d["k"] = default_k(len(d["stages"]))
        return cls(**d)

    @classmethod
    def from_file(cls, path: str | Path) -> "CascadeConfig":
        return cls.from_dict(read_settings(path))

    def with_(self, **kw) -> "CascadeConfig":
        return replace(self, **kw)


def read_settings(path: str | Path) -> dict:
    """The settings table of a TOML, YAML or JSON cascade file."""
    path = Path(path)
    if not path.is_file():
        raise CascadeError(f"cascade file not found: {path}")
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            data = tomllib.loads(text)
    except Exception as e:  # each parser has its own error type
        raise CascadeError(f"{path}: cannot parse ({str(e).splitlines()[0]})") from e
    if not isinstance(data, dict):
        raise CascadeError(f"{path}: expected a table of cascade settings")
    return data


def load_cascade(spec) -> CascadeConfig | None:
    """A CascadeConfig from a config, a dict or a file; None where the stage list is empty
    (``cascade tune`` writes that when plain decoding is fastest)."""
    if spec is None or isinstance(spec, CascadeConfig):
        return spec
    settings = spec if isinstance(spec, dict) else read_settings(spec)
    body = settings.get("cascade", settings)
    if isinstance(body, dict) and "stages" in body and not body["stages"]:
        return None
    return CascadeConfig.from_dict(settings)


def parse_k(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in str(text).split(",") if x.strip())
    except ValueError:
        raise CascadeError(f"k must be integers separated by commas, got {text!r}") from None


def parse_k_matrix(text: str) -> tuple[tuple[int, ...], ...]:
    """'6,3;0,2' or '[[6,3],[0,2]]' -> ((6, 3), (0, 2))."""
    text = text.strip()
    try:
        rows = json.loads(text) if text.startswith("[") else [r.split(",") for r in text.split(";")]
        return tuple(tuple(int(x) for x in row) for row in rows)
    except (ValueError, TypeError):
        raise CascadeError(f"k_matrix must look like '6,3;0,2' or '[[6,3],[0,2]]', got {text!r}") from None
