"""Test helpers: small random Hugging Face DeepSeek checkpoints."""

from __future__ import annotations

from pathlib import Path

import torch

BASE_V3 = {
    "vocab_size": 160,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 12,
    "n_routed_experts": 8,
    "num_experts_per_tok": 3,
    "n_shared_experts": 1,
    "n_group": 4,
    "topk_group": 2,
    "first_k_dense_replace": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "max_position_embeddings": 256,
    "num_mtp_layers": 0,
    "tie_word_embeddings": False,
    "rope_interleave": True,
    "rms_norm_eps": 1e-6,
    "hidden_act": "silu",
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
}

BASE_V2 = {
    **{k: v for k, v in BASE_V3.items() if k not in ("num_mtp_layers", "rope_interleave")},
    "q_lora_rank": None,
    "n_group": 1,
    "topk_group": 1,
    "topk_method": "greedy",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "n_shared_experts": 2,
}


def randomize_(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter and the correction bias random values, so norms, the router
    and the bias all matter (HF initialises norms to 1 and the bias to 0)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:  # norm weights
                p.copy_(1 + 0.2 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(torch.randn(p.shape, generator=g) * p.shape[-1] ** -0.5)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(0.3 * torch.randn(b.shape, generator=g))


def hf_model(overrides: dict | None = None, model_type: str = "deepseek_v3", seed: int = 0):
    """A random transformers DeepseekV3/V2ForCausalLM (eager attention, eval mode)."""
    from transformers import (
        DeepseekV2Config,
        DeepseekV2ForCausalLM,
        DeepseekV3Config,
        DeepseekV3ForCausalLM,
    )

    base = BASE_V3 if model_type == "deepseek_v3" else BASE_V2
    config_cls, model_cls = {
        "deepseek_v3": (DeepseekV3Config, DeepseekV3ForCausalLM),
        "deepseek_v2": (DeepseekV2Config, DeepseekV2ForCausalLM),
    }[model_type]
    torch.manual_seed(seed)
    config = config_cls(**{**base, **(overrides or {})})
    model = model_cls(config).eval()
    randomize_(model, seed)
    return model


def save_hf(model, path: Path) -> Path:
    model.save_pretrained(str(path))
    return path
