"""LoRA on the engine's model through peft: FP8 bases, target sets, PEFT files, merging.

Every model is a tiny random transformers DeepseekV3 (hidden 64, 2 layers: one dense, one
MoE with 4 routed experts and a shared expert) saved into tmp_path; nothing is downloaded.
"""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

import inference
from finetune import lora
from inference.fp8 import FP8_DTYPE, FP8Linear

TINY = {
    "vocab_size": 96,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
    "n_routed_experts": 4,
    "num_experts_per_tok": 2,
    "n_shared_experts": 1,
    "n_group": 1,
    "topk_group": 1,
    "first_k_dense_replace": 1,
    "max_position_embeddings": 64,
}


def _randomize(model: torch.nn.Module, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)


@pytest.fixture(autouse=True)
def one_thread():
    """The test machine's cores are shared: one thread runs these tiny matmuls ~10x faster
    than two fighting over a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """(full-width HF checkpoint dir, FP8 checkpoint dir of the same weights)."""
    root = tmp_path_factory.mktemp("lora_models")
    torch.manual_seed(0)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config(**TINY)).eval()
    _randomize(hf, 0)
    hf.save_pretrained(str(root / "hf"))
    inference.save_checkpoint(inference.load_model(root / "hf", fp8=True), root / "fp8")
    return root / "hf", root / "fp8"


def _ids(n: int = 2, t: int = 12, seed: int = 1) -> torch.Tensor:
    return torch.randint(
        0, TINY["vocab_size"], (n, t), generator=torch.Generator().manual_seed(seed)
    )


def _perturb_lora(peft_model: PeftModel, seed: int = 3, std: float = 0.02) -> None:
    """LoRA B starts at zero (a no-op adapter); give it values so comparisons mean something."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def _expected_count(c: dict, targets: set[str], r: int) -> int:
    """LoRA parameters r * (in + out) per adapted linear, from the config alone."""
    h, heads = c["hidden_size"], c["num_attention_heads"]
    qk = c["qk_nope_head_dim"] + c["qk_rope_head_dim"]
    n_dense = c["first_k_dense_replace"]
    n_moe = c["num_hidden_layers"] - n_dense
    moe_i, shared_i = c["moe_intermediate_size"], c["moe_intermediate_size"] * c["n_shared_experts"]
    total = 0
    if "mla" in targets:
        per_layer = (
            (h + c["q_lora_rank"])  # q_a_proj
            + (c["q_lora_rank"] + heads * qk)  # q_b_proj
            + (h + c["kv_lora_rank"] + c["qk_rope_head_dim"])  # kv_a_proj_with_mqa
            + (c["kv_lora_rank"] + heads * (c["qk_nope_head_dim"] + c["v_head_dim"]))  # kv_b
            + (heads * c["v_head_dim"] + h)  # o_proj
        )
        total += c["num_hidden_layers"] * per_layer
    if "mlp" in targets:  # gate, up and down each have h and i as their two sides
        total += n_dense * 3 * (h + c["intermediate_size"]) + n_moe * 3 * (h + shared_i)
    if "experts" in targets:
        total += n_moe * c["n_routed_experts"] * 3 * (h + moe_i)
    if "router" in targets:  # peft's parameter LoRA on the [E, h] router weight
        total += n_moe * (h + c["n_routed_experts"])
    return r * total


