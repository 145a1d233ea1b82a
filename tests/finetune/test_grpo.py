"""GRPO loss and advantages against TRL 1.16's own GRPOTrainer code, on the same tensors.

TRL's loss is a method (``GRPOTrainer._compute_loss``) that reads its settings from the
trainer and asks the model for log-probabilities; we call it unbound on a minimal stand-in
trainer whose ``_get_per_token_logps_and_entropies`` returns our tensor, single process,
no gradient accumulation. TRL's advantages live inside ``_generate_and_score_completions``;
for them we compare against TRL's ``nanstd`` and a transcription of those lines.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from trl.trainer.grpo_trainer import GRPOTrainer
from trl.trainer.utils import nanstd as trl_nanstd

from finetune.grpo import group_advantages, grpo_loss, nanstd, zero_std_fraction

B, T = 6, 7


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logps = (-torch.rand(B, T, generator=g) * 3).requires_grad_()
    # Old and reference policies a little off, so ratios leave the clip range both ways.
    old = (logps.detach() + 0.5 * torch.randn(B, T, generator=g)).clamp(max=0)
    ref = (logps.detach() + 0.5 * torch.randn(B, T, generator=g)).clamp(max=0)
    mask = (torch.rand(B, T, generator=g) > 0.25).float()
    mask[:, 0] = 1  # every completion has a token
    mask[2, 4:] = 0  # and lengths differ
    advantages = torch.randn(B, generator=g).abs() + 0.1
    advantages[1::2] *= -1  # both signs, so both clip edges can bind
    return logps, old, ref, mask, advantages


class _Accelerator:
    num_processes = 1

    @staticmethod
    def gather(x):
        return x

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def _trl_loss(logps, old, ref, mask, advantages, **kw):
    """TRL's _compute_loss on a stand-in trainer; returns (loss, its metrics)."""
    completion_len = logps.shape[1]
    fake = SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (logps, torch.zeros_like(logps), None),
        top_entropy_quantile=1.0,
        off_policy_mask_threshold=None,
        importance_sampling_level=kw["importance_sampling_level"],
        beta=kw["beta"],
        loss_type=kw["loss_type"],
        epsilon_low=kw["epsilon_low"],
        epsilon_high=kw["epsilon_high"],
        use_vllm=False,
        vllm_importance_sampling_correction=False,
        model=SimpleNamespace(training=True),
        current_gradient_accumulation_steps=1,
        max_completion_length=kw["max_completion_length"],
        accelerator=_Accelerator(),
        args=SimpleNamespace(use_bias_correction_kl=True, delta=None, steps_per_generation=1),
        _entropy_bonus_enabled=False,
        aux_loss_enabled=False,
        _metrics={"train": defaultdict(list)},
    )
    inputs = {
        "prompt_ids": torch.zeros(B, 2, dtype=torch.long),
        "prompt_mask": torch.ones(B, 2, dtype=torch.long),
        "completion_ids": torch.zeros(B, completion_len, dtype=torch.long),
        "completion_mask": mask,
        "advantages": advantages,
        "old_per_token_logps": old,
        "ref_per_token_logps": ref,
        "num_items_in_batch": mask.sum(),
    }
    loss = GRPOTrainer._compute_loss(fake, None, inputs)
    return loss, fake._metrics["train"]


CASES = list(
    itertools.product(["grpo", "bnpo", "dr_grpo", "dapo"], ["token", "sequence"], [0.0, 0.04])
)


