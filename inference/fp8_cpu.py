"""Build, load and call the C CPU kernels (``inference/csrc/fp8_cpu.c``): the FP8 matmuls and
dequantiser, and two float32 kernels for decode-sized batches: ``gemm_f32_small`` (a
candidate of ``inference.cpu_linear``'s measured dispatch) and ``moe_small``, a whole MoE
layer's routed experts in one call (the serving step's decode path, ``inference.decode``).

The kernel is plain C with OpenMP, compiled by the machine's ``cc`` on first use into a
cache directory (``$ENCLAVE_KERNEL_CACHE``, default ``~/.cache/enclave/kernels``) under a name
that hashes the source, the flags and the CPU, so a rebuilt source or another CPU builds
anew. It is loaded with ctypes: no PyTorch headers, so a build takes about a second instead
of the half minute a ``torch.utils.cpp_extension`` build takes. Its libgomp dependency is
resolved by soname to the libgomp PyTorch has already loaded, so the process keeps one
OpenMP runtime.

If no compiler is found or the build fails, ``available()`` is False and neither dispatch
(FP8 or float32) ever picks these kernels.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

SOURCE = Path(__file__).parent / "csrc" / "fp8_cpu.c"
FLAGS = [
    "-O3",
    "-march=native",
    # Let the compiler vectorise the dot-product reductions (reassociation only).
    "-fno-math-errno",
    "-fno-trapping-math",
    "-fno-signed-zeros",
    "-fassociative-math",
    "-fopenmp",
    "-fPIC",
    "-shared",
]
PANEL_ROWS = 256  # weight rows dequantised per panel in the large-batch kernel
MAX_FUSED_ROWS = 16  # must match MAX_FUSED_ROWS in the C source


def _cache_dir() -> Path:
    return Path(
        os.environ.get("ENCLAVE_KERNEL_CACHE", Path.home() / ".cache" / "enclave" / "kernels")
    )


def _cpu_signature() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") or line.startswith("model name"):
                return line
    except OSError:
        pass
    return os.uname().machine


def build(cache_dir: Path | None = None) -> Path:
    """Compile the kernel if needed; return the shared library's path. Raises RuntimeError
    (with the compiler's output) when there is no compiler or the build fails."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    digest = hashlib.sha256(
        SOURCE.read_bytes() + " ".join(FLAGS).encode() + _cpu_signature().encode()
    ).hexdigest()[:16]
    cache_dir = cache_dir or _cache_dir()
    target = cache_dir / f"enclave_fp8_cpu_{digest}.so"
    if target.exists():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        out = Path(tmp) / target.name
        cmd = [cc, *FLAGS, str(SOURCE), "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building {SOURCE.name} failed:\n{' '.join(cmd)}\n{proc.stderr}")
        os.replace(out, target)  # atomic: concurrent builders never see a half-written file
    return target


@functools.cache
def _library() -> ctypes.CDLL | None:
    # Cached per process: the compiled library is immutable once loaded.
    try:
        lib = ctypes.CDLL(str(build()))
    except (RuntimeError, OSError):
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    lib.fp8_dequant_rows.argtypes = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.fp8_dequant_rows.restype = None
    lib.fp8_gemm_fused.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.fp8_gemm_fused.restype = ctypes.c_int
    lib.fp8_gemm_blocked.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.fp8_gemm_blocked.restype = ctypes.c_int
    lib.f32_gemm_small.argtypes = [ptr, ptr, ptr, i64, i64, i64, ctypes.c_int]
    lib.f32_gemm_small.restype = ctypes.c_int
    lib.f32_moe_small.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr]
    lib.f32_moe_small.argtypes.append(ctypes.c_int)
    lib.f32_moe_small.restype = ctypes.c_int
    lib.fp8_moe_small.argtypes = [ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, ptr, ptr, ptr]
    lib.fp8_moe_small.argtypes += [ptr, ptr, ptr, ctypes.c_int]
    lib.fp8_moe_small.restype = ctypes.c_int
    return lib


def available() -> bool:
    """True when the kernel is built (or buildable) and loaded."""
    return _library() is not None


