"""GRPO: group-relative advantages and the clipped policy loss, as TRL 1.16's GRPOTrainer
computes them (``trl/trainer/grpo_trainer.py``: ``_generate_and_score_completions`` for the
advantages, ``_compute_loss`` for the loss), and ``train_grpo``, a LoRA training loop over
the domain suites' verifiable tasks with the same callbacks and exact resume as ``train_sft``.

    config = GRPOConfig(model_path="models/tiny", max_steps=50)
    result = train_grpo(config, tasks=SUITES["finance"].generate(64), callbacks=my_callbacks)

We reimplement rather than import TRL: its loss is a method of a Trainer that owns the
generation, the optimizer and accelerate, while our loop must run inside a Celery job or a
Flower client with our own FP8 model and in-memory state. The tests run TRL's own
``_compute_loss`` on the same tensors and compare loss and gradient for every loss type.

Proved by tests/finetune/test_grpo.py (loss, gradient and logged statistics equal TRL's
for every loss type, both importance-sampling levels, with and without KL; advantages) and
tests/finetune/test_grpo_loop.py (update direction, metrics, exact resume, dynamic
sampling, the domain reward); tests/finetune/test_grpo_engine.py proves that the
serving engine samples from the current policy (same tokens and logits as the training
model, no stale weights after an update).

Shapes: B completions of up to T tokens. ``logps``, ``old_logps``, ``ref_logps`` and
``mask`` are [B, T] (log-probabilities of the sampled tokens; mask 1 on completion tokens
that count), ``advantages`` is [B] or [B, T].
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

import inference
from finetune.callbacks import NullCallbacks, TrainingCallbacks, check_stop_request
from inference.kv_cache import latent_bytes_per_token

if TYPE_CHECKING:
    from finetune.domains import TaskItem

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


# ---- the training loop --------------------------------------------------------------------
#
# Groups are sampled by the serving engine (continuous batching, paged latent KV cache), as
# vLLM samples for TRL, but in process and without files: the engine runs on a view of the
# training model's frozen FP8 base (``lora.base_view``, no weight copied) and serves the
# current policy as an in-memory adapter, re-registered after every optimizer update (a
# copy of the small LoRA tensors; plaintext-derived adapters never touch the disk). Each
# registration is a new adapter version, so no latent cached under older weights is reused.
# Log-probabilities for the loss (and the old and reference ones) come from the training
# model's own full forward, as in TRL.


@dataclass
class GRPOConfig:
    """One GRPO run. Defaults follow TRL's GRPOConfig where it has the same knob."""

    model_path: str  # checkpoint directory: config.json, safetensors, tokenizer.json
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA scale numerator
    lora_dropout: float = 0.0  # dropout on the LoRA input (training forward only)
    targets: tuple[str, ...] = ("mla", "mlp")  # LoRA target sets (finetune.lora.TARGET_SETS)
    learning_rate: float = 1e-5  # peak AdamW learning rate
    weight_decay: float = 0.0  # AdamW decoupled weight decay
    warmup_steps: int = 0  # optimizer steps of linear warmup, then cosine decay to 0
    max_steps: int = 100  # generation batches (each gives num_iterations optimizer steps)
    prompts_per_step: int = 4  # groups per generation batch
    group_size: int = 8  # completions sampled per prompt (TRL's num_generations)
    max_prompt_len: int = 512  # longer prompts keep their last tokens
    max_completion_length: int = 256  # tokens generated at most per completion
    temperature: float = 1.0  # sampling temperature; logps are taken at it too, as TRL does
    top_p: float = 1.0  # nucleus sampling mass
    loss_type: str = "dapo"  # grpo, bnpo, dr_grpo or dapo (see grpo_loss)
    beta: float = 0.0  # KL coefficient to the base model (0: no reference pass)
    epsilon_low: float = 0.2  # lower clip: ratio >= 1 - epsilon_low
    epsilon_high: float = 0.28  # upper clip: ratio <= 1 + epsilon_high (DAPO's clip-higher)
    importance_sampling_level: str = "token"  # "token" or "sequence" (GSPO)
    scale_rewards: str = "group"  # advantage scaling: "group", "batch" or "none"
    num_iterations: int = 1  # optimizer steps per generation batch (TRL's mu)
    max_grad_norm: float = 1.0  # clip the global gradient norm; 0 disables
    dynamic_sampling: bool = False  # DAPO: drop groups whose rewards are all equal, resample
    max_sampling_rounds: int = 3  # with dynamic_sampling: rounds of resampling per step
    seed: int = 0  # LoRA init, prompt order, sampling
    log_every: int = 1  # on_metrics every this many steps (and at the last)
    checkpoint_every: int = 0  # on_checkpoint every this many steps; 0: never
    # The sampling engine decodes with a dequantised full-width copy of the FP8 base (faster:
    # no per-step dequantisation; costs the base at full width in memory). False: it shares
    # the FP8 weights themselves. Same values either way (see lora.base_view).
    wide_sampling_weights: bool = True
    # The frozen base's matmul dtype and dequantised-weight cache while scoring completions
    # (the policy's forward and backward): as SFTConfig.precision and .fp8_cache_mb.
    precision: str = "auto"
    fp8_cache_mb: int = 2048

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot describe a run."""
        for name in (
            "lora_r",
            "lora_alpha",
            "max_steps",
            "prompts_per_step",
            "max_prompt_len",
            "max_completion_length",
            "num_iterations",
            "max_sampling_rounds",
            "log_every",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"GRPOConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.group_size < 2:
            raise ValueError("GRPOConfig.group_size must be >= 2: advantages compare a group")
        if self.loss_type not in LOSS_TYPES:
            raise ValueError(f"GRPOConfig.loss_type must be one of {LOSS_TYPES}")
        if self.scale_rewards not in SCALES:
            raise ValueError(f"GRPOConfig.scale_rewards must be one of {SCALES}")
        if self.importance_sampling_level not in IMPORTANCE_LEVELS:
            raise ValueError(f"GRPOConfig.importance_sampling_level must be in {IMPORTANCE_LEVELS}")
        if not self.temperature > 0 or not 0 < self.top_p <= 1:
            raise ValueError("GRPOConfig needs temperature > 0 and top_p in (0, 1]")
        precisions = ("auto", "fp32", "bf16")  # finetune.run.PRECISIONS (it imports peft)
        if self.precision not in precisions or self.fp8_cache_mb < 0:
            raise ValueError(
                f"GRPOConfig.precision must be one of {precisions} and fp8_cache_mb >= 0"
            )
        if self.learning_rate <= 0 or self.beta < 0 or self.checkpoint_every < 0:
            raise ValueError("GRPOConfig needs learning_rate > 0, beta >= 0, checkpoint_every >= 0")


@dataclass
class GRPOResult:
    """How a run ended: status ("succeeded", "cancelled", "paused"), generation batches done,
    the adapter in PEFT format, the last metrics, and resumable state bytes."""

    status: str
    steps: int
    adapter_files: dict[str, bytes]
    metrics: dict = field(default_factory=dict)
    state: bytes = b""


RewardFn = Callable[[str, "TaskItem"], float]

_GRPO_RESUME_KEYS = (
    "lora_r",
    "lora_alpha",
    "targets",
    "max_steps",
    "prompts_per_step",
    "group_size",
    "seed",
    "num_iterations",
    "warmup_steps",
    "learning_rate",
    "dynamic_sampling",
)


def train_grpo(
    config: GRPOConfig,
    *,
    tasks: Sequence[TaskItem | dict],
    reward_fn: RewardFn | None = None,
    callbacks: TrainingCallbacks | None = None,
    resume_state: bytes | None = None,
    initial_adapter: Mapping[str, bytes] | None = None,
) -> GRPOResult:
    """Train a LoRA adapter with GRPO on verifiable tasks.

    ``tasks``: ``finetune.domains`` TaskItems (or their ``to_dict`` form); prompts are their
    chat messages, drawn in an order fixed by the seed. ``reward_fn(completion_text, item)``
    scores a completion (decoded without special tokens); default ``domains.reward`` (format
    0.2 + correct 0.8); None marks a completion it cannot score (advantage 0, as in TRL).
    Each step samples ``group_size`` completions for each of ``prompts_per_step`` prompts in
    one batch through the serving engine, scores them, computes group advantages and takes
    ``num_iterations`` optimizer steps on ``grpo_loss`` (one micro-batch per group).

    on_metrics gets, per logged step: step, reward_mean, reward_std (over every sampled
    completion), unscorable_fraction, frac_reward_zero_std, groups_sampled, groups_kept,
    loss, kl (beta > 0), entropy, clip_ratio_low/high/region, completion_length (mean, plus _min/_max),
    terminated_fraction (ended with eos), lr, grad_norm, generation_s (sampling through
    the serving engine), step_s (the whole step) and generation_share (their ratio),
    elapsed_s, eta_s.
    ``resume_state``/``on_checkpoint`` state resumes exactly, as in ``train_sft``.

    Raises ValueError for a bad config, no tasks, or a state/adapter that does not fit.
    """
    from finetune import lora, run
    from finetune.domains import TaskItem
    from finetune.domains import reward as domain_reward
    from finetune.tokenizer import EOS, PAD_ID, load_tokenizer

    config.validate()
    callbacks = callbacks or NullCallbacks()
    items = [t if isinstance(t, TaskItem) else TaskItem.from_dict(t) for t in tasks]
    if not items:
        raise ValueError("train_grpo needs at least one task")
    reward_fn = reward_fn or domain_reward
    view = _grpo_resume_view(config)
    state = run.load_state(resume_state, "grpo", view) if resume_state is not None else None

    tokenizer = load_tokenizer(config.model_path)
    eos_id = tokenizer.convert_tokens_to_ids(EOS)
    # Prompts go through serving's chat template function, so the policy is trained on the
    # exact prompts it will be served.
    prompts = [
        run.prompt_ids(config.model_path, tokenizer, it.prompt)[-config.max_prompt_len :]
        for it in items
    ]

    device = run.pick_device()
    torch.manual_seed(config.seed)
    model = inference.load_model(config.model_path, device=device)
    if initial_adapter is not None:
        policy = lora.load_adapter(model, initial_adapter, trainable=True)
    else:
        policy = lora.apply_lora(
            model, config.targets, config.lora_r, config.lora_alpha, config.lora_dropout
        )
    run.prepare_base(policy, config.precision, config.fp8_cache_mb, device)
    params = [p for p in policy.parameters() if p.requires_grad]
    total_updates = config.max_steps * config.num_iterations
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=config.weight_decay, foreach=False
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: run.lr_factor(s, config.warmup_steps, total_updates)
    )
    step, cursor, elapsed_before = 0, 0, 0.0
    if state is not None:
        run.load_lora_tensors(policy, state["lora"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        progress = json.loads(state["progress"])
        step, cursor, elapsed_before = progress["step"], progress["cursor"], progress["elapsed_s"]
        run.set_rng_state(state["rng"])

    def save() -> bytes:
        payload = {
            "lora": run.lora_tensors(policy),
            "optimizer": copy.deepcopy(optimizer.state_dict()),
            "scheduler": scheduler.state_dict(),
            "rng": run.rng_state(),
            "progress": json.dumps(
                {"step": step, "cursor": cursor, "elapsed_s": elapsed_before + clock()}
            ),
        }
        return run.dump_state("grpo", view, payload)

    start_time, start_step = time.perf_counter(), step

    def clock() -> float:
        return time.perf_counter() - start_time

    engine = sampling_engine(policy, config)
    try:
        status, last_metrics = "succeeded", {}
        while step < config.max_steps:
            request = check_stop_request(callbacks.should_stop())
            if request is not None:
                status = "cancelled" if request == "cancel" else "paused"
                break
            step_start = time.perf_counter()
            # -- sample and score groups (dynamic sampling drops groups without signal)
            adapter = engine.register_adapter(SAMPLING_ADAPTER, *lora.serving_state(policy))
            generation_s = time.perf_counter() - step_start
            kept: list[_Group] = []
            all_rewards: list[torch.Tensor] = []
            rounds = config.max_sampling_rounds if config.dynamic_sampling else 1
            for _ in range(rounds):
                want = config.prompts_per_step - len(kept)
                indices = [_prompt_index(cursor + k, len(items), config.seed) for k in range(want)]
                t0 = time.perf_counter()
                groups = sample_groups(
                    engine,
                    adapter,
                    [prompts[i] for i in indices],
                    [_sample_seed(config.seed, cursor + k) for k in range(want)],
                    config,
                    eos_id,
                    PAD_ID,
                    device,
                )
                generation_s += time.perf_counter() - t0
                cursor += want
                for index, group in zip(indices, groups, strict=True):
                    texts = [
                        tokenizer.decode(ids[: int(n)].tolist(), skip_special_tokens=True)
                        for ids, n in zip(group.completion, group.mask.sum(1), strict=True)
                    ]
                    group.rewards = torch.tensor(
                        [_reward_value(reward_fn(text, items[index])) for text in texts]
                    )
                    all_rewards.append(group.rewards)
                    if (
                        config.dynamic_sampling
                        and zero_std_fraction(group.rewards, len(texts)) == 1
                    ):
                        continue
                    kept.append(group)
                if len(kept) == config.prompts_per_step:
                    break

            # -- advantages, reference and old log-probabilities
            policy.train()
            metrics: dict = {}
            if kept:
                advantages = group_advantages(
                    torch.cat([g.rewards for g in kept]), config.group_size, config.scale_rewards
                ).split(config.group_size)
                num_items = sum(float(g.mask.sum()) for g in kept)
                with torch.no_grad():
                    for g in kept:
                        if config.beta:
                            with policy.disable_adapter():
                                g.ref_logps = _completion_logps(policy, g, config.temperature)[0]
                        if config.num_iterations > 1:
                            g.old_logps = _completion_logps(policy, g, config.temperature)[0]
                per_iteration = [
                    _update(
                        policy, kept, advantages, num_items, config, optimizer, scheduler, params
                    )
                    for _ in range(config.num_iterations)
                ]
                # Averaged over the iterations, as TRL averages what it logs between reports.
                metrics = {
                    k: sum(m[k] for m in per_iteration) / len(per_iteration)
                    for k in per_iteration[0]
                }
                metrics["lr"] = per_iteration[0]["lr"]
            step += 1
            step_s = time.perf_counter() - step_start

            rewards = torch.cat(all_rewards)
            lengths = torch.cat([g.mask.sum(1) for g in kept]) if kept else torch.zeros(1)
            done_here = step - start_step
            if step % config.log_every == 0 or step == config.max_steps:
                metrics.update(
                    step=step,
                    reward_mean=torch.nanmean(rewards).item(),
                    reward_std=nanstd(rewards).item() if rewards.numel() > 1 else 0.0,
                    unscorable_fraction=rewards.isnan().float().mean().item(),
                    frac_reward_zero_std=sum(
                        zero_std_fraction(r, config.group_size) for r in all_rewards
                    )
                    / len(all_rewards),
                    groups_sampled=len(all_rewards),
                    groups_kept=len(kept),
                    completion_length=lengths.float().mean().item(),
                    completion_length_min=lengths.min().item(),
                    completion_length_max=lengths.max().item(),
                    terminated_fraction=(
                        torch.cat([g.terminated for g in kept]).float().mean().item()
                        if kept
                        else 0.0
                    ),
                    generation_s=generation_s,
                    step_s=step_s,
                    generation_share=generation_s / step_s,
                    elapsed_s=elapsed_before + clock(),
                    eta_s=clock() / done_here * (config.max_steps - step),
                )
                metrics.setdefault("lr", scheduler.get_last_lr()[0])
                callbacks.on_metrics(metrics)
                last_metrics = metrics
            if config.checkpoint_every and step % config.checkpoint_every == 0:
                callbacks.on_checkpoint(step, save())

    finally:
        engine.close()
    return GRPOResult(
        status=status,
        steps=step,
        adapter_files=lora.adapter_files(policy),
        metrics=last_metrics,
        state=save(),
    )


def _reward_value(value) -> float:
    """A reward as a float; None (the reward function cannot score this completion) becomes
    NaN, which the advantages leave out and zero, as TRL does."""
    return float("nan") if value is None else float(value)


@dataclass
class _Group:
    """One prompt's sampled completions (all [G, L]; prompt [G, P])."""

    prompt: torch.Tensor
    completion: torch.Tensor
    mask: torch.Tensor  # 1 up to and including the first eos
    terminated: torch.Tensor  # [G] bool: the completion ended with eos
    rewards: torch.Tensor | None = None
    old_logps: torch.Tensor | None = None
    ref_logps: torch.Tensor | None = None


