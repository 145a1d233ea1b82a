"""Float32 linear layers on the CPU: PyTorch's BLAS (MKL), oneDNN, or our own small-batch
kernel, whichever this machine runs faster for each shape, measured, not assumed.

Why: ``F.linear`` on a CPU goes to MKL's sgemm. On some CPUs (AMD EPYC among them, where
MKL does not take its best code path) oneDNN's matmul, which dispatches on the CPU's
instruction set itself, runs the large prefill GEMMs (the LM head, the dense MLP) about a
quarter faster, while MKL stays faster for one-row decode GEMVs and the small expert
matmuls. For decode batches of 2 to 16 rows both route through general GEMM code with
packing; ``inference/csrc/fp8_cpu.c``'s ``f32_gemm_small`` streams each weight row once
for all rows instead (1.1-2.7x MKL at 2-4 rows here). None wins everywhere, and which one
wins depends on the machine, so the choice
is made the way ``inference.fp8`` chooses its FP8 kernels: per (rows bucket, N, K), time
each candidate on the first call of that shape (decode-sized calls with cold caches, as a
decode step meets its weights: ``inference.kernel_timing``), check it against ``F.linear``,
keep the fastest.

Only inference uses the dispatch: with autograd recording (LoRA training) every call is
plain ``F.linear``. The weights stay ordinary float32 tensors (oneDNN is handed the same
storage, no packed copy), so memory, ``state_dict`` and peft are unaffected.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from inference import fp8_cpu
from inference.kernel_timing import COLD_ROWS, CacheFlusher, best_time

# Candidates must agree with F.linear to within float32 summation-order differences.
TOLERANCE = 1e-5


def _mkl(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return F.linear(x, w, b)


def _onednn(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")


def _c_small(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = fp8_cpu.gemm_f32_small(x, w)  # RuntimeError above 16 rows: not a candidate there
    return y if b is None else y + b


KERNELS: dict[str, Callable] = {"mkl": _mkl, "onednn": _onednn, "c_small": _c_small}


def _rows_class(m: int) -> int:
    """Rows bucketed by powers of two (1, 2, 4, ... capped at 4096): one choice per bucket."""
    return min(1 << max(m - 1, 0).bit_length(), 4096)


class LinearKernels:
    """Per-model record of the fastest float32 CPU kernel per (rows bucket, N, K).

    ``force``: a kernel name to use everywhere (tests); None measures. ``timings`` keeps
    what was measured, for benchmarks to report.
    """

    def __init__(self, force: str | None = None):
        if force is not None and force not in KERNELS:
            raise ValueError(f"unknown linear kernel {force!r}; known: {sorted(KERNELS)}")
        self.force = force
        self.choice: dict[tuple[int, int, int], str] = {}
        self.timings: dict[tuple[int, int, int], dict[str, float]] = {}
        self.flush = CacheFlusher()

    def pick(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> str:
        if self.force is not None:
            return self.force
        key = (_rows_class(x.shape[0]), w.shape[0], w.shape[1])
        name = self.choice.get(key)
        if name is None:
            name = self._measure(key, x, w, b)
        return name

    def _measure(self, key, x, w, b) -> str:
        ref = F.linear(x, w, b)
        ref_norm = ref.norm().clamp_min(1e-30)
        times: dict[str, float] = {}
        for name, kernel in KERNELS.items():
            try:
                out = kernel(x, w, b)
            except (RuntimeError, NotImplementedError):
                continue  # not built into this PyTorch, or not for this shape
            if ((out - ref).norm() / ref_norm).item() > TOLERANCE:
                continue
            times[name] = best_time(
                lambda kernel=kernel: kernel(x, w, b),
                flush=self.flush if key[0] <= COLD_ROWS else None,  # decode: weights cold
                enough_s=0.05,  # one timing of a large GEMM is enough
            )
        name = min(times, key=times.get) if times else "mkl"
        self.choice[key] = name
        self.timings[key] = times
        return name


class DispatchLinear(nn.Linear):
    """``nn.Linear`` whose no-grad float32 CPU calls go to the kernel ``kernels`` measured
    fastest for the shape. Made from an existing ``nn.Linear`` by ``use_measured_linear``."""

    kernels: LinearKernels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if (
            x.device.type != "cpu"
            or x.dtype != torch.float32
            or w.dtype != torch.float32
            or (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        ):
            return F.linear(x, w, self.bias)
        shape = x.shape
        x2 = x.reshape(-1, shape[-1]).contiguous()
        y = KERNELS[self.kernels.pick(x2, w, self.bias)](x2, w, self.bias)
        return y.view(*shape[:-1], w.shape[0])


def use_measured_linear(model: nn.Module, kernels: LinearKernels | None = None) -> LinearKernels:
    """Turn every plain float32 ``nn.Linear`` of ``model`` into a ``DispatchLinear`` in place
    (same parameters, nothing copied) sharing one ``LinearKernels``; returns it. Subclasses
    (``FP8Linear``, peft's layers) are left alone."""
    kernels = kernels if kernels is not None else LinearKernels()
    for module in model.modules():
        if type(module) is nn.Linear and module.weight.dtype == torch.float32:
            module.__class__ = DispatchLinear
            module.kernels = kernels
    return kernels