def _check(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> None:
    if x.device.type != "cpu" or x.dtype != torch.float32 or x.dim() != 2:
        raise RuntimeError("fp8_cpu wants a 2-D float32 CPU activation")
    if q.shape[1] != x.shape[1] or scale.dtype != torch.float32:
        raise RuntimeError("fp8_cpu: shape or scale dtype mismatch")


def gemm_fused(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 (M <= 16) @ dequant(q [N, K], scale).T -> [M, N], fused decode."""
    _check(x, q, scale)
    m, k = x.shape
    n = q.shape[0]
    if m > MAX_FUSED_ROWS:
        raise RuntimeError(f"fused FP8 kernel takes at most {MAX_FUSED_ROWS} rows")
    lib = _library()
    if lib is None:
        raise RuntimeError("fp8_cpu kernel is not available")
    x, q, scale = x.contiguous(), q.contiguous(), scale.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    lib.fp8_gemm_fused(
        x.data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr(), m, n, k, torch.get_num_threads()
    )
    return y


def gemm_blocked(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 @ dequant(q [N, K], scale).T -> [M, N], any M: four weight rows at a
    time are decoded into a small buffer and consumed by 4x4 register-blocked vector loops."""
    _check(x, q, scale)
    m, k = x.shape
    n = q.shape[0]
    lib = _library()
    if lib is None:
        raise RuntimeError("fp8_cpu kernel is not available")
    x, q, scale = x.contiguous(), q.contiguous(), scale.contiguous()
    y = torch.empty(m, n, dtype=torch.float32)
    rc = lib.fp8_gemm_blocked(
        x.data_ptr(), q.data_ptr(), scale.data_ptr(), y.data_ptr(), m, n, k, torch.get_num_threads()
    )
    if rc != 0:
        raise RuntimeError("fp8_gemm_blocked: out of memory")
    return y


def gemm_panels(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 @ dequant(q [N, K], scale).T -> [M, N] for larger M: dequantises
    PANEL_ROWS weight rows at a time into a small buffer and hands each panel to PyTorch's
    matmul, so the float32 weight never exists in full."""
    _check(x, q, scale)
    m, k = x.shape
    n = q.shape[0]
    lib = _library()
    if lib is None:
        raise RuntimeError("fp8_cpu kernel is not available")
    q, scale = q.contiguous(), scale.contiguous()
    xt = x.t()
    panel = torch.empty(min(PANEL_ROWS, n), k, dtype=torch.float32)
    # Compute y.T row-panel by row-panel: each panel's output is a contiguous slice.
    yt = torch.empty(n, m, dtype=torch.float32)
    threads = torch.get_num_threads()
    for n0 in range(0, n, PANEL_ROWS):
        n1 = min(n0 + PANEL_ROWS, n)
        lib.fp8_dequant_rows(q.data_ptr(), scale.data_ptr(), panel.data_ptr(), n0, n1, k, threads)
        torch.mm(panel[: n1 - n0], xt, out=yt[n0:n1])
    return yt.t().contiguous()


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """bytes [N, K] (e4m3fn) and weight_scale_inv -> float32 [N, K], decoded by the C kernel
    (vectorised; PyTorch's own float8 cast is about 20x slower on CPUs)."""
    if q.device.type != "cpu" or q.dim() != 2 or scale.dtype != torch.float32:
        raise RuntimeError("fp8_cpu.dequantize wants a 2-D CPU weight and float32 scales")
    lib = _library()
    if lib is None:
        raise RuntimeError("fp8_cpu kernel is not available")
    q, scale = q.contiguous(), scale.contiguous()
    n, k = q.shape
    out = torch.empty(n, k, dtype=torch.float32)
    lib.fp8_dequant_rows(
        q.data_ptr(), scale.data_ptr(), out.data_ptr(), 0, n, k, torch.get_num_threads()
    )
    return out


F32_MAX_ROWS = 16  # must match F32_MAX_ROWS in the C source


def gemm_f32_small(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x [M, K] float32 (M <= 16) @ w [N, K].T -> [M, N] float32: the decode-sized GEMV that
    streams each weight row once (``f32_gemm_small``). RuntimeError where it cannot run."""
    if x.device.type != "cpu" or x.dtype != torch.float32 or w.dtype != torch.float32:
        raise RuntimeError("gemm_f32_small wants float32 CPU tensors")
    m, k = x.shape
    if m > F32_MAX_ROWS or w.shape[1] != k:
        raise RuntimeError(
            f"gemm_f32_small takes at most {F32_MAX_ROWS} rows of width {w.shape[1]}"
        )
    lib = _library()
    if lib is None:
        raise RuntimeError("the C kernels are not available")
    x, w = x.contiguous(), w.contiguous()
    y = torch.empty(m, w.shape[0], dtype=torch.float32)
    rc = lib.f32_gemm_small(
        x.data_ptr(), w.data_ptr(), y.data_ptr(), m, w.shape[0], k, torch.get_num_threads()
    )
    if rc != 0:
        raise RuntimeError("gemm_f32_small: no vector path on this CPU")
    return y


class ExpertTable:
    """The addresses of an MoE layer's expert weights for ``moe_small``: float32 weights, or
    FP8 ones (e4m3 bytes and their ``weight_scale_inv``), all experts alike. It holds the
    tensors themselves, so the addresses stay valid while the table lives.
    ``matches(experts)`` checks (cheaply) that the layer still has these weights."""

    def __init__(self, experts):
        self.weights = [(e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight) for e in experts]
        self.fp8 = self.weights[0][0].dtype == torch.float8_e4m3fn
        want = torch.float8_e4m3fn if self.fp8 else torch.float32
        self.scales = []
        for e, trio in zip(experts, self.weights, strict=True):
            for w in trio:
                if w.dtype != want or w.device.type != "cpu" or not w.is_contiguous():
                    raise RuntimeError(
                        "moe_small wants contiguous float32 or FP8 CPU expert weights, all alike"
                    )
            if self.fp8:
                trio_s = tuple(
                    getattr(e, n).weight_scale_inv.contiguous()
                    for n in ("gate_proj", "up_proj", "down_proj")
                )
                if any(sc.dtype != torch.float32 for sc in trio_s):
                    raise RuntimeError("moe_small wants float32 FP8 block scales")
                self.scales.append(trio_s)
        self.gate, self.up, self.down = self._addresses(self.weights)
        self.gate_s = self.up_s = self.down_s = None
        if self.fp8:
            self.gate_s, self.up_s, self.down_s = self._addresses(self.scales)
        self.inter, self.hidden = self.weights[0][0].shape

    @staticmethod
    def _addresses(trios) -> tuple[torch.Tensor, ...]:
        return tuple(
            torch.tensor([trio[i].data_ptr() for trio in trios], dtype=torch.int64)
            for i in range(3)
        )

    def matches(self, experts) -> bool:
        return len(experts) == len(self.weights) and all(
            e.gate_proj.weight is t[0] and e.down_proj.weight is t[2]
            for e, t in ((experts[0], self.weights[0]), (experts[-1], self.weights[-1]))
        )


def moe_small(
    x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor, table: ExpertTable
) -> torch.Tensor:
    """The routed experts' weighted sum for x [T, hidden] float32 (T <= 16), given the
    router's choice (indices [T, k] int64, weights [T, k]): one C call, ``f32_moe_small`` or
    (FP8 experts) ``fp8_moe_small``.
    RuntimeError where it cannot run."""
    lib = _library()
    if lib is None:
        raise RuntimeError("the C kernels are not available")
    t, k = x.shape
    if t > F32_MAX_ROWS or x.dtype != torch.float32 or k != table.hidden:
        raise RuntimeError(
            f"moe_small takes at most {F32_MAX_ROWS} float32 rows of width {table.hidden}"
        )
    x = x.contiguous()
    idx = indices.to(torch.int64).contiguous()
    g = weights.to(torch.float32).contiguous()
    y = torch.zeros(t, k, dtype=torch.float32)
    args = [
        x.data_ptr(), idx.data_ptr(), g.data_ptr(), y.data_ptr(), t, idx.shape[1],
        len(table.weights), k, table.inter, table.gate.data_ptr(), table.up.data_ptr(),
        table.down.data_ptr(),
    ]  # fmt: skip
    if table.fp8:
        args += [table.gate_s.data_ptr(), table.up_s.data_ptr(), table.down_s.data_ptr()]
        rc = lib.fp8_moe_small(*args, torch.get_num_threads())
    else:
        rc = lib.f32_moe_small(*args, torch.get_num_threads())
    if rc != 0:
        raise RuntimeError(f"moe_small failed ({rc})")
    return y
