"""A GGUF file's metadata and tensors, read directly: the header, the key/value pairs, the tensor
infos, and the tensor data memory-mapped (nothing is copied until a tensor is used).

``gguf.GGUFReader`` builds every field as numpy views, the embedded tokenizer's ~100k strings
included, which takes seconds per start; the loader needs a few scalars and the tensors (the
tokenizer is converted once by transformers and cached). String arrays are skipped here (their
value is None); scalar arrays are read. Tensors carry what ``formats.from_gguf`` expects, with
the same conventions as ``GGUFReader``: ``shape`` innermost dimension first, ``data`` typed for
F32/F16/F64/I8..I64 and raw bytes (one row of blocks per row) for every block type.
"""

from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9
_TYPED = {
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F64: np.float64,
    GGMLQuantizationType.I8: np.int8,
    GGMLQuantizationType.I16: np.int16,
    GGMLQuantizationType.I32: np.int32,
    GGMLQuantizationType.I64: np.int64,
}


@dataclass
class GGUFTensor:
    name: str
    tensor_type: GGMLQuantizationType
    shape: tuple[int, ...]  # innermost dimension first, as stored
    data: np.ndarray
    offset: int = 0  # where its bytes lie in the file
    nbytes: int = 0


def check_header(path: str | Path) -> None:
    """Raise ValueError unless the file starts as a GGUF file of a version read here (2 or 3)."""
    with open(path, "rb") as f:
        head = f.read(8)
    if len(head) < 8 or head[:4] != b"GGUF":
        raise ValueError("not a GGUF file")
    version = int.from_bytes(head[4:8], "little")
    if version not in (2, 3):
        raise ValueError(f"unsupported GGUF version {version}")


class GGUFFile:
    """``fields``: key -> value (None for string arrays); ``tensors``: list of :class:`GGUFTensor`.
    Raises ValueError on a malformed or truncated file."""

    def __init__(self, path: str | Path) -> None:
        check_header(path)
        self._mm = np.memmap(path, mode="r")
        try:
            self._parse()
        except (struct.error, IndexError, UnicodeDecodeError, OverflowError) as e:
            raise ValueError(f"malformed GGUF header ({e})") from None

    def _read(self, fmt: str):
        v = struct.unpack_from(fmt, self._mm, self._at)
        self._at += struct.calcsize(fmt)
        return v[0]

    def _string(self) -> str:
        n = self._read("<Q")
        if self._at + n > len(self._mm):
            raise ValueError("a string runs past the end of the file")
        s = bytes(self._mm[self._at : self._at + n]).decode("utf-8")
        self._at += n
        return s

    def _value(self, vtype: int):
        if vtype in _SCALARS:
            return self._read(_SCALARS[vtype])
        if vtype == _STRING:
            return self._string()
        if vtype != _ARRAY:
            raise ValueError(f"unknown value type {vtype}")
        etype, count = self._read("<I"), self._read("<Q")
        if etype in _SCALARS:
            size = struct.calcsize(_SCALARS[etype])
            if self._at + count * size > len(self._mm):
                raise ValueError("an array runs past the end of the file")
            out = np.frombuffer(self._mm, dtype=np.dtype(_SCALARS[etype]), count=count, offset=self._at)
            self._at += count * size
            return out
        for _ in range(count):  # strings (the vocabulary) or nested arrays: skipped
            if etype == _STRING:
                self._at += 8 + struct.unpack_from("<Q", self._mm, self._at)[0]
            else:
                self._value(etype)
        if self._at > len(self._mm):
            raise ValueError("an array runs past the end of the file")
        return None

    def _parse(self) -> None:
        self._at = 8  # magic and version: check_header
        n_tensors, n_kv = self._read("<Q"), self._read("<Q")
        self.fields: dict = {}
        for _ in range(n_kv):
            key = self._string()
            self.fields[key] = self._value(self._read("<I"))
        infos = []
        for _ in range(n_tensors):
            name = self._string()
            dims = tuple(self._read("<Q") for _ in range(self._read("<I")))
            infos.append((name, dims, GGMLQuantizationType(self._read("<I")), self._read("<Q")))
        align = int(self.fields.get("general.alignment", 32))
        start = (self._at + align - 1) // align * align
        self.tensors: list[GGUFTensor] = []
        for name, dims, qtype, offset in infos:
            n = int(np.prod(dims))
            block, size = GGML_QUANT_SIZES[qtype]
            nbytes = n * size // block
            at = start + offset
            if at + nbytes > len(self._mm):
                raise ValueError(f"tensor {name} runs past the end of the file")
            np_dims = tuple(reversed(dims))
            if qtype in _TYPED:
                data = np.frombuffer(self._mm, dtype=_TYPED[qtype], count=n, offset=at).reshape(np_dims)
            else:
                byte_dims = np_dims[:-1] + (np_dims[-1] // block * size,)
                data = np.frombuffer(self._mm, dtype=np.uint8, count=nbytes, offset=at).reshape(byte_dims)
            self.tensors.append(GGUFTensor(name, qtype, dims, data, at, nbytes))

    def release(self, tensor: GGUFTensor) -> None:
        """Drop the tensor's pages from this process (they stay in the page cache): a loader that
        has repacked a tensor keeps the resident memory of the copy alone."""
        mm = getattr(self._mm, "_mmap", None)
        if mm is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        start = tensor.offset // mmap.PAGESIZE * mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, tensor.offset + tensor.nbytes - start)
        except (OSError, ValueError):
            pass
