"""FP8 e4m3 with 128x128 weight blocks: format, accuracy, kernels, PEFT."""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from inference import FP8Kernels, FP8Linear, ModelConfig, fp8_cpu
from inference.fp8 import (
    _KERNELS,
    bf16_matmul_is_fast,
    dequantize_weight,
    e4m3_table,
    fp8_linear,
    quantize_activation,
    quantize_weight,
)
from inference.model import Transformer
from tests.inference.hf_factory import BASE_V3


def deepseek_reference_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Written from DeepSeek-V3's description, block by block: scale = amax / 448 over each
    128x128 block (edge blocks smaller), bytes = e4m3(block / scale); an all-zero block
    gets scale 1. The scale tensor is what checkpoints call weight_scale_inv."""
    n, k = w.shape
    nb, kb = math.ceil(n / 128), math.ceil(k / 128)
    q = torch.empty(n, k, dtype=torch.float8_e4m3fn)
    scale = torch.empty(nb, kb)
    for i in range(nb):
        for j in range(kb):
            block = w[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128].float()
            amax = block.abs().max()
            s = amax / 448 if amax > 0 else torch.tensor(1.0)
            scale[i, j] = s
            q[i * 128 : (i + 1) * 128, j * 128 : (j + 1) * 128] = (block / s).to(
                torch.float8_e4m3fn
            )
    return q, scale


@pytest.mark.parametrize("shape", [(256, 128), (300, 200), (1, 129), (130, 7)])
def test_quantizer_is_byte_identical_to_reference(shape):
    w = torch.randn(shape, generator=torch.Generator().manual_seed(0)) * 3
    w[:128, :128] *= 100  # one block with a very different range
    if shape[0] > 128 and shape[1] > 128:
        w[128:, 128:] = 0  # an all-zero ragged edge block
    q, scale = quantize_weight(w)
    q_ref, scale_ref = deepseek_reference_quantize(w)
    assert q.dtype == torch.float8_e4m3fn and scale.dtype == torch.float32
    assert scale.shape == (math.ceil(shape[0] / 128), math.ceil(shape[1] / 128))
    assert torch.equal(q.view(torch.uint8), q_ref.view(torch.uint8))
    assert torch.equal(scale, scale_ref)


def test_bf16_weight_quantizes_like_its_float32_value():
    w = torch.randn(200, 300).to(torch.bfloat16)
    q, s = quantize_weight(w)
    q32, s32 = quantize_weight(w.float())
    assert torch.equal(q.view(torch.uint8), q32.view(torch.uint8)) and torch.equal(s, s32)


def test_dequantize_round_trip_error_is_e4m3_sized():
    w = torch.randn(384, 256)
    back = dequantize_weight(*quantize_weight(w))
    rel = (back - w).abs() / w.abs().clamp_min(1e-3)
    assert rel.median() < 0.04  # 3 mantissa bits: at most 2^-4 relative rounding per element
    assert ((back - w).norm() / w.norm()) < 0.04


def test_quantize_refuses_non_finite_weight():
    w = torch.randn(4, 4)
    w[0, 0] = float("inf")
    with pytest.raises(ValueError, match="inf or nan"):
        quantize_weight(w)


def test_activation_quantization_is_per_token_1x128():
    x = torch.randn(3, 300)
    x[1] *= 50  # a loud token must not change the other tokens' scales
    q, scale = quantize_activation(x)
    assert q.shape == x.shape and scale.shape == (3, 3)
    for t in range(3):
        for g in range(3):
            group = x[t, g * 128 : (g + 1) * 128]
            assert scale[t, g] == group.abs().max() / 448
            assert torch.equal(
                q[t, g * 128 : (g + 1) * 128].view(torch.uint8),
                (group / scale[t, g]).to(torch.float8_e4m3fn).view(torch.uint8),
            )


def test_table_decodes_every_e4m3_code():
    codes = torch.arange(256, dtype=torch.uint8)
    finite = (codes & 0x7F) != 0x7F
    table = e4m3_table()
    assert torch.equal(table[finite], codes[finite].view(torch.float8_e4m3fn).float())
    assert table[~finite].isnan().all()


def test_cpu_kernel_builds():
    # The fast CPU path is part of the product: a missing compiler must fail loudly here.
    assert fp8_cpu.available()


@pytest.mark.parametrize(
    "kernel", ["reference", "table_dequant", "cpu_fused", "cpu_blocked", "cpu_panels"]
)
@pytest.mark.parametrize("m,n,k", [(1, 256, 384), (5, 300, 200), (40, 129, 1000)])
def test_every_cpu_kernel_is_within_3_percent_of_fp32(kernel, m, n, k):
    g = torch.Generator().manual_seed(m + n + k)
    w, x = torch.randn(n, k, generator=g), torch.randn(m, k, generator=g)
    q, scale = quantize_weight(w)
    run = _KERNELS[kernel][0]
    if kernel == "cpu_fused" and m > fp8_cpu.MAX_FUSED_ROWS:
        with pytest.raises(RuntimeError):
            run(x, q, scale)
        return
    y, exact = run(x, q, scale), F.linear(x, w)
    assert ((y - exact).norm() / exact.norm()) < 0.03
    # ...and every kernel computes the same product as the reference path.
    ref = _KERNELS["reference"][0](x, q, scale)
    assert torch.allclose(y, ref, rtol=1e-4, atol=1e-4 * ref.abs().max().item())


def test_bf16_cpu_kernel_stays_within_its_rounding():
    # The bf16-product kernel rounds inputs and weights to bf16 (about 0.4%), far inside
    # the 3% FP8 budget, and returns float32.
    g = torch.Generator().manual_seed(7)
    w, x = torch.randn(384, 512, generator=g), torch.randn(300, 512, generator=g)
    q, scale = quantize_weight(w)
    ref = _KERNELS["reference"][0](x, q, scale)
    y = _KERNELS["cpu_dequant_bf16"][0](x, q, scale)
    err = ((y - ref).norm() / ref.norm()).item()
    assert 0 < err < 1e-2 and y.dtype == torch.float32


@pytest.mark.parametrize("fast", [True, False])
def test_bf16_kernel_is_a_candidate_only_where_bf16_dot_products_are_native(fast, monkeypatch):
    import inference.fp8 as fp8_mod

    if not fast:
        monkeypatch.setattr(fp8_mod, "_cpu_bf16_fast", lambda: False)
    native = fp8_mod._cpu_bf16_fast()  # this machine's answer when not patched
    assert bf16_matmul_is_fast("cpu") == native and bf16_matmul_is_fast("cuda")
    q, scale = quantize_weight(torch.randn(128, 256))
    kernels = FP8Kernels()
    fp8_linear(torch.randn(64, 256), q, scale, None, torch.float32, kernels)
    timings = kernels.timings[("cpu", torch.float32, 64, 128, 256)]
    assert ("cpu_dequant_bf16" in timings) == native
    assert {"reference", "cpu_blocked"} <= set(timings)


def test_bf16_training_products_pad_rows_to_few_shapes_and_change_nothing():
    """Training's bf16 products pad the rows to a bucket (oneDNN compiles a kernel per new
    shape): under 16 or 12.5% more rows, few buckets, and the real rows' values as unpadded."""
    from inference.fp8 import _row_bucket, bucketed_product

    buckets = {_row_bucket(m) for m in range(1, 2049)}
    assert len(buckets) <= 70
    assert all(m <= _row_bucket(m) < m + max(16, m / 8) for m in range(1, 2049))
    w = torch.randn(96, 64).bfloat16()
    for rows in (1, 17, 300):
        x = torch.randn(rows, 64)
        y = bucketed_product(F.linear, x, w, torch.bfloat16)
        assert y.shape == (rows, 96) and y.dtype == torch.float32
        torch.testing.assert_close(y, F.linear(x.bfloat16(), w).float(), rtol=1e-2, atol=1e-2)
        g = bucketed_product(torch.mm, torch.randn(rows, 96), w, torch.bfloat16)
        assert g.shape == (rows, 64)