@pytest.mark.parametrize("loss_type,level,beta", CASES)
def test_loss_and_gradient_match_trl(loss_type, level, beta):
    logps, old, ref, mask, advantages = _inputs(seed=CASES.index((loss_type, level, beta)))
    kw = dict(
        loss_type=loss_type,
        beta=beta,
        epsilon_low=0.2,
        epsilon_high=0.28,
        importance_sampling_level=level,
        max_completion_length=T + 3,
    )
    theirs, metrics = _trl_loss(logps, old, ref, mask, advantages, **kw)
    (their_grad,) = torch.autograd.grad(theirs, logps)
    ours, stats = grpo_loss(
        logps, old, ref if beta else None, advantages, mask, num_items_in_batch=mask.sum(), **kw
    )
    (our_grad,) = torch.autograd.grad(ours, logps)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-6, abs=1e-8)
    assert torch.allclose(our_grad, their_grad, rtol=1e-6, atol=1e-9)
    assert our_grad.abs().sum() > 0
    assert stats.clip_ratio_low == pytest.approx(metrics["clip_ratio/low_mean"][0])
    assert stats.clip_ratio_high == pytest.approx(metrics["clip_ratio/high_mean"][0])
    assert stats.clip_ratio_region == pytest.approx(metrics["clip_ratio/region_mean"][0])
    if beta:
        assert stats.kl == pytest.approx(metrics["kl"][0], rel=1e-6)
    else:
        assert stats.kl is None and "kl" not in metrics
    if level == "token":  # the clip range is exercised on both sides
        assert stats.clip_ratio_low > 0 and stats.clip_ratio_high > 0


def test_on_policy_ratio_is_one_but_kl_still_carries_its_gradient():
    logps, _, ref, mask, advantages = _inputs(seed=3)
    kw = dict(loss_type="grpo", epsilon_low=0.2, epsilon_high=0.2)
    loss0, stats = grpo_loss(logps, None, ref, advantages, mask, beta=0.0, **kw)
    assert stats.clip_ratio_region == 0
    loss1, _ = grpo_loss(logps, None, ref, advantages, mask, beta=0.1, **kw)
    (g0,) = torch.autograd.grad(loss0, logps)
    (g1,) = torch.autograd.grad(loss1, logps)
    # KL term times ratio: d/dx[(e^(r-x) - (r-x) - 1) e^(x-x0)] at x = x0 is 1 - e^(r-x) + k3.
    diff = ref - logps.detach()
    k3 = diff.exp() - diff - 1
    per_seq = mask.sum(-1, keepdim=True)
    want = g0 + 0.1 * (1 - diff.exp() + k3) * mask / per_seq / B
    assert torch.allclose(g1, want, atol=1e-7)


@pytest.mark.parametrize("scale", ["group", "batch", "none"])
def test_group_advantages_follow_trl(scale):
    g = torch.Generator().manual_seed(1)
    rewards = torch.rand(12, generator=g)
    rewards[4:8] = 0.5  # one group with no spread
    rewards[9] = float("nan")  # an unscorable completion
    got = group_advantages(rewards, 4, scale)
    # TRL's lines (_generate_and_score_completions, sum_then_normalize), transcribed.
    mean = torch.nanmean(rewards.view(-1, 4), dim=1).repeat_interleave(4)
    if scale == "batch":
        std = trl_nanstd(rewards).expand_as(rewards)
    else:
        std = trl_nanstd(rewards.view(-1, 4), dim=1).repeat_interleave(4)
    want = rewards - mean
    if scale != "none":
        want = want / (std + 1e-4)
    want = torch.nan_to_num(want, nan=0.0)
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.all(got[4:8] == 0) and got[9] == 0
    assert torch.allclose(
        nanstd(rewards.view(-1, 4), dim=1), trl_nanstd(rewards.view(-1, 4), dim=1), equal_nan=True
    )
    assert zero_std_fraction(rewards, 4) == pytest.approx(1 / 3)


def test_bad_arguments_are_refused():
    logps, old, ref, mask, advantages = _inputs()
    with pytest.raises(ValueError, match="loss_type"):
        grpo_loss(
            logps,
            old,
            ref,
            advantages,
            mask,
            loss_type="ppo",
            beta=0,
            epsilon_low=0.2,
            epsilon_high=0.2,
        )
    with pytest.raises(ValueError, match="ref_logps"):
        grpo_loss(
            logps,
            old,
            None,
            advantages,
            mask,
            loss_type="grpo",
            beta=0.1,
            epsilon_low=0.2,
            epsilon_high=0.2,
        )
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(torch.zeros(12), 5)
