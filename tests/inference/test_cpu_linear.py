"""The measured float32 linear dispatch: same results as F.linear, one measurement per shape
class, plain F.linear whenever autograd records, nothing copied."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from inference.cpu_linear import KERNELS, DispatchLinear, LinearKernels, use_measured_linear
from inference.fp8 import FP8Kernels, FP8Linear


@pytest.mark.parametrize("kernel", sorted(KERNELS))
@pytest.mark.parametrize("shape", [(1, 64), (7, 64), (3, 5, 64), (130, 64), (2, 77)])
def test_every_kernel_matches_f_linear(kernel, shape):
    if kernel == "c_small" and len(shape) == 2 and shape[0] > 16:
        shape = (16, shape[1])  # its limit; above it the dispatch never picks it
    torch.manual_seed(0)
    lin = nn.Linear(shape[-1], 96, bias=kernel != "onednn")
    use_measured_linear(lin, LinearKernels(force=kernel))
    x = torch.randn(*shape)
    with torch.no_grad():
        got, want = lin(x), F.linear(x, lin.weight, lin.bias)
    assert got.shape == want.shape == (*shape[:-1], 96)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-6)


def test_conversion_keeps_parameters_and_skips_other_linears():
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 8, bias=False))
    model.append(FP8Linear.from_linear(nn.Linear(128, 128), torch.float32, FP8Kernels()))
    weights = [model[0].weight, model[2].weight]
    kernels = use_measured_linear(model)
    assert type(model[0]) is DispatchLinear and type(model[2]) is DispatchLinear
    assert type(model[3]) is FP8Linear  # subclasses are left alone
    assert model[0].kernels is kernels is model[2].kernels
    assert [model[0].weight, model[2].weight] == weights  # the same Parameter objects
    assert isinstance(model[0], nn.Linear)  # peft and target selection still see a Linear
    assert set(model.state_dict()) == {
        "0.weight",
        "0.bias",
        "2.weight",
        "3.weight",
        "3.bias",
        "3.weight_scale_inv",
    }


def test_measures_once_per_shape_class_and_records_timings():
    lin = nn.Linear(32, 48)
    kernels = use_measured_linear(lin)
    with torch.no_grad():
        lin(torch.randn(5, 32))
        lin(torch.randn(7, 32))  # same bucket (8 rows): no second measurement
        lin(torch.randn(1, 32))
    assert set(kernels.choice) == {(8, 48, 32), (1, 48, 32)}
    for key, times in kernels.timings.items():
        assert kernels.choice[key] in times and "mkl" in times
        assert ("c_small" in times) == (key[0] <= 16)  # the small kernel takes <= 16 rows
        assert all(t > 0 for t in times.values())
    with pytest.raises(ValueError, match="unknown linear kernel"):
        LinearKernels(force="cublas")


def test_autograd_uses_f_linear_and_gradients_are_exact():
    torch.manual_seed(1)
    lin = nn.Linear(16, 8)
    use_measured_linear(lin, LinearKernels(force="onednn"))
    x = torch.randn(4, 16, requires_grad=True)
    lin(x).square().sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    F.linear(ref, lin.weight.detach(), lin.bias.detach()).square().sum().backward()
    assert torch.equal(x.grad, ref.grad)
    assert lin.weight.grad is not None