def test_cpu_kernel_decodes_all_codes_exactly():
    codes = torch.arange(256, dtype=torch.uint8)
    codes = codes[(codes & 0x7F) != 0x7F]
    q = codes.view(torch.float8_e4m3fn).reshape(1, -1)
    scale = torch.ones(1, math.ceil(q.shape[1] / 128))
    eye = torch.eye(q.shape[1])
    assert torch.equal(fp8_cpu.gemm_panels(eye, q, scale)[:, 0], q.float()[0])
    assert torch.equal(fp8_cpu.gemm_fused(eye[:1], q, scale)[0], q.float()[0, :1])
    assert torch.equal(fp8_cpu.gemm_blocked(eye[:5], q, scale)[:, 0], q.float()[0, :5])


@pytest.mark.parametrize("shape", [(256, 384), (300, 200), (5, 130)])
def test_c_dequantize_equals_the_reference_bit_for_bit(shape):
    torch.manual_seed(3)
    q, scale = quantize_weight(torch.randn(*shape) * 0.05)
    assert torch.equal(fp8_cpu.dequantize(q, scale), dequantize_weight(q, scale))
    codes = torch.arange(256, dtype=torch.uint8)
    q = codes[(codes & 0x7F) != 0x7F].view(torch.float8_e4m3fn).reshape(2, -1)
    scale = torch.full((1, 1), 0.375)
    assert torch.equal(fp8_cpu.dequantize(q, scale), dequantize_weight(q, scale))