def _trainable(peft_model) -> dict[str, torch.Tensor]:
    return {n: p for n, p in peft_model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("adapter_dtype", [torch.float32, torch.bfloat16])
def test_fp8_base_stays_fp8_and_frozen_adapters_are_wide(checkpoints, adapter_dtype):
    model = inference.load_model(checkpoints[1])  # FP8 as stored
    peft_model = lora.apply_lora(model, ("mla", "mlp"), r=4, adapter_dtype=adapter_dtype)
    fp8_layers = [m for m in peft_model.modules() if isinstance(m, FP8Linear)]
    assert len(fp8_layers) > 20
    assert all(m.weight.dtype == FP8_DTYPE and not m.weight.requires_grad for m in fp8_layers)
    trainable = _trainable(peft_model)
    assert trainable and all("lora_" in n for n in trainable)
    assert {p.dtype for p in trainable.values()} == {adapter_dtype}
    # The forward runs and gives finite logits in the model's compute dtype.
    logits = peft_model(_ids())
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()


@pytest.mark.parametrize(
    "targets",
    [("mla",), ("mlp",), ("mla", "mlp"), ("experts",), ("router",), ("mla", "mlp", "experts")],
)
def test_target_sets_have_the_parameter_count_the_config_implies(checkpoints, targets):
    model = inference.load_model(checkpoints[1])
    peft_model = lora.apply_lora(model, targets, r=4)
    count = sum(p.numel() for p in _trainable(peft_model).values())
    assert count == _expected_count(TINY, set(targets), r=4)


def test_routed_experts_and_router_are_adapted_only_when_asked(checkpoints):
    adapted = lora.adapted_module_names(
        lora.apply_lora(inference.load_model(checkpoints[1]), ("mla", "mlp"), r=4)
    )
    assert "model.layers.0.mlp.gate_proj" in adapted  # dense layer
    assert "model.layers.1.mlp.shared_experts.down_proj" in adapted
    assert not [n for n in adapted if ".experts." in n or n.endswith("mlp.gate")]

    with_experts = lora.adapted_module_names(
        lora.apply_lora(inference.load_model(checkpoints[1]), ("experts",), r=4)
    )
    assert len(with_experts) == TINY["n_routed_experts"] * 3
    assert all(".mlp.experts." in n for n in with_experts)


def test_plain_peft_rewrites_dense_mlp_targets_which_is_why_apply_lora_guards(checkpoints):
    """peft 0.21 maps gate/up/down_proj targets on any deepseek_v3 model to the fused routed
    experts. This pins that behaviour: if peft drops it, the guard can go too."""
    dense = ["model.layers.0.mlp.gate_proj", "model.layers.0.mlp.up_proj"]
    ours = inference.load_model(checkpoints[0])
    plain = get_peft_model(ours, LoraConfig(r=4, target_modules=[*dense, "q_a_proj"]))
    got = lora.adapted_module_names(plain)
    assert not set(dense) & set(got)  # silently dropped

    hf = DeepseekV3ForCausalLM.from_pretrained(str(checkpoints[0])).eval()
    plain_hf = get_peft_model(hf, LoraConfig(r=4, target_modules=list(dense)))
    got_hf = lora.adapted_module_names(plain_hf)
    assert got_hf == ["model.layers.1.mlp.experts"]  # the routed experts, not the dense MLP


def test_adapter_files_load_onto_transformers_deepseek_with_the_same_logits(checkpoints, tmp_path):
    hf_dir = checkpoints[0]
    # One float32 kernel record for every model loaded here: models that measure their
    # kernels separately may pick different ones, and "identical" below means bit for bit.
    kernels = inference.LinearKernels(force="mkl")
    peft_model = lora.apply_lora(
        inference.load_model(hf_dir, linear_kernels=kernels), ("mla", "mlp"), r=4
    )
    _perturb_lora(peft_model)
    files = lora.adapter_files(peft_model)
    assert set(files) == {"adapter_config.json", "adapter_model.safetensors"}

    ids = _ids()
    with torch.no_grad():
        ours = peft_model(ids)
        base = inference.load_model(hf_dir)(ids)
    assert ((ours - base).abs().max() / base.abs().max()).item() > 1e-2  # the adapter matters

    # Our own loader, from bytes: identical.
    reloaded = lora.load_adapter(inference.load_model(hf_dir, linear_kernels=kernels), files)
    with torch.no_grad():
        assert torch.equal(reloaded(ids), ours)

    # peft's loader on transformers' model, from the files on disk (test data only).
    adapter_dir = tmp_path / "adapter"
    adapter_dir.mkdir()
    for name, data in files.items():
        (adapter_dir / name).write_bytes(data)
    hf = DeepseekV3ForCausalLM.from_pretrained(str(hf_dir)).eval()
    with lora.without_moe_target_rewrite(hf):
        hf_peft = PeftModel.from_pretrained(hf, str(adapter_dir))
    assert lora.adapted_module_names(hf_peft) == lora.adapted_module_names(peft_model)
    with torch.no_grad():
        theirs = hf_peft(ids).logits
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() < 1e-4


def test_gradients_flow_through_fp8_layers_as_through_dequantised_ones(checkpoints):
    fp8_model = inference.load_model(checkpoints[1])
    for m in fp8_model.modules():
        if isinstance(m, FP8Linear):  # a C kernel: its result has no autograd of its own
            m.kernels = inference.FP8Kernels(force="cpu_panels")
    wide_model = inference.load_model(checkpoints[1], fp8=False)
    grads = []
    for model in (fp8_model, wide_model):
        peft_model = lora.apply_lora(model, ("mla", "mlp"), r=4)
        _perturb_lora(peft_model)
        torch.manual_seed(7)  # same LoRA A init in both
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                with torch.no_grad():
                    p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
        logits = peft_model(_ids())
        logits.float().pow(2).mean().backward()
        grads.append({n: p.grad.clone() for n, p in _trainable(peft_model).items()})
    fp8_grads, wide_grads = grads
    first = "base_model.model.model.layers.0.self_attn.q_a_proj.lora_A.default.weight"
    assert fp8_grads[first].abs().sum() > 0  # reached the bottom of the model
    for name, g in wide_grads.items():
        assert torch.allclose(fp8_grads[name], g, rtol=1e-3, atol=1e-6), name


def test_merge_into_wide_copies_keeps_the_logits(checkpoints):
    peft_model = lora.apply_lora(inference.load_model(checkpoints[1]), ("mla", "mlp"), r=4)
    _perturb_lora(peft_model)
    ids = _ids()
    with torch.no_grad():
        want = peft_model(ids)
    merged, report = lora.merge_lora(peft_model, dtype=torch.float32)
    assert not any(isinstance(m, FP8Linear) for m in merged.modules())
    assert report.modules == lora.adapted_module_names(peft_model) and not report.fp8
    with torch.no_grad():
        got = merged(ids)
    assert ((got - want).abs().max() / want.abs().max()).item() < 1e-5

    merged_bf16, _ = lora.merge_lora(peft_model, dtype=torch.bfloat16)
    q_a = merged_bf16.model.layers[0].self_attn.q_a_proj
    assert q_a.weight.dtype == torch.bfloat16
    assert merged_bf16.model.layers[1].mlp.gate.weight.dtype == torch.float32  # router wide
    with torch.no_grad():
        got_bf16 = merged_bf16(ids).float()
    assert ((got_bf16 - want).abs().max() / want.abs().max()).item() < 5e-2
    # The source model is untouched: still FP8 with adapters.
    assert isinstance(
        peft_model.get_base_model().model.layers[0].self_attn.q_a_proj.base_layer, FP8Linear
    )


def test_merge_into_fp8_requantises_and_reports_the_error(checkpoints, tmp_path):
    peft_model = lora.apply_lora(inference.load_model(checkpoints[1]), ("mla",), r=4)
    _perturb_lora(peft_model, std=0.05)
    merged, report = lora.merge_lora(peft_model, fp8=True)
    assert report.fp8 and set(report.weight_rel_error) == set(report.modules)
    name = "model.layers.0.self_attn.kv_b_proj"
    layer = merged.get_submodule(name)
    assert isinstance(layer, FP8Linear) and layer.weight.dtype == FP8_DTYPE
    # Recompute the reported error for one module from its parts.
    wrapper = peft_model.get_base_model().get_submodule(name)
    want = wrapper.base_layer.dequantized_weight() + wrapper.get_delta_weight("default")
    err = ((layer.dequantized_weight() - want).norm() / want.norm()).item()
    assert err == pytest.approx(report.weight_rel_error[name], rel=1e-4)
    # e4m3 keeps 3 mantissa bits: a few percent of the weight, never more than ~7 %.
    assert 0 < report.max_weight_rel_error < 0.07
    assert 0 < report.max_delta_rel_error < 1.0
    assert json.loads(json.dumps(report.to_dict()))["max_weight_rel_error"] == pytest.approx(
        report.max_weight_rel_error
    )
    ids = _ids()
    with torch.no_grad():
        want_logits, got = peft_model(ids), merged(ids)
    assert ((got - want_logits).abs().max() / want_logits.abs().max()).item() < 0.5
    # The merged copy is an ordinary engine checkpoint.
    inference.save_checkpoint(merged, tmp_path / "merged")
    with torch.no_grad():
        reloaded = inference.load_model(tmp_path / "merged")(ids)
    # Same weights; the loaded model may pick another FP8 kernel (another summation order).
    assert ((reloaded - got).abs().max() / got.abs().max()).item() < 1e-5


def test_bad_targets_and_adapter_files_are_refused(checkpoints):
    model = inference.load_model(checkpoints[1])
    with pytest.raises(lora.LoraError, match="unknown LoRA target"):
        lora.apply_lora(model, ("attention",))
    with pytest.raises(lora.LoraError, match="missing"):
        lora.load_adapter(model, {"adapter_config.json": b"{}"})


def test_the_serving_engine_reads_our_adapter_files(checkpoints, tmp_path):
    from inference.lora import load_adapter as serving_load_adapter

    model = inference.load_model(checkpoints[1])
    peft_model = lora.apply_lora(model, ("mla", "mlp", "router"), r=4, alpha=8)
    _perturb_lora(peft_model)
    for name, data in lora.adapter_files(peft_model).items():
        (tmp_path / name).write_bytes(data)
    served = serving_load_adapter(
        tmp_path, inference.load_model(checkpoints[1]), torch.float32, "cpu"
    )
    assert sorted(served.weights) == lora.adapted_module_names(peft_model)
    base = peft_model.get_base_model()
    for name, (a, b, scale) in served.weights.items():
        assert scale == 2.0  # alpha / r
        delta = base.get_submodule(name).get_delta_weight("default")
        assert torch.allclose(scale * b @ a, delta.reshape(b.shape[0], a.shape[1]), atol=1e-6), name


def test_training_keeps_no_wide_copy_of_fp8_weights_for_backward(checkpoints):
    peft_model = lora.apply_lora(inference.load_model(checkpoints[1]), ("mla", "mlp"), r=4)
    _perturb_lora(peft_model)
    fp8_shapes = {tuple(m.weight.shape) for m in peft_model.modules() if isinstance(m, FP8Linear)}
    saved = []

    def pack(t):
        saved.append((tuple(t.shape), t.dtype))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        # 11 tokens: no activation (11 or 22 routed rows) shares a shape with a weight.
        loss = peft_model(_ids(n=1, t=11)).float().pow(2).mean()
    wide = [s for s in saved if s[0] in fp8_shapes and s[1] != FP8_DTYPE]
    assert saved and not wide  # only float8 bytes (and scales) wait for backward
    assert any(dtype == FP8_DTYPE for _, dtype in saved)
    loss.backward()
    grads = [
        p.grad for n, p in peft_model.named_parameters() if "layers.0.self_attn.q_b_proj.lora_" in n
    ]
    assert len(grads) == 2 and all(g is not None and g.abs().sum() > 0 for g in grads)


def _loss_and_grads(peft_model: PeftModel) -> tuple[torch.Tensor, list[torch.Tensor]]:
    peft_model.zero_grad(set_to_none=True)
    loss = peft_model(_ids(n=2, t=11)).float().pow(2).mean()
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in peft_model.parameters() if p.requires_grad]