def _prompt_index(cursor: int, n: int, seed: int) -> int:
    """Prompt number ``cursor`` of the stream: epochs of a seeded permutation of the tasks."""
    epoch, offset = divmod(cursor, n)
    order = list(range(n))
    random.Random(f"grpo:{seed}:{epoch}").shuffle(order)
    return order[offset]


def _sample_seed(seed: int, cursor: int) -> int:
    # Derived from the position, so a resumed run samples what the first run would have.
    return int.from_bytes(hashlib.sha256(f"grpo-sample:{seed}:{cursor}".encode()).digest()[:8])


SAMPLING_ADAPTER = "grpo-policy"  # the policy's name in the sampling engine
ENGINE_BLOCK_SIZE = 16
ENGINE_BATCH_TOKENS = 2048  # prefill tokens per engine step: the groups' prompts at once


def sampling_engine(policy, config: GRPOConfig) -> inference.Engine:
    """A serving engine over ``policy``'s base weights (shared, or a dequantised copy with
    ``config.wide_sampling_weights``), sized for one step's groups: its latent cache holds
    every completion of the step at full length."""
    from finetune import lora

    view = lora.base_view(policy, wide=config.wide_sampling_weights)
    n_seqs = config.prompts_per_step * config.group_size
    per_seq = config.max_prompt_len + config.max_completion_length + ENGINE_BLOCK_SIZE
    per_token = latent_bytes_per_token(view.config, view.compute_dtype)
    return inference.Engine(
        config.model_path,
        model=view,
        max_batch_tokens=max(ENGINE_BATCH_TOKENS, n_seqs),
        kv_cache_bytes=n_seqs * per_seq * per_token,
        block_size=ENGINE_BLOCK_SIZE,
        max_num_seqs=n_seqs,
    )