def test_each_model_linear_fp8_within_3_percent():
    from inference import ModelConfig

    config = ModelConfig.from_hf_dict({**BASE_V3, "model_type": "deepseek_v3"})
    torch.manual_seed(0)
    model = Transformer(config)
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(linears) > 20
    kernels = FP8Kernels()
    for name, linear in linears:
        torch.nn.init.normal_(linear.weight)
        x = torch.randn(64, linear.in_features)
        fp8 = FP8Linear.from_linear(linear, kernels=kernels)
        assert fp8.weight.dtype == torch.float8_e4m3fn, name
        exact = linear(x)
        assert ((fp8(x) - exact).norm() / exact.norm()) < 0.03, name


def test_dispatch_measures_once_per_shape_class_and_per_engine():
    w = torch.randn(256, 256)
    q, scale = quantize_weight(w)
    a, b = FP8Kernels(), FP8Kernels(force="reference")
    fp8_linear(torch.randn(3, 256), q, scale, None, torch.float32, a)
    fp8_linear(torch.randn(4, 256), q, scale, None, torch.float32, a)  # same class: 3, 4 -> 4
    assert list(a.choice) == [("cpu", torch.float32, 4, 256, 256)]
    timings = a.timings[("cpu", torch.float32, 4, 256, 256)]
    assert {"reference", "table_dequant", "cpu_fused", "cpu_blocked", "cpu_panels"} <= set(timings)
    assert a.choice[("cpu", torch.float32, 4, 256, 256)] == min(timings, key=timings.get)
    fp8_linear(torch.randn(3, 256), q, scale, None, torch.float32, b)
    assert b.choice == {}  # forced: never measures, never touches another engine's choices
    with pytest.raises(ValueError, match="unknown FP8 kernel"):
        FP8Kernels(force="magic")


def test_fp8_linear_keeps_float8_bytes_and_bias():
    linear = torch.nn.Linear(200, 130, bias=True)
    fp8 = FP8Linear.from_linear(linear)
    assert fp8.weight.dtype == torch.float8_e4m3fn and fp8.weight.element_size() == 1
    assert fp8.weight_scale_inv.shape == (2, 2)
    x = torch.randn(2, 200)
    assert ((fp8(x) - linear(x)).norm() / linear(x).norm()) < 0.03
    assert isinstance(fp8, torch.nn.Linear)


def test_peft_lora_on_fp8_linear_keeps_adapter_in_compute_dtype():
    from peft import LoraConfig, get_peft_model

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.q_a_proj = FP8Linear.from_linear(torch.nn.Linear(256, 128, bias=False))

        def forward(self, x):
            return self.q_a_proj(x)

    model = get_peft_model(Tiny(), LoraConfig(r=4, lora_alpha=8, target_modules=["q_a_proj"]))
    layer = model.base_model.model.q_a_proj
    assert layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.lora_B["default"].weight.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.float8_e4m3fn
    x = torch.randn(3, 256)
    base = layer.base_layer(x)
    assert torch.equal(model(x), base)  # B starts at zero
    with torch.no_grad():
        layer.lora_B["default"].weight.normal_()
    assert not torch.allclose(model(x), base)
    # Only the adapter trains.
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)


def test_gradient_flows_through_frozen_fp8_layers_for_lora():
    """LoRA on an FP8 model trains adapters in early layers: the input gradient must pass
    through later FP8 linears, whatever kernel the dispatch picked."""
    from peft import LoraConfig, get_peft_model

    from inference.checkpoint import load_model, save_checkpoint

    config = ModelConfig.from_hf_dict(
        {**BASE_V3, "model_type": "deepseek_v3", "num_hidden_layers": 2}
    )
    torch.manual_seed(0)
    path = Path(tempfile.mkdtemp())
    save_checkpoint(Transformer(config), path)
    for kernel in ("cpu_blocked", "reference"):
        model = load_model(path, fp8=True, fp8_kernels=FP8Kernels(force=kernel))
        lora = get_peft_model(
            model, LoraConfig(r=4, target_modules=["q_a_proj", "kv_b_proj", "down_proj"])
        )
        ids = torch.randint(0, config.vocab_size, (1, 6))
        lora(ids).square().mean().backward()
        first = lora.base_model.model.model.layers[0].self_attn.q_a_proj.lora_B["default"].weight
        assert first.grad is not None and first.grad.abs().sum() > 0, kernel
    # The input gradient of one FP8 linear is the one through its dequantised weight.
    layer = FP8Linear.from_linear(
        torch.nn.Linear(256, 130, bias=False), kernels=FP8Kernels(force="cpu_blocked")
    )
    x = torch.randn(3, 256, requires_grad=True)
    layer(x).sum().backward()
    assert torch.allclose(x.grad, layer.dequantized_weight().sum(0).expand(3, -1), atol=1e-5)
