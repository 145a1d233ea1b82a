"""Keep freed host memory in the process for the next forward instead of handing it back
to the kernel and faulting it in again.

Why: a CPU forward allocates and frees the same few-MiB temporaries in every layer (the
query, keys and values, attention output, expert activations) and one large logits tensor
per call. glibc's malloc serves blocks above its mmap threshold (dynamic, 128 KiB up to
32 MiB) with a fresh ``mmap`` each time and unmaps them on free, and it trims the top of its
heap back to the kernel above the trim threshold; every such block is then zero-filled page
by page on first touch. On the small config a 512-token float32 prefill took 54-61 thousand
minor page faults, 0.2-0.3 s of kernel time in a 2.5 s forward; with the thresholds below it
takes none, and the forward ran 7-10 % faster (``bench/forward.py``, same host, same run).
PyTorch's own advice for CPU inference is the same cure by another route (preloading
jemalloc or tcmalloc, which keep freed memory cached).

The cost: the process keeps up to ``trim_threshold`` of freed memory mapped. A worker's
resident size settles at its high-water mark instead of falling after each request, which
is what a serving or training worker wants; the peak is unchanged.

The setting is process-wide and glibc-only. ``load_model`` applies it for CPU models;
``ENCLAVE_RETAIN_FREED_MEMORY=0`` turns it off.
"""

from __future__ import annotations

import ctypes
import os

MMAP_THRESHOLD = 256 << 20  # blocks below this come from the heap, never a fresh mmap
TRIM_THRESHOLD = 1 << 30  # free memory kept at the heap's top before trimming

_M_TRIM_THRESHOLD = -1  # mallopt parameter numbers, from glibc's <malloc.h>
_M_MMAP_THRESHOLD = -3
_GLIBC_OLD_CAP = 32 << 20

_applied: bool | None = None


def retain_freed_memory(
    mmap_threshold: int = MMAP_THRESHOLD, trim_threshold: int = TRIM_THRESHOLD
) -> bool:
    """Raise glibc malloc's mmap and trim thresholds for this process (once; later calls
    return the first call's result). Returns True when applied; False when turned off by
    ``ENCLAVE_RETAIN_FREED_MEMORY=0``, when the C library is not glibc, or when glibc
    refuses a value."""
    global _applied
    if _applied is not None:
        return _applied
    _applied = False
    if os.environ.get("ENCLAVE_RETAIN_FREED_MEMORY", "1") == "0":
        return False
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018  (AttributeError: not glibc)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # The mmap threshold first: setting the trim threshold alone also freezes the mmap
    # threshold at its current (small) value, which makes matters worse.
    # Some glibc releases cap the mmap threshold at 32 MiB: fall back to that cap.
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    ok = ok or mallopt(_M_MMAP_THRESHOLD, min(mmap_threshold, _GLIBC_OLD_CAP)) == 1
    ok = ok and mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1
    _applied = ok
    return ok


def is_retaining() -> bool:
    """Whether ``retain_freed_memory`` has applied the setting in this process."""
    return bool(_applied)