def sample_groups(
    engine: inference.Engine,
    adapter: str,
    prompts: Sequence[list[int]],
    seeds: Sequence[int],
    config: GRPOConfig,
    eos_id: int,
    pad_id: int,
    device,
) -> list[_Group]:
    """``group_size`` completions of each prompt, all in one batch through ``engine`` with
    the in-memory ``adapter``: temperature and top-p sampling, up to
    ``max_completion_length`` tokens, stopping at ``eos_id`` (the tokenizer's, whatever the
    model config names). Completion j of a prompt samples with seed ``seeds[i] + j``, so a
    resumed run draws what the first run drew."""
    g = config.group_size
    requests = [
        inference.Request(
            prompt_token_ids=list(prompt),
            adapter=adapter,
            sampling=inference.SamplingParams(
                temperature=config.temperature,
                top_p=config.top_p,
                max_tokens=config.max_completion_length,
                seed=(seed + j) % 2**64,
                ignore_eos=True,
                stop_token_ids=[eos_id],
            ),
        )
        for prompt, seed in zip(prompts, seeds, strict=True)
        for j in range(g)
    ]
    completions = engine.generate(requests)
    groups = []
    for i, prompt in enumerate(prompts):
        outs = [c.token_ids for c in completions[i * g : (i + 1) * g]]
        width = max(len(o) for o in outs)
        completion = torch.full((g, width), pad_id, dtype=torch.long)
        for row, ids in enumerate(outs):
            completion[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        is_eos = completion == eos_id
        first_eos = torch.where(is_eos.any(1), is_eos.float().argmax(1), torch.full((g,), width))
        mask = (torch.arange(width)[None, :] <= first_eos[:, None]).float()
        prompt_t = torch.tensor(prompt, dtype=torch.long, device=device).repeat(g, 1)
        groups.append(_Group(prompt_t, completion.to(device), mask.to(device), is_eos.any(1)))
    return groups


def _completion_logps(model, group: _Group, temperature: float):
    """(log-probabilities [G, L] of the sampled tokens, their entropies [G, L], detached)."""
    ids = torch.cat([group.prompt, group.completion], dim=1)
    p = group.prompt.shape[1]
    at = torch.zeros_like(ids, dtype=torch.bool)
    at[:, p - 1 : -1] = True  # the positions that predict the completion: the head runs there
    g, n = group.completion.shape
    logits = model(ids, logits_at=at).view(g, n, -1).float() / temperature
    logp_all = logits.log_softmax(-1)
    logps = logp_all.gather(-1, group.completion[..., None]).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1).detach()
    return logps, entropy


