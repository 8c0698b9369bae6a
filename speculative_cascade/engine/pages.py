"""Weights in one block of 2 MiB pages.

A decoding step streams every weight of the target once. In the kernel's default 4 KiB pages
that is one TLB entry and one page walk per 4 KiB read (an fp32 SmolLM2-135M: 131,000 a token),
and the read stalls at each. Linux gives 2 MiB pages ("transparent huge pages") to memory that
asks for them with ``madvise(MADV_HUGEPAGE)`` (the default mode of most distributions is
``madvise``: nothing is huge unless asked). So a target whose layers are dense floats (fp32,
bf16, fp16: products that stream memory) has its weights copied, in the order a forward reads
them, into one anonymous mapping aligned to 2 MiB and advised so (``Transformer._place_weights``;
an INT8 or 4-bit draft copied from a target places its own matrices the same way);
the bandwidth probe reads the same kind of memory, so the bound it prints stands on the same
footing. On a 2-core Zen 4 VM the probe read 29-63 GB/s in 2 MiB pages against 29-57 in 4 KiB
ones (read alternately, the gap 0-43% by the moment), and fp32 SmolLM2-135M forwards ran ~3%
faster.

Elsewhere (no ``MADV_HUGEPAGE``: macOS, Windows; or THP set to ``never``) the same layout in
ordinary memory: nothing changes but the page size.
"""

from __future__ import annotations

import mmap
from pathlib import Path

import numpy as np
import torch

HUGE_PAGE = 2**21
ALIGN = 64  # each tensor starts on a cache line


def block(nbytes: int) -> torch.Tensor:
    """``nbytes`` of zeroed memory as a uint8 tensor, 2 MiB-aligned and advised into huge pages
    where the system offers them; the mapping lives as long as the tensor or a view of it."""
    if nbytes < HUGE_PAGE or not hasattr(mmap, "MADV_HUGEPAGE"):
        return torch.zeros(nbytes, dtype=torch.uint8)
    m = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(mmap.MADV_HUGEPAGE)
    except OSError:  # THP compiled out: ordinary pages
        pass
    buf = np.frombuffer(m, dtype=np.uint8)
    start = (-buf.ctypes.data) % HUGE_PAGE
    return torch.from_numpy(buf[start : start + nbytes])


class Block:
    """One block holding copies of ``tensors`` (each once, however often listed, in this order).
    :meth:`place` copies a tensor in and returns the copy; swapping each holder's tensor for it as
    it goes frees the originals one by one (peak memory: the weights plus one tensor)."""

    def __init__(self, tensors: list[torch.Tensor]) -> None:
        self.offsets: dict[int, int] = {}
        at = 0
        for t in tensors:
            if t.data_ptr() not in self.offsets:
                self.offsets[t.data_ptr()] = at
                at += -(-t.numel() * t.element_size() // ALIGN) * ALIGN
        self.mem = block(at)

    def place(self, t: torch.Tensor) -> torch.Tensor:
        """The copy of ``t``; ``t`` itself when it is not one of the block's (placed already)."""
        at = self.offsets.pop(t.data_ptr(), None)
        if at is None:
            return t
        copy = self.mem[at : at + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        copy.copy_(t)
        return copy


def huge_bytes(t: torch.Tensor) -> int | None:
    """Bytes of the mapping holding ``t`` that sit in huge pages (Linux ``/proc/self/smaps``);
    None where the system does not say."""
    smaps = Path("/proc/self/smaps")
    try:
        text = smaps.read_text()
    except OSError:
        return None
    addr, inside = t.data_ptr(), False
    for line in text.splitlines():
        head = line.split(maxsplit=1)[0] if line else ""
        if "-" in head and not head.endswith(":"):
            lo, hi = (int(x, 16) for x in head.split("-"))
            inside = lo <= addr < hi
        elif inside and head == "AnonHugePages:":
            return int(line.split()[1]) * 1024
    return None
