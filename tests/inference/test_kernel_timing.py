"""Decode-sized kernel candidates are timed with cold caches, as a decode step meets its
weights; larger calls as they come."""

from __future__ import annotations

import torch

from inference import kernel_timing
from inference.cpu_linear import LinearKernels
from inference.fp8 import FP8Kernels, quantize_weight
from inference.kernel_timing import CacheFlusher, best_time, last_level_cache_bytes


def test_the_last_level_cache_is_read_from_sysfs_and_the_flush_buffer_is_twice_it(tmp_path):
    for i, (level, size) in enumerate([(1, "32K"), (2, "1024K"), (3, "16M"), (3, "junk")]):
        d = tmp_path / f"index{i}"
        d.mkdir()
        (d / "level").write_text(f"{level}\n")
        (d / "size").write_text(f"{size}\n")
    assert last_level_cache_bytes(tmp_path) == 16 << 20
    assert last_level_cache_bytes(tmp_path / "missing") == 32 << 20  # the default
    assert CacheFlusher().nbytes == min(2 * last_level_cache_bytes(), 256 << 20)
    flush = CacheFlusher(1 << 20)
    flush()
    assert flush._buffer is not None and flush._buffer.numel() * 4 == 1 << 20


def test_best_time_flushes_before_every_timed_call_and_stops_once_a_call_is_long_enough():
    events = []
    t = best_time(lambda: events.append("call"), repeats=3, flush=lambda: events.append("flush"))
    assert events == ["flush", "call"] * 3 and t >= 0
    events.clear()
    best_time(lambda: events.append("call"), repeats=3, enough_s=-1.0)
    assert events == ["call"]  # the first timing already exceeds enough_s


class _CountingFlush:
    def __init__(self):
        self.calls = 0

    def __call__(self):
        self.calls += 1


def test_decode_sized_calls_are_timed_cold_and_prefill_sized_ones_hot():
    w = torch.randn(96, 64)
    kernels = LinearKernels()
    kernels.flush = counting = _CountingFlush()
    kernels.pick(torch.randn(4, 64), w, None)  # decode-sized: each timing after a flush
    decode_flushes = counting.calls
    assert decode_flushes >= 3 * len(kernels.timings[(4, 96, 64)])
    kernels.pick(torch.randn(kernel_timing.COLD_ROWS * 4, 64), w, None)
    assert counting.calls == decode_flushes  # prefill-sized: no flush

    q, s = quantize_weight(torch.randn(256, 128))
    fp8 = FP8Kernels()
    fp8.flush = counting = _CountingFlush()
    fp8.pick(torch.randn(1, 128), q, s)
    assert counting.calls >= 3
    seen = counting.calls
    fp8.pick(torch.randn(64, 128), q, s)
    assert counting.calls == seen
