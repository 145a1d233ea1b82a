"""Checkpoints: HF safetensors in and out, DeepSeek-V3 FP8, sharding, conversion, bad files."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from inference import CheckpointError, FP8Kernels, FP8Linear, load_model, save_checkpoint
from inference.fp8 import dequantize_weight
from tests.inference.hf_factory import hf_model, save_hf

IDS = torch.randint(0, 160, (1, 24), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    """A transformers-written V3 checkpoint and its reference logits."""
    model = hf_model(seed=7)
    path = save_hf(model, tmp_path_factory.mktemp("hf") / "ckpt")
    with torch.inference_mode():
        logits = model(IDS).logits
    return path, logits


def logits(model) -> torch.Tensor:
    with torch.inference_mode():
        return model(IDS)


def test_fp8_checkpoint_is_written_in_deepseek_format_and_round_trips_exactly(hf_dir, tmp_path):
    src, _ = hf_dir
    model = load_model(src, fp8=True, fp8_kernels=FP8Kernels(force="reference"))
    save_checkpoint(model, tmp_path / "fp8")
    config = json.loads((tmp_path / "fp8" / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "activation_scheme": "dynamic",
        "weight_block_size": [128, 128],
    }
    stored = load_file(tmp_path / "fp8" / "model.safetensors")
    name = "model.layers.1.mlp.experts.3.up_proj"
    assert stored[f"{name}.weight"].dtype == torch.float8_e4m3fn
    assert stored[f"{name}.weight_scale_inv"].dtype == torch.float32
    assert stored["model.layers.1.mlp.gate.weight"].dtype == torch.float32  # router stays wide
    assert stored["model.embed_tokens.weight"].dtype == torch.bfloat16

    # fp8=None keeps what is stored. Same kernel on both sides, so the logits are identical.
    again = load_model(tmp_path / "fp8", fp8_kernels=FP8Kernels(force="reference"))
    for key, tensor in again.state_dict().items():
        original = model.state_dict()[key]
        assert tensor.dtype == original.dtype, key
        if tensor.dtype == torch.float8_e4m3fn:
            assert torch.equal(tensor.view(torch.uint8), original.view(torch.uint8)), key
        else:
            assert torch.equal(tensor, original), key
    assert torch.equal(logits(again), logits(model))


def test_fp8_checkpoint_dequantises_on_request(hf_dir, tmp_path):
    src, _ = hf_dir
    save_checkpoint(load_model(src, fp8=True), tmp_path / "fp8")
    wide = load_model(tmp_path / "fp8", fp8=False)
    assert not any(isinstance(m, FP8Linear) for m in wide.modules())
    with safe_open(tmp_path / "fp8" / "model.safetensors", "pt") as f:
        name = "model.layers.0.self_attn.kv_b_proj"
        expect = dequantize_weight(
            f.get_tensor(f"{name}.weight"), f.get_tensor(f"{name}.weight_scale_inv")
        )
    assert torch.equal(wide.get_submodule(name).weight, expect)
    assert wide.config.quantization_config is None


def test_fp32_save_is_loadable_by_transformers(hf_dir, tmp_path):
    from transformers import DeepseekV3ForCausalLM

    src, ref = hf_dir
    ours = load_model(src)
    save_checkpoint(ours, tmp_path / "ours")
    theirs = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "ours").eval()
    with torch.inference_mode():
        assert torch.allclose(theirs(IDS).logits, ref, rtol=0, atol=1e-5 * ref.abs().max().item())


def test_sharded_checkpoint_with_index(hf_dir, tmp_path):
    src, ref = hf_dir
    save_checkpoint(load_model(src), tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) > 3 and all((tmp_path / "sharded" / f).exists() for f in files)
    got = logits(load_model(tmp_path / "sharded"))
    assert ((got - ref).abs().max() / ref.abs().max()) < 1e-4


def test_bf16_load_keeps_router_in_float32(hf_dir):
    src, ref = hf_dir
    model = load_model(src, dtype=torch.bfloat16)
    assert model.model.layers[1].mlp.experts[0].up_proj.weight.dtype == torch.bfloat16
    assert model.model.layers[1].mlp.gate.weight.dtype == torch.float32
    got = logits(model).float()
    assert got.dtype == torch.float32 and ((got - ref).norm() / ref.norm()) < 0.1


def test_fused_expert_layout_and_mtp_layers_load(hf_dir, tmp_path):
    """transformers-5 in-memory experts ([E, 2I, H] gate_up_proj, [E, H, I] down_proj) and a
    DeepSeek multi-token-prediction layer (layer id == num_hidden_layers, ignored)."""
    src, ref = hf_dir
    tensors = load_file(src / "model.safetensors")
    config = json.loads((src / "config.json").read_text())
    for layer in range(config["first_k_dense_replace"], config["num_hidden_layers"]):
        prefix = f"model.layers.{layer}.mlp.experts"
        e = range(config["n_routed_experts"])
        gate = [tensors.pop(f"{prefix}.{i}.gate_proj.weight") for i in e]
        up = [tensors.pop(f"{prefix}.{i}.up_proj.weight") for i in e]
        down = [tensors.pop(f"{prefix}.{i}.down_proj.weight") for i in e]
        tensors[f"{prefix}.gate_up_proj"] = torch.stack(
            [torch.cat([g, u]) for g, u in zip(gate, up, strict=True)]
        )
        tensors[f"{prefix}.down_proj"] = torch.stack(down)
    mtp = config["num_hidden_layers"]
    tensors[f"model.layers.{mtp}.eh_proj.weight"] = torch.zeros(4, 4)
    (tmp_path / "fused").mkdir()
    save_file(tensors, tmp_path / "fused" / "model.safetensors")
    (tmp_path / "fused" / "config.json").write_text(json.dumps(config))
    got = logits(load_model(tmp_path / "fused"))
    assert ((got - ref).abs().max() / ref.abs().max()) < 1e-4


def test_convert_cli(hf_dir, tmp_path):
    src, ref = hf_dir
    for to in ("fp8", "bf16"):
        proc = subprocess.run(
            [sys.executable, "-m", "inference.convert", str(src), str(tmp_path / to), "--to", to],
            capture_output=True,
            text=True,
        )
        assert proc.returncode == 0, proc.stderr
    assert any(isinstance(m, FP8Linear) for m in load_model(tmp_path / "fp8").modules())
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert f.get_tensor("lm_head.weight").dtype == torch.bfloat16
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "inference.convert",
            str(tmp_path / "nowhere"),
            str(tmp_path / "x"),
            "--to",
            "fp8",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 1 and "nowhere" in bad.stderr


# ---- bad files ------------------------------------------------------------------------------


def copy_checkpoint(src, dst):
    dst.mkdir()
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())
    return dst


def test_truncated_file_names_file_and_tensor(hf_dir, tmp_path):
    src, _ = hf_dir
    bad = copy_checkpoint(src, tmp_path / "bad")
    data = (bad / "model.safetensors").read_bytes()
    (bad / "model.safetensors").write_bytes(data[: len(data) - 1000])
    with pytest.raises(
        CheckpointError, match=r"model\.safetensors: truncated: tensor \S+ needs bytes"
    ):
        load_model(bad)
    (bad / "model.safetensors").write_bytes(data[:100])  # not even the whole header
    with pytest.raises(CheckpointError, match=r"model\.safetensors: truncated"):
        load_model(bad)


def test_missing_shard_names_file_and_tensor(hf_dir, tmp_path):
    src, _ = hf_dir
    save_checkpoint(load_model(src), tmp_path / "sharded", max_shard_bytes=100_000)
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (tmp_path / "sharded" / victim).unlink()
    with pytest.raises(CheckpointError, match=rf"{victim}: shard is missing .*tensor model\.\S+"):
        load_model(tmp_path / "sharded")


def test_config_disagreeing_with_weights_names_file_and_tensor(hf_dir, tmp_path):
    src, _ = hf_dir
    bad = copy_checkpoint(src, tmp_path / "bad")
    config = json.loads((bad / "config.json").read_text())
    config["kv_lora_rank"] = 16
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors: tensor model\.layers\.0\.self_attn\.\S+ has shape",
    ):
        load_model(bad)


def test_missing_and_unexpected_tensors_are_named(hf_dir, tmp_path):
    src, _ = hf_dir
    tensors = load_file(src / "model.safetensors")
    del tensors["model.layers.1.mlp.gate.e_score_correction_bias"]
    tensors["model.layers.0.self_attn.surprise.weight"] = torch.zeros(2)
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text((src / "config.json").read_text())
    save_file(tensors, tmp_path / "a" / "model.safetensors")
    with pytest.raises(
        CheckpointError,
        match=r"tensor model\.layers\.0\.self_attn\.surprise\.weight does not belong",
    ):
        load_model(tmp_path / "a")
    del tensors["model.layers.0.self_attn.surprise.weight"]
    save_file(tensors, tmp_path / "a" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"e_score_correction_bias is missing"):
        load_model(tmp_path / "a")


def test_float8_weight_without_scale_is_refused(hf_dir, tmp_path):
    src, _ = hf_dir
    save_checkpoint(load_model(src, fp8=True), tmp_path / "fp8")
    tensors = load_file(tmp_path / "fp8" / "model.safetensors")
    del tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
    save_file(tensors, tmp_path / "fp8" / "model.safetensors")
    with pytest.raises(
        CheckpointError, match=r"o_proj\.weight is float8 but \S+weight_scale_inv is missing"
    ):
        load_model(tmp_path / "fp8")