def _update(policy, groups, advantages, num_items, config, optimizer, scheduler, params) -> dict:
    """One optimizer step over every group (one micro-batch each); returns its metrics."""
    from finetune import run

    lr = scheduler.get_last_lr()[0]
    sums = {"loss": 0.0, "kl": 0.0, "entropy": 0.0, "low": 0.0, "high": 0.0, "region": 0.0}
    tokens = 0.0
    for group, adv in zip(groups, advantages, strict=True):
        logps, entropy = _completion_logps(policy, group, config.temperature)
        loss, stats = grpo_loss(
            logps,
            group.old_logps,
            group.ref_logps,
            adv.to(logps.device),
            group.mask,
            loss_type=config.loss_type,
            beta=config.beta,
            epsilon_low=config.epsilon_low,
            epsilon_high=config.epsilon_high,
            importance_sampling_level=config.importance_sampling_level,
            max_completion_length=config.max_completion_length,
            num_items_in_batch=num_items,
        )
        if config.loss_type != "dapo":  # per-micro-batch losses: average over the groups
            loss = loss / len(groups)
        loss.backward()
        n = float(group.mask.sum())
        tokens += n
        sums["loss"] += loss.item()
        sums["entropy"] += float((entropy * group.mask).sum())
        sums["kl"] += (stats.kl or 0.0) * n
        sums["low"] += stats.clip_ratio_low * n
        sums["high"] += stats.clip_ratio_high * n
        sums["region"] += stats.clip_ratio_region * n
    grad_norm = run.clip_gradients(params, config.max_grad_norm)
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    out = {
        "loss": sums["loss"],
        "entropy": sums["entropy"] / max(tokens, 1.0),
        "clip_ratio_low": sums["low"] / max(tokens, 1.0),
        "clip_ratio_high": sums["high"] / max(tokens, 1.0),
        "clip_ratio_region": sums["region"] / max(tokens, 1.0),
        "lr": lr,
        "grad_norm": grad_norm,
    }
    if config.beta:
        out["kl"] = sums["kl"] / max(tokens, 1.0)
    return out


def _grpo_resume_view(config: GRPOConfig) -> dict:
    d = dataclasses.asdict(config)
    view = {k: d[k] for k in _GRPO_RESUME_KEYS}
    view["targets"] = list(view["targets"])
    return view
