"""Logits of our engine against the real transformers DeepSeek implementation.

Each case: random weights in transformers, ``save_pretrained`` to a temp dir, our
``load_model``, and float32 logits compared at max relative error 1e-4.
"""

from __future__ import annotations

import pytest
import torch

from inference import load_model
from tests.inference.hf_factory import hf_model, save_hf

YARN = {
    "rope_type": "yarn",
    "rope_theta": 10000.0,
    "factor": 4.0,
    "original_max_position_embeddings": 64,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 0.9,
    "mscale_all_dim": 0.7,
}

CASES = {
    # V3: sigmoid gating, n_group > 1, random nonzero correction bias, one dense layer.
    "v3_grouped_bias": ("deepseek_v3", {}),
    # V2-Lite style: no q-LoRA, softmax gating, greedy top-k, no bias.
    "v2_lite_softmax": ("deepseek_v2", {}),
    # V2 with group-limited greedy routing.
    "v2_group_limited": (
        "deepseek_v2",
        {"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2},
    ),
    # Two dense layers before the MoE ones, and the rotate-half RoPE layout.
    "v3_two_dense_no_interleave": (
        "deepseek_v3",
        {"first_k_dense_replace": 2, "rope_interleave": False},
    ),
    # YaRN with mscale != mscale_all_dim, so cos/sin and the logit scale both change.
    "v3_yarn": ("deepseek_v3", {"rope_parameters": YARN, "max_position_embeddings": 256}),
    # Tied input and output embeddings, no top-k renormalisation.
    "v3_tied_no_renorm": (
        "deepseek_v3",
        {"tie_word_embeddings": True, "norm_topk_prob": False},
    ),
}


def max_rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    return ((ours - ref).abs().max() / ref.abs().max()).item()


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    model_type, overrides = CASES[case]
    ref_model = hf_model(overrides, model_type, seed=hash(case) % 1000)
    path = save_hf(ref_model, tmp_path / case)
    ours = load_model(path)
    ids = torch.randint(
        0, ref_model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1)
    )
    with torch.inference_mode():
        ref = ref_model(ids).logits
        got = ours(ids)
    assert got.shape == ref.shape == (2, 40, ref_model.config.vocab_size)
    assert max_rel_err(got, ref) < 1e-4


def test_correction_bias_changes_routing(tmp_path):
    """The parity case would pass with a zero bias too; check the bias is really used."""
    ref_model = hf_model(seed=3)
    path = save_hf(ref_model, tmp_path / "hf")
    ours = load_model(path)
    ids = torch.randint(0, 160, (1, 32), generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        before = ours(ids)
        for layer in ours.model.layers[1:]:
            layer.mlp.gate.e_score_correction_bias.zero_()
        after = ours(ids)
    assert max_rel_err(after, before) > 1e-3