def test_kept_dequantised_weights_change_nothing_but_the_cost(checkpoints):
    peft_model = lora.apply_lora(inference.load_model(checkpoints[1]), ("mla", "mlp"), r=4)
    _perturb_lora(peft_model)
    layers = [m for m in peft_model.modules() if isinstance(m, FP8Linear)]
    loss, grads = _loss_and_grads(peft_model)  # apply_lora's default: decode on every use
    assert all(m.dense is None for m in layers)

    assert lora.prepare_fp8_for_training(peft_model, torch.float32, cache_mb=64) == len(layers)
    assert all(m.dense is not None and m.dense.dtype == torch.float32 for m in layers)
    kept_loss, kept_grads = _loss_and_grads(peft_model)
    assert torch.equal(loss, kept_loss)  # bitwise: the same exact weights, the same products
    assert all(torch.equal(a, b) for a, b in zip(grads, kept_grads, strict=True))

    # A budget that holds the first layer but not all of them: the rest decode per use.
    first = layers[0].weight.numel() * 4 / 2**20
    lora.prepare_fp8_for_training(peft_model, torch.float32, cache_mb=first)
    kept = [m.dense is not None for m in layers]
    assert kept[0] and not all(kept)
    part_loss, part_grads = _loss_and_grads(peft_model)
    assert torch.equal(loss, part_loss)
    assert all(torch.equal(a, b) for a, b in zip(grads, part_grads, strict=True))


