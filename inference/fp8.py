"""FP8 (e4m3) weights with 128x128 block scales, in the DeepSeek-V3 checkpoint format.

A weight W [N, K] is cut into 128x128 blocks (edge blocks may be smaller). For each block,
scale = amax(|block|) / 448 and the stored bytes are float8_e4m3fn(block / scale). The
checkpoint keeps the bytes as ``<name>.weight`` and the per-block scales as
``<name>.weight_scale_inv`` [ceil(N/128), ceil(K/128)] float32; despite its name, that tensor
holds the scale itself (dequantised W = bytes * weight_scale_inv), as DeepSeek stores it.
Activations, where a kernel wants them in FP8, are quantised per token in 1x128 groups.

``FP8Linear`` is an ``nn.Linear`` whose weight stays float8 in memory. Its forward calls
``fp8_linear``, the one function that decides how an FP8 weight meets an activation. It
does not guess: the first call for a (device, dtype, batch-size class, N, K) times every
kernel that can run there, checks each against the plain dequantise-then-matmul
reference, and remembers the fastest in an ``FP8Kernels`` object that one model (one
engine) owns. Nothing is cached at module level, so two engines never share choices.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F
from torch import nn

from inference import fp8_cpu
from inference.kernel_timing import COLD_ROWS, CacheFlusher, best_time

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3fn value
BLOCK = 128  # weight block edge and activation group width
CHECK_ROWS = 512  # weight rows each kernel is checked on when the dispatch measures
REFERENCE_MAX_ELEMENTS = 1 << 26  # larger weights never time the dequantise-everything path


# ---- quantisation -----------------------------------------------------------------------


def _blocks(w: torch.Tensor) -> torch.Tensor:
    """W [N, K] -> [nb, 128, kb, 128] block view (zero-padded copy only for ragged edges)."""
    n, k = w.shape
    if n % BLOCK or k % BLOCK:
        w = F.pad(w, (0, -k % BLOCK, 0, -n % BLOCK))
    return w.view(w.shape[0] // BLOCK, BLOCK, w.shape[1] // BLOCK, BLOCK)


def _expand_scales(scale: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Per-block scales [nb, kb] -> per-element [n, k] (edge blocks cropped)."""
    return scale.repeat_interleave(BLOCK, 0).repeat_interleave(BLOCK, 1)[:n, :k]


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W [N, K] (any float dtype) -> (bytes [N, K] float8_e4m3fn, weight_scale_inv [nb, kb] fp32).

    scale = amax / 448 per 128x128 block; an all-zero block gets scale 1 (its bytes are zero
    whatever the scale, and 1 keeps the scale finite and invertible). Raises ValueError for
    a non-2D or non-finite weight.
    """
    if w.dim() != 2:
        raise ValueError(f"quantize_weight wants a 2-D weight, got shape {tuple(w.shape)}")
    n, k = w.shape
    blocks = _blocks(w.float())
    amax = blocks.abs().amax(dim=(1, 3))
    if not torch.isfinite(amax).all():
        raise ValueError("quantize_weight: weight holds inf or nan")
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    # Block views and broadcasting: no full-size scale tensor is ever materialised.
    q = (blocks / scale[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    q = q.view(blocks.shape[0] * BLOCK, blocks.shape[2] * BLOCK)
    if q.shape != (n, k):
        q = q[:n, :k].contiguous()
    return q, scale


def dequantize_weight(
    q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """(bytes [N, K] float8_e4m3fn, weight_scale_inv [nb, kb]) -> W [N, K] in ``dtype``."""
    n, k = q.shape
    if scale.shape != (math.ceil(n / BLOCK), math.ceil(k / BLOCK)):
        raise ValueError(
            f"weight_scale_inv shape {tuple(scale.shape)} does not match weight {(n, k)} "
            f"in {BLOCK}x{BLOCK} blocks"
        )
    return (q.float() * _expand_scales(scale.float(), n, k)).to(dtype)


def _dequantize_fast(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``dequantize_weight`` through the C decoder where it runs (CPU), else the reference.
    The same values: both compute byte value * block scale in float32."""
    if q.device.type == "cpu" and scale.dtype == torch.float32 and fp8_cpu.available():
        return fp8_cpu.dequantize(q, scale).to(dtype)
    return dequantize_weight(q, scale, dtype)


