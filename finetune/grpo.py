"""GRPO: group-relative advantages and the clipped policy loss, as TRL 1.16's GRPOTrainer
computes them (``trl/trainer/grpo_trainer.py``: ``_generate_and_score_completions`` for the
advantages, ``_compute_loss`` for the loss).

We reimplement rather than import TRL: its loss is a method of a Trainer that owns the
generation, the optimizer and accelerate, while our loop must run inside a Celery job or a
Flower client with our own FP8 model and in-memory state. The tests run TRL's own
``_compute_loss`` on the same tensors and compare loss and gradient for every loss type.

Shapes: B completions of up to T tokens. ``logps``, ``old_logps``, ``ref_logps`` and
``mask`` are [B, T] (log-probabilities of the sampled tokens; mask 1 on completion tokens
that count), ``advantages`` is [B] or [B, T].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
SCALES = ("group", "batch", "none")
IMPORTANCE_LEVELS = ("token", "sequence")
STD_EPS = 1e-4  # TRL adds this to the std before dividing


def nanstd(x: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sample standard deviation (Bessel-corrected) ignoring NaNs, as TRL's ``nanstd``."""
    mean = torch.nanmean(x, dim=dim, keepdim=True)
    var = torch.nanmean((x - mean) ** 2, dim=dim, keepdim=True)
    count = (~torch.isnan(x)).sum(dim=dim, keepdim=True)
    var = var * count / (count - 1)
    out = var.sqrt()
    return out.squeeze(dim) if dim is not None else out.reshape(())


def group_advantages(rewards: torch.Tensor, group_size: int, scale: str = "group") -> torch.Tensor:
    """Advantages of B = n_groups * group_size rewards, groups contiguous.

    advantage = reward - mean of its group, divided by (std + 1e-4) where std is the group's
    ("group", GRPO), the whole batch's ("batch", as PPO Lite), or not divided ("none",
    Dr. GRPO). NaN rewards (unscorable completions) are left out of means and stds and get
    advantage 0. Raises ValueError for a bad scale or a size not divisible by group_size.
    """
    if scale not in SCALES:
        raise ValueError(f"scale must be one of {SCALES}, got {scale!r}")
    rewards = rewards.float().reshape(-1)
    if group_size < 1 or rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.view(-1, group_size)
    mean = torch.nanmean(grouped, dim=1).repeat_interleave(group_size)
    advantages = rewards - mean
    if scale == "group":
        std = (
            nanstd(grouped, dim=1).repeat_interleave(group_size)
            if group_size > 1
            else torch.zeros_like(rewards)
        )
        advantages = advantages / (std + STD_EPS)
    elif scale == "batch":
        std = nanstd(rewards) if rewards.numel() > 1 else torch.zeros(())
        advantages = advantages / (std + STD_EPS)
    return torch.nan_to_num(advantages, nan=0.0)


def zero_std_fraction(rewards: torch.Tensor, group_size: int) -> float:
    """Share of completions whose group has identical rewards (no learning signal), as TRL's
    ``frac_reward_zero_std`` with group scaling."""
    grouped = rewards.float().reshape(-1, group_size)
    if group_size == 1:
        return 1.0
    std = nanstd(grouped, dim=1)
    return torch.isclose(std, torch.zeros_like(std)).float().mean().item()


