"""Timing a kernel candidate the way a decode step runs it: with its weight cold.

The measured dispatches (``inference.fp8.FP8Kernels``, ``inference.cpu_linear.LinearKernels``)
time each candidate a few times on the layer's own weight. Called again and again, a weight
of a few MB stays in the caches (here: 1 MB of L2 per core, 32 MB of L3), so the timing
rewards whatever is fastest on cached data. A decode step uses each weight once, with the
rest of the model (hundreds of MB) streamed in between: its weights come from memory. Timed
hot, the float32 dispatch kept MKL's GEMV for one-row calls; MKL runs a GEMV on one thread
and streams about 13 GB/s from memory with one thread or two, where the C kernel streams
22 GB/s on one and 36 GB/s on two. The two-thread batch-1 decode was then slower than the
one-thread one (22 against 30 tokens/s on ``small``).

So for decode-sized calls (at most ``COLD_ROWS`` rows) a ``CacheFlusher`` reads a buffer
twice the size of the last-level cache before each timed call. Larger calls are
compute-bound and reuse each weight for many rows: they are timed as they come.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from pathlib import Path

import torch

COLD_ROWS = 16  # calls of at most this many rows are timed with cold caches
_DEFAULT_LLC = 32 << 20
_MAX_FLUSH = 256 << 20


def last_level_cache_bytes(cpu: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The largest cache of CPU 0 from sysfs (Linux); 32 MiB when it cannot be read."""
    sizes = []
    for index in cpu.glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
        except OSError:
            continue
        units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
        if text and text[-1] in units and text[:-1].isdigit():
            sizes.append(int(text[:-1]) * units[text[-1]])
        elif text.isdigit():
            sizes.append(int(text))
    return max(sizes, default=_DEFAULT_LLC)


class CacheFlusher:
    """Evicts the CPU caches by reading a buffer of ``nbytes`` (default: twice the
    last-level cache, at most 256 MiB). The buffer is allocated on first use and kept by
    the dispatch that owns this flusher."""

    def __init__(self, nbytes: int | None = None):
        self.nbytes = (
            nbytes if nbytes is not None else min(2 * last_level_cache_bytes(), _MAX_FLUSH)
        )
        self._buffer: torch.Tensor | None = None

    def __call__(self) -> None:
        if self._buffer is None:
            self._buffer = torch.ones(max(self.nbytes // 4, 1))  # written: real pages
        self._buffer.sum()


def best_time(
    call: Callable[[], object],
    *,
    repeats: int = 3,
    flush: Callable[[], None] | None = None,
    sync: Callable[[], None] | None = None,
    enough_s: float = math.inf,
) -> float:
    """The fastest of ``repeats`` timed calls, each after ``flush`` (if given); stops early
    once one call takes ``enough_s`` (a large GEMM needs no second timing)."""
    best = math.inf
    for _ in range(repeats):
        if flush is not None:
            flush()
        if sync is not None:
            sync()
        t0 = time.perf_counter()
        call()
        if sync is not None:
            sync()
        best = min(best, time.perf_counter() - t0)
        if best > enough_s:
            break
    return best