def quantize_activation(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x [..., K] -> (bytes [..., K] float8_e4m3fn, scales [..., ceil(K/128)] fp32), one scale
    per token per 128-wide group (DeepSeek-V3's 1x128 activation tiles)."""
    k = x.shape[-1]
    x32 = F.pad(x.float(), (0, -k % BLOCK))
    groups = x32.view(*x.shape[:-1], -1, BLOCK)
    amax = groups.abs().amax(dim=-1)
    scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))
    q = (groups / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)
    return q.flatten(-2)[..., :k], scale


def e4m3_table(device: torch.device | str = "cpu") -> torch.Tensor:
    """The 256 float32 values of the e4m3fn bytes (NaN for the two NaN codes)."""
    return torch.arange(256, dtype=torch.uint8, device=device).view(FP8_DTYPE).float()


# ---- kernels ----------------------------------------------------------------------------
# Each takes x2d [M, K] (compute dtype), bytes [N, K], scale [nb, kb] and returns [M, N].


def _kernel_reference(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Plain PyTorch: dequantise the whole weight, then one matmul. The accuracy anchor."""
    return F.linear(x, dequantize_weight(q, scale, x.dtype))


def _kernel_table_dequant(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Dequantise through a 256-entry lookup table (float8 -> float32 casts are slow on CPU)."""
    n, k = q.shape
    w = e4m3_table(q.device)[q.view(torch.uint8).long()] * _expand_scales(scale, n, k)
    return F.linear(x, w.to(x.dtype))


def _kernel_cpu_fused(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """C kernel for decode-sized batches: decodes 128-wide tiles inside the dot products."""
    return fp8_cpu.gemm_fused(x, q, scale)


def _kernel_cpu_blocked(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """C register-blocked kernel: decodes four weight rows at a time into L1 and reuses them
    across the batch (fp8_cpu.gemm_blocked)."""
    return fp8_cpu.gemm_blocked(x, q, scale)


def _kernel_cpu_panels(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """C dequantisation of 256-row weight panels, each multiplied by PyTorch's matmul."""
    return fp8_cpu.gemm_panels(x, q, scale)


def _kernel_cpu_dequant_bf16(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """CPUs with bf16 dot products (AVX512-BF16, AMX): the C decoder, then one bf16 matmul
    (oneDNN, float32 accumulation), about twice float32's rate on prefill-sized batches."""
    w = fp8_cpu.dequantize(q, scale).to(torch.bfloat16)
    return F.linear(x.to(torch.bfloat16), w).to(x.dtype)


def _kernel_cuda_dequant_bf16(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """CUDA fallback: dequantise to bf16 and use the bf16 tensor cores."""
    w = dequantize_weight(q, scale, torch.bfloat16)
    return F.linear(x.to(torch.bfloat16), w).to(x.dtype)


def _kernel_cuda_blockwise_scaled_mm(
    x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor
) -> torch.Tensor:
    """CUDA FP8 tensor cores: activations quantised per 1x128, weights per 128x128 block,
    through ``torch.nn.functional.scaled_mm``'s block-wise recipes (Hopper and newer).

    cuBLASLt wants B column-major (``q.t()`` of the row-major weight), the 1x128 scales of A
    outer-dimension-major, the row count a multiple of 4 and the K-block count of the
    weight scales a multiple of 4; zero padding keeps the product unchanged.
    """
    from torch.nn.functional import ScalingType

    m = x.shape[0]
    xq, xs = quantize_activation(F.pad(x, (0, 0, 0, -m % 4)))
    ws = F.pad(scale.float(), (0, -scale.shape[1] % 4), value=1.0)
    y = F.scaled_mm(
        xq,
        q.t(),
        xs.t().contiguous().t(),
        ScalingType.BlockWise1x128,
        ws.t(),
        ScalingType.BlockWise128x128,
        output_dtype=torch.bfloat16,
    )
    return y[:m].to(x.dtype)


# Name -> (kernel, can it run on (device type, dtype, K, N)?, relative error it may show
# against the reference: summation order only, bf16 products, or FP8 activations too).
EXACT, BF16_PRODUCTS, FP8_ACTIVATIONS = 1e-4, 2e-2, 6e-2
_KERNELS: dict[str, tuple[Callable, Callable[[str, torch.dtype, int, int], bool], float]] = {
    "reference": (_kernel_reference, lambda dev, dt, k, n: True, EXACT),
    "table_dequant": (_kernel_table_dequant, lambda dev, dt, k, n: True, EXACT),
    "cpu_fused": (_kernel_cpu_fused, lambda dev, dt, k, n: _cpu_fp32(dev, dt), EXACT),
    "cpu_blocked": (_kernel_cpu_blocked, lambda dev, dt, k, n: _cpu_fp32(dev, dt), EXACT),
    "cpu_panels": (_kernel_cpu_panels, lambda dev, dt, k, n: _cpu_fp32(dev, dt), EXACT),
    "cpu_dequant_bf16": (
        _kernel_cpu_dequant_bf16,
        lambda dev, dt, k, n: _cpu_fp32(dev, dt) and _cpu_bf16_fast(),
        BF16_PRODUCTS,
    ),
    "cuda_dequant_bf16": (
        _kernel_cuda_dequant_bf16,
        lambda dev, dt, k, n: dev == "cuda",
        BF16_PRODUCTS,
    ),
    "cuda_blockwise_scaled_mm": (
        _kernel_cuda_blockwise_scaled_mm,
        lambda dev, dt, k, n: (
            dev == "cuda" and k % BLOCK == 0 and n % BLOCK == 0 and _has_blockwise()
        ),
        True,
    ),
}


def _cpu_fp32(device_type: str, dtype: torch.dtype) -> bool:
    return device_type == "cpu" and dtype == torch.float32 and fp8_cpu.available()


def bf16_matmul_is_fast(device: torch.device | str = "cpu") -> bool:
    """Whether bfloat16 matmuls beat float32 ones on ``device``: CUDA, or a CPU with native
    bf16 dot products (AVX512-BF16 or AMX), where they run about twice as fast."""
    return torch.device(device).type == "cuda" or _cpu_bf16_fast()


@functools.cache
def _cpu_bf16_fast() -> bool:
    """oneDNN's check for native bf16 dot products on this CPU."""
    return bool(
        torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
    )


def _has_blockwise() -> bool:
    if not torch.cuda.is_available() or not hasattr(F, "scaled_mm"):
        return False
    return torch.cuda.get_device_capability() >= (9, 0)


def _batch_class(m: int) -> int:
    """Rows bucketed by powers of two (1, 2, 4, ... capped at 1024): one choice per bucket."""
    return min(1 << max(m - 1, 0).bit_length(), 1024)


class FP8Kernels:
    """Per-engine record of which kernel is fastest for each (device, dtype, rows, N, K).

    ``force``: a kernel name to use everywhere (tests, debugging); None measures.
    ``allowed``: kernel names to consider (default: all that can run).
    ``timings`` keeps what was measured, for benchmarks to report.
    """

    def __init__(self, force: str | None = None, allowed: Iterable[str] | None = None):
        if force is not None and force not in _KERNELS:
            raise ValueError(f"unknown FP8 kernel {force!r}; known: {sorted(_KERNELS)}")
        self.force = force
        self.allowed = tuple(allowed) if allowed is not None else tuple(_KERNELS)
        self.choice: dict[tuple, str] = {}
        self.timings: dict[tuple, dict[str, float]] = {}
        self.flush = CacheFlusher()  # see inference.kernel_timing

    def pick(self, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> str:
        """Kernel name for this call; measures the candidates the first time a key is seen."""
        if self.force is not None:
            return self.force
        n, k = q.shape
        key = (x.device.type, x.dtype, _batch_class(x.shape[0]), n, k)
        name = self.choice.get(key)
        if name is None:
            with torch.no_grad():
                name = self._measure(key, x.detach(), q, scale)
        return name

    def _measure(self, key: tuple, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> str:
        dev, dtype, _, n, k = key
        # Check candidates on the first rows of the weight only: the reference materialises
        # a full-width copy, which for a DeepSeek-V3-sized LM head is gigabytes.
        rows = min(n, CHECK_ROWS)
        ref = _kernel_reference(x, q[:rows], scale[: math.ceil(rows / BLOCK)]).float()
        ref_norm = ref.norm().clamp_min(1e-30)
        times: dict[str, float] = {}
        for name in self.allowed:
            kernel, runs_here, tolerance = _KERNELS[name]
            if not runs_here(dev, dtype, k, n):
                continue
            if name == "reference" and n * k > REFERENCE_MAX_ELEMENTS:
                continue  # never the fastest at that size, and too big to time
            try:
                out = kernel(x, q, scale)
            except (RuntimeError, NotImplementedError):
                continue  # an unsupported shape or build on this device: not a candidate
            # A kernel that disagrees with the reference beyond its expected rounding is
            # broken on this device or shape: it is not a candidate, however fast.
            if ((out[:, :rows].float() - ref).norm() / ref_norm).item() > tolerance:
                continue
            cold = dev == "cpu" and key[2] <= COLD_ROWS  # decode: weights come from memory
            times[name] = best_time(
                lambda kernel=kernel: kernel(x, q, scale),
                flush=self.flush if cold else None,
                sync=lambda: _sync(x.device),
            )
        name = min(times, key=times.get) if times else "reference"
        self.choice[key] = name
        self.timings[key] = times
        return name


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _FP8LinearFunction(torch.autograd.Function):
    """Makes every kernel differentiable in x (the FP8 weight is frozen): the C kernels return
    plain tensors, and LoRA training needs gradients to flow through frozen FP8 layers."""

    @staticmethod
    def forward(
        ctx, x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, name: str
    ) -> torch.Tensor:
        ctx.save_for_backward(q, scale)
        return _KERNELS[name][0](x, q, scale)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        q, scale = ctx.saved_tensors
        return grad @ _dequantize_fast(q, scale, grad.dtype), None, None, None


def dense_weight(q, scale, dense, dtype) -> torch.Tensor:
    """A training layer's weight in ``dtype``: the kept copy, or decoded from the bytes."""
    return dense if dense is not None else _dequantize_fast(q, scale, dtype)


class _DenseLinearFunction(torch.autograd.Function):
    """The training product of a frozen FP8 layer: x @ W.T with W dequantised exactly and
    multiplied in ``dtype``, through ``dense`` (the kept copy) when there is one, else
    decoded from the bytes in each pass, so that backward holds only the float8 bytes."""

    @staticmethod
    def forward(ctx, x, q, scale, dense, dtype):
        ctx.save_for_backward(q, scale, dense)
        ctx.dtype = dtype
        return bucketed_product(F.linear, x, dense_weight(q, scale, dense, dtype), dtype)

    @staticmethod
    def backward(ctx, grad):
        q, scale, dense = ctx.saved_tensors
        w = dense_weight(q, scale, dense, ctx.dtype)
        return bucketed_product(torch.mm, grad, w, ctx.dtype), None, None, None, None


def _row_bucket(rows: int) -> int:
    """``rows`` rounded up to a multiple of 16 or, from 256 rows, to one of eight sizes per
    power of two: under 16 or 12.5% more rows, 40 sizes up to 2,048."""
    step = max(16, 1 << max(rows.bit_length() - 4, 0))
    return -(-rows // step) * step


def bucketed_product(op, a: torch.Tensor, w: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``op(a.to(dtype), w).to(a.dtype)`` for 2-D ``a``. On the CPU in a reduced precision,
    ``a``'s rows are zero-padded to ``_row_bucket`` first: oneDNN builds (JIT-compiles) a
    kernel for every new bf16 GEMM shape, 1-3 ms each, and training meets a new row count in
    almost every product (padding-free batches, expert loads), which made bf16 steps slower
    than float32 ones on an AMX CPU. Padding bounds the shapes to a few dozen per weight."""
    rows = a.shape[0]
    padded = _row_bucket(rows)
    if a.device.type != "cpu" or dtype == torch.float32 or padded == rows:
        return op(a.to(dtype), w).to(a.dtype)
    buf = a.new_empty((padded, a.shape[1]), dtype=dtype)
    buf[:rows] = a
    buf[rows:] = 0
    return op(buf, w)[:rows].to(a.dtype)


def fp8_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale: torch.Tensor,
    bias: torch.Tensor | None,
    out_dtype: torch.dtype,
    kernels: FP8Kernels,
) -> torch.Tensor:
    """y = x @ dequant(weight, scale).T + bias. The single FP8 dispatch point.

    x [..., K] (cast to ``out_dtype``), weight [N, K] float8_e4m3fn, scale [ceil(N/128),
    ceil(K/128)] -> y [..., N] in ``out_dtype``. The kernel is the one ``kernels`` measured
    fastest for this shape class on this device.
    """
    shape = x.shape
    x2d = x.reshape(-1, shape[-1]).to(out_dtype)
    name = kernels.pick(x2d, weight, scale)
    if x2d.requires_grad and torch.is_grad_enabled():
        y = _FP8LinearFunction.apply(x2d, weight, scale, name)
    else:
        y = _KERNELS[name][0](x2d, weight, scale)
    if bias is not None:
        y = y + bias.to(y.dtype)
    return y.view(*shape[:-1], weight.shape[0])


# ---- the module -------------------------------------------------------------------------


class FP8Linear(nn.Linear):
    """``nn.Linear`` with a float8_e4m3fn weight and per-128x128-block ``weight_scale_inv``.

    ``compute_dtype`` is the dtype of inputs and outputs. PEFT reads that attribute
    (``_get_base_layer_device_and_dtype``) to create LoRA weights in it rather than in the
    weight's float8 dtype. The weight is frozen (``requires_grad=False``): train adapters.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        device: torch.device | str | None = None,
        compute_dtype: torch.dtype = torch.float32,
        kernels: FP8Kernels | None = None,
    ):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a full-width weight
        self.in_features = in_features
        self.out_features = out_features
        self.compute_dtype = compute_dtype
        self.kernels = kernels if kernels is not None else FP8Kernels()
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device),
            requires_grad=False,
        )
        scale_shape = (math.ceil(out_features / BLOCK), math.ceil(in_features / BLOCK))
        self.register_buffer("weight_scale_inv", torch.ones(scale_shape, device=device))
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=compute_dtype, device=device))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls,
        linear: nn.Linear,
        compute_dtype: torch.dtype | None = None,
        kernels: FP8Kernels | None = None,
    ) -> FP8Linear:
        """Quantise a plain ``nn.Linear`` (its weight is read, not kept)."""
        out = cls(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            device=linear.weight.device,
            compute_dtype=compute_dtype or linear.weight.dtype,
            kernels=kernels,
        )
        q, scale = quantize_weight(linear.weight.detach())
        out.weight = nn.Parameter(q, requires_grad=False)
        out.weight_scale_inv = scale
        if linear.bias is not None:
            out.bias = nn.Parameter(linear.bias.detach().to(out.compute_dtype))
        return out

    def dequantized_weight(self) -> torch.Tensor:
        """The weight in ``compute_dtype`` (a new tensor)."""
        return _dequantize_fast(self.weight, self.weight_scale_inv, self.compute_dtype)

    # Training (``finetune.lora.prepare_fp8_for_training``): the dtype the frozen weight is
    # multiplied in, and optionally a dequantised copy of it in that dtype, kept so that
    # neither the forward nor the backward pass decodes the float8 bytes again. None: the
    # measured FP8 kernels (serving).
    dense_dtype: torch.dtype | None = None
    dense: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense_dtype is None:
            return fp8_linear(
                x, self.weight, self.weight_scale_inv, self.bias, self.compute_dtype, self.kernels
            )
        shape = x.shape
        x2d = x.reshape(-1, shape[-1]).to(self.compute_dtype)
        y = _DenseLinearFunction.apply(
            x2d, self.weight, self.weight_scale_inv, self.dense, self.dense_dtype
        )
        y = y.view(*shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias.to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, fp8 e4m3 128x128"


def fp8_target_names(model: nn.Module) -> list[str]:
    """Module names DeepSeek-V3 stores in FP8: every linear of the decoder layers except the
    router, plus (our choice, for memory) the LM head. Embeddings and norms stay wide."""
    names = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear) and (
            name.startswith("model.layers.") or name == "lm_head"
        ):
            names.append(name)
    return names


def swap_to_fp8(
    model: nn.Module,
    names: Iterable[str],
    compute_dtype: torch.dtype,
    kernels: FP8Kernels,
    quantize: bool,
) -> None:
    """Replace the named ``nn.Linear`` modules by ``FP8Linear`` sharing ``kernels``.

    ``quantize=True`` quantises the current weights; False leaves empty FP8 modules (on the
    linear's device, e.g. meta) for a loader to fill.
    """
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        linear = getattr(parent, child)
        if isinstance(linear, FP8Linear):
            continue
        if quantize:
            new = FP8Linear.from_linear(linear, compute_dtype, kernels)
        else:
            new = FP8Linear(
                linear.in_features,
                linear.out_features,
                bias=linear.bias is not None,
                device=linear.weight.device,
                compute_dtype=compute_dtype,
                kernels=kernels,
            )
        setattr(parent, child, new)
