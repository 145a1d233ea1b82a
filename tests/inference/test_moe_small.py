"""The decode-sized routed-experts kernel (fp8_cpu.moe_small, one C call per MoE layer)
computes what the model's own grouped dispatch computes, and the serving step uses it only
where it applies."""

from __future__ import annotations

import pytest
import torch

from inference import fp8_cpu, load_model
from inference.decode import LatentRunner
from inference.kv_cache import PagedLatentCache
from inference.model import MoE
from tests.inference.hf_factory import hf_model, save_hf


def _moes(model):
    return [
        (i, layer.mlp) for i, layer in enumerate(model.model.layers) if isinstance(layer.mlp, MoE)
    ]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    # V3 routing with groups and the correction bias; 8 experts, 3 per token.
    hf = hf_model(
        {"n_routed_experts": 8, "num_experts_per_tok": 3, "n_group": 2, "topk_group": 1}, seed=3
    )
    return save_hf(hf, tmp_path_factory.mktemp("moe") / "m")


@pytest.mark.parametrize("fp8", [False, True])
@pytest.mark.parametrize("rows", [1, 2, 5, 16])
def test_one_call_equals_the_grouped_dispatch_for_decode_sized_batches(model_dir, rows, fp8):
    model = load_model(model_dir, fp8=fp8)
    g = torch.Generator().manual_seed(rows)
    with torch.inference_mode():
        for _, moe in _moes(model):
            x = torch.randn(rows, model.config.hidden_size, generator=g)
            weights, indices = moe.gate(x)
            table = fp8_cpu.ExpertTable(moe.experts)
            assert table.fp8 == fp8
            got = fp8_cpu.moe_small(x, indices, weights, table)
            if moe.shared_experts is not None:
                got = got + moe.shared_experts(x)
            want = moe(x)  # FP8: the same dequantised values, another summation order
            torch.testing.assert_close(got, want, rtol=1e-5 if not fp8 else 1e-4, atol=1e-5)


def test_too_many_rows_fp8_experts_and_replaced_weights_are_handled(model_dir):
    model = load_model(model_dir)
    i, moe = _moes(model)[0]
    table = fp8_cpu.ExpertTable(moe.experts)
    x = torch.randn(17, model.config.hidden_size)
    weights, indices = moe.gate(x)
    with pytest.raises(RuntimeError, match="at most 16"):
        fp8_cpu.moe_small(x, indices, weights, table)
    mixed = list(moe.experts)
    mixed[1] = _moes(load_model(model_dir, fp8=True))[0][1].experts[1]
    with pytest.raises(RuntimeError, match="all alike"):
        fp8_cpu.ExpertTable(mixed)  # one FP8 expert among float32 ones

    runner = LatentRunner(
        model, PagedLatentCache(model.config.num_hidden_layers, 8, kv_cache_bytes=1 << 16)
    )
    x1 = torch.randn(1, model.config.hidden_size)
    first = runner._expert_table(i, moe, x1)
    assert first is not None and runner._expert_table(i, moe, x1) is first  # kept
    moe.experts[0].gate_proj.weight = torch.nn.Parameter(
        torch.zeros_like(moe.experts[0].gate_proj.weight)
    )
    again = runner._expert_table(i, moe, x1)
    assert again is not first and again.matches(moe.experts)  # rebuilt for the new weights
    with torch.inference_mode():
        torch.testing.assert_close(
            runner._feed_forward(i, moe, x1, None), moe(x1), rtol=1e-5, atol=1e-6
        )

    fp8_model = load_model(model_dir, fp8=True)
    j, fp8_moe = _moes(fp8_model)[0]
    cache = PagedLatentCache(fp8_model.config.num_hidden_layers, 8, kv_cache_bytes=1 << 16)
    fp8_runner = LatentRunner(fp8_model, cache)
    assert fp8_runner._expert_table(j, fp8_moe, x1).fp8  # FP8 experts: fp8_moe_small
    with torch.inference_mode():
        got = fp8_runner._feed_forward(j, fp8_moe, x1, None)
        torch.testing.assert_close(got, fp8_moe(x1), rtol=1e-4, atol=1e-5)