def test_bf16_base_matmuls_stay_close_to_fp32_and_keep_adapters_fp32(checkpoints):
    peft_model = lora.apply_lora(inference.load_model(checkpoints[1]), ("mla", "mlp"), r=4)
    _perturb_lora(peft_model)
    loss, grads = _loss_and_grads(peft_model)
    lora.prepare_fp8_for_training(peft_model, torch.bfloat16, cache_mb=64)
    layers = [m for m in peft_model.modules() if isinstance(m, FP8Linear)]
    assert all(m.dense.dtype == torch.bfloat16 for m in layers)
    bf_loss, bf_grads = _loss_and_grads(peft_model)
    assert not torch.equal(loss, bf_loss)  # the products really ran in bf16
    assert bf_loss.item() == pytest.approx(loss.item(), rel=2e-2)
    for a, b in zip(grads, bf_grads, strict=True):
        assert b.dtype == torch.float32
        assert ((a - b).norm() / a.norm()).item() < 5e-2
    assert all(p.dtype == torch.float32 for p in peft_model.parameters() if p.requires_grad)
    lora.prepare_fp8_for_training(peft_model, torch.bfloat16, cache_mb=0)  # decode per use
    assert torch.equal(_loss_and_grads(peft_model)[0], bf_loss)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_fp8_lora_layers_compute_what_peft_computes(checkpoints, dtype):
    """Every adapted FP8 layer runs as one fused node (FP8LoraLinear); loss and gradients
    equal peft's own five-node forward, with the kept weights and decoding per use, and
    with the adapter disabled both give the base model."""
    peft_model = lora.apply_lora(inference.load_model(checkpoints[1]), ("mla", "mlp"), r=4)
    _perturb_lora(peft_model)
    fused = [m for m in peft_model.modules() if isinstance(m, lora.FP8LoraLinear)]
    assert fused and all(isinstance(m.base_layer, FP8Linear) for m in fused)
    for cache_mb in (64, 0):
        lora.prepare_fp8_for_training(peft_model, dtype, cache_mb=cache_mb)
        loss, grads = _loss_and_grads(peft_model)
        for m in fused:
            m.__class__ = lora.PeftLoraLinear
        ref_loss, ref_grads = _loss_and_grads(peft_model)
        for m in fused:
            m.__class__ = lora.FP8LoraLinear
        assert loss.item() == pytest.approx(ref_loss.item(), rel=1e-5)
        for a, b in zip(grads, ref_grads, strict=True):
            assert ((a - b).norm() / b.norm()).item() < 1e-5
    ids = _ids()
    with torch.no_grad(), peft_model.disable_adapter():
        off = peft_model(ids)
    base = inference.load_model(checkpoints[1])
    lora.prepare_fp8_for_training(base, dtype, cache_mb=64)
    with torch.no_grad():
        assert torch.equal(off, base(ids))
