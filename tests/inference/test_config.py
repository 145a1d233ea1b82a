"""ModelConfig: reading and writing HF config.json, and refusing configs that cannot work."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from inference import ModelConfig
from tests.inference.hf_factory import BASE_V2, BASE_V3

REPO = Path(__file__).resolve().parents[2]
SHIPPED = REPO / "models" / "configs"

# DeepSeek-V2-Lite's config.json as published (the fields the engine reads).
V2_LITE = {
    "model_type": "deepseek_v2",
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 27,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "q_lora_rank": None,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 64,
    "num_experts_per_tok": 6,
    "n_shared_experts": 2,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "greedy",
    "scoring_func": "softmax",
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 1.0,
    "norm_topk_prob": False,
    "max_position_embeddings": 163840,
    "rope_theta": 10000,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 0.707,
        "mscale_all_dim": 0.707,
    },
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "tie_word_embeddings": False,
    "bos_token_id": 100000,
    "eos_token_id": 100001,
}


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_shipped_configs_parse_and_match_shared(name):
    text = (SHIPPED / f"{name}.json").read_text()
    shared = REPO.parent / "shared" / "configs" / f"{name}.json"
    if shared.exists():  # in CI the shared folder is absent; the shipped copy is the truth
        assert text == shared.read_text()
    config = ModelConfig.from_json(SHIPPED / f"{name}.json")
    assert config.model_type == "deepseek_v3"
    assert config.qk_head_dim == config.qk_nope_head_dim + config.qk_rope_head_dim
    assert config.experts_per_group == config.n_routed_experts // config.n_group


@pytest.mark.parametrize("base", [BASE_V3, BASE_V2, V2_LITE], ids=["v3", "v2", "v2_lite"])
def test_hf_dict_round_trip(base, tmp_path):
    d = dict(base)
    d.setdefault("model_type", "deepseek_v3" if base is BASE_V3 else "deepseek_v2")
    config = ModelConfig.from_hf_dict(d)
    assert ModelConfig.from_hf_dict(config.to_hf_dict()) == config
    config.save(tmp_path)
    assert ModelConfig.from_json(tmp_path / "config.json") == config


def test_v2_lite_reads_as_softmax_greedy_without_q_lora():
    config = ModelConfig.from_hf_dict(V2_LITE)
    assert config.q_lora_rank is None
    assert (config.scoring_func, config.topk_method, config.n_group) == ("softmax", "greedy", 1)
    assert config.rope_scaling["rope_type"] == "yarn" and config.yarn_factor == 40
    # mscale == mscale_all_dim: cos/sin unscaled, logits scaled by mscale(40, 0.707)^2.
    assert config.rope_attention_factor == pytest.approx(1.0)
    assert config.softmax_scale == pytest.approx(
        192**-0.5 * (0.1 * 0.707 * 3.6888794541139363 + 1) ** 2
    )


def test_transformers_accepts_what_we_write():
    from transformers import DeepseekV2Config, DeepseekV3Config

    for base, cls in ((BASE_V3, DeepseekV3Config), (BASE_V2, DeepseekV2Config)):
        d = {**base, "model_type": cls.model_type}
        ours = ModelConfig.from_hf_dict(d).to_hf_dict()
        theirs = cls.from_dict(ours)
        for key in ("hidden_size", "q_lora_rank", "kv_lora_rank", "n_routed_experts", "n_group"):
            assert getattr(theirs, key) == ours[key]
        assert theirs.rope_parameters["rope_theta"] == ours["rope_parameters"]["rope_theta"]
        # ...and reading transformers' own serialisation gives our config back.
        back = ModelConfig.from_hf_dict(theirs.to_dict())
        assert back.replace(extra={}) == ModelConfig.from_hf_dict(ours).replace(extra={})


BAD = {
    "n_group does not divide experts": ({"n_group": 3}, "n_group"),
    "top-k above experts": ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    "top-k above eligible groups": (
        {"num_experts_per_tok": 5, "topk_group": 2},
        "num_experts_per_tok",
    ),
    "topk_group above n_group": ({"topk_group": 5}, "topk_group"),
    "zero heads": ({"num_attention_heads": 0}, "num_attention_heads"),
    "grouped kv heads": ({"num_key_value_heads": 2}, "num_key_value_heads"),
    "odd rope dim": ({"qk_rope_head_dim": 7}, "qk_rope_head_dim"),
    "unknown activation": ({"hidden_act": "gelu"}, "hidden_act"),
    "unknown rope": ({"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4}}, "rope_type"),
    "dense layers above depth": ({"first_k_dense_replace": 4}, "first_k_dense_replace"),
    "wrong fp8 block": (
        {"quantization_config": {"quant_method": "fp8", "weight_block_size": [64, 64]}},
        "weight_block_size",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_config_is_refused_naming_the_field(case):
    overrides, field = BAD[case]
    d = {**BASE_V3, "model_type": "deepseek_v3", **overrides}
    with pytest.raises(ValueError, match=field):
        ModelConfig.from_hf_dict(d)


@pytest.mark.parametrize(
    "field", ["hidden_size", "kv_lora_rank", "q_lora_rank", "n_routed_experts"]
)
def test_missing_field_is_named(field, tmp_path):
    d = {**BASE_V3, "model_type": "deepseek_v3"}
    del d[field]
    (tmp_path / "config.json").write_text(json.dumps(d))
    with pytest.raises(ValueError, match=f"{tmp_path / 'config.json'}.*{field}"):
        ModelConfig.from_json(tmp_path)


def test_unknown_model_type_is_refused():
    with pytest.raises(ValueError, match="model_type"):
        ModelConfig.from_hf_dict({**BASE_V3, "model_type": "llama"})