@dataclass
class GRPOLossStats:
    """Detached diagnostics of one loss call, masked means over completion tokens
    (sequence-level importance sampling: over sequences), as TRL logs them."""

    kl: float | None  # mean k3 KL to the reference (None when beta == 0)
    clip_ratio_low: float  # ratio < 1 - epsilon_low where the advantage is negative
    clip_ratio_high: float  # ratio > 1 + epsilon_high where the advantage is positive
    clip_ratio_region: float  # either of the two


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor | None,
    ref_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    *,
    loss_type: str,
    beta: float,
    epsilon_low: float,
    epsilon_high: float,
    importance_sampling_level: str = "token",
    max_completion_length: int | None = None,
    num_items_in_batch: int | torch.Tensor | None = None,
    delta: float | None = None,
) -> tuple[torch.Tensor, GRPOLossStats]:
    """The GRPO policy loss of one micro-batch, and its diagnostics.

    ratio = exp(logps - old_logps) per token ("token") or exp of the masked mean per sequence
    ("sequence", GSPO); ``old_logps`` None means on-policy (logps detached, ratio 1 with a
    gradient). per-token loss = -min(ratio * A, clip(ratio, 1 - epsilon_low,
    1 + epsilon_high) * A), ``delta`` optionally capping the unclipped ratio (two-sided
    clipping), plus beta * k3 KL, k3 = exp(ref - logps) - (ref - logps) - 1, multiplied by the
    ratio (TRL's default use_bias_correction_kl: the unbiased reverse-KL gradient).

    Aggregation by ``loss_type``:
      grpo     mean over each sequence's tokens, then over sequences
      bnpo     mean over all tokens of the micro-batch
      dr_grpo  sum over tokens / (B * max_completion_length) (default: T)
      dapo     sum over tokens / num_items_in_batch, the completion tokens of the whole
               accumulation window (default: this micro-batch's)
    grpo, bnpo and dr_grpo are per micro-batch: a caller accumulating k micro-batches divides
    by k, as TRL does; dapo is already normalised over the window.

    Raises ValueError for an unknown loss type or level, or beta != 0 without ``ref_logps``.
    """
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if importance_sampling_level not in IMPORTANCE_LEVELS:
        raise ValueError(f"importance_sampling_level must be one of {IMPORTANCE_LEVELS}")
    if beta != 0.0 and ref_logps is None:
        raise ValueError("beta != 0 needs ref_logps")
    mask = mask.to(logps.dtype)
    if advantages.dim() == 1:
        advantages = advantages.unsqueeze(1)
    if old_logps is None:
        old_logps = logps.detach()

    log_ratio = logps - old_logps
    if importance_sampling_level == "token":
        log_weights = log_ratio
    else:
        log_weights = ((log_ratio * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).unsqueeze(-1)
    coef_1 = torch.exp(log_weights)

    per_token_kl = None
    if beta != 0.0:
        diff = ref_logps - logps
        per_token_kl = (torch.exp(diff) - diff - 1) * coef_1

    coef_2 = torch.clamp(coef_1, 1 - epsilon_low, 1 + epsilon_high)
    unclipped = torch.clamp(coef_1, max=delta) if delta is not None else coef_1
    per_token_loss = -torch.min(unclipped * advantages, coef_2 * advantages)
    if per_token_kl is not None:
        per_token_loss = per_token_loss + beta * per_token_kl

    if loss_type == "grpo":
        loss = ((per_token_loss * mask).sum(-1) / mask.sum(-1).clamp(min=1.0)).mean()
    elif loss_type == "bnpo":
        loss = (per_token_loss * mask).sum() / mask.sum().clamp(min=1.0)
    elif loss_type == "dr_grpo":
        length = max_completion_length if max_completion_length is not None else mask.shape[1]
        loss = (per_token_loss * mask).sum() / (per_token_loss.size(0) * length)
    else:  # dapo
        items = mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = (per_token_loss * mask).sum() / torch.as_tensor(items, dtype=logps.dtype).clamp(
            min=1.0
        )

    def masked_mean(x: torch.Tensor) -> float:
        if x.shape[1] == 1:  # one value per sequence
            return x.float().mean().item()
        return ((x * mask).sum() / mask.sum().clamp(min=1.0)).item()

    low = (coef_1 < 1 - epsilon_low) & (advantages < 0)
    high = (coef_1 > 1 + epsilon_high) & (advantages > 0)
    with torch.no_grad():
        stats = GRPOLossStats(
            kl=masked_mean(per_token_kl.detach()) if per_token_kl is not None else None,
            clip_ratio_low=masked_mean(low.float()),
            clip_ratio_high=masked_mean(high.float()),
            clip_ratio_region=masked_mean((low | high).float()),
        )
    return loss, stats
