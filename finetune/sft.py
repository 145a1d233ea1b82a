"""Supervised fine-tuning with LoRA: a library loop that Celery jobs and federated clients call.

    result = train_sft(
        SFTConfig(model_path="models/tiny", max_steps=100),
        train_examples=[{"messages": [...]}, ...],     # in memory, never written to disk
        callbacks=my_callbacks,                          # metrics, checkpoints, stop polls
    )
    result.adapter_files   # {"adapter_config.json": bytes, "adapter_model.safetensors": bytes}

The loop: the base model (``inference.load_model(model_path)``, FP8 stays FP8, frozen) gets
LoRA adapters on ``targets`` (``finetune.lora``); examples are validated and normalised by
``finetune.data`` (chat, alpaca or sharegpt dicts), encoded with the chat template and a loss
mask that keeps only assistant tokens, packed or padded to ``max_seq_len`` and batched by
``data.BatchIterator`` (deterministic by seed, resumable). Each optimizer step accumulates
``grad_accum`` micro-batches; the loss is the mean over every assistant token of the step
(not a mean of micro-batch means), clipped to ``max_grad_norm``, AdamW with linear warmup
then cosine decay to zero.

Resumption is exact: the state bytes (``on_checkpoint``, and ``SFTResult.state`` after a
pause or cancel) hold the adapter, AdamW's moments, the scheduler, every RNG and the data
position, so a run interrupted at step k and resumed in a fresh process ends with the same
adapter as an uninterrupted one. Nothing touches the disk: state is ``torch.save`` into memory.

Proved by tests/finetune/test_sft.py: the loss falls on a learnable task, metrics and the
schedule, pause/resume and checkpoint/resume equal an uninterrupted run, cancel, initial
adapters, assistant-only loss, accumulation equals one large batch, the seeded validation
split, early stopping returns the best adapter, no disk writes, the CLI; and the hooks
federated clients use: ``freeze`` (FFA-LoRA's fixed A), ``extra_loss`` (FedProx's proximal
term) and a warm ``base_model`` that is copied, never modified.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import json
import math
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F

import inference
from finetune import data, lora, run
from finetune.callbacks import NullCallbacks, TrainingCallbacks, check_stop_request

# Config fields a resumed run must share with the run that wrote the state: anything that
# changes the adapter's shape, the data order or the schedule.
_RESUME_KEYS = (
    "lora_r",
    "lora_alpha",
    "targets",
    "batch_size",
    "grad_accum",
    "max_seq_len",
    "packing",
    "precision",
    "seed",
    "val_fraction",
    "epochs",
    "max_steps",
    "warmup_steps",
    "learning_rate",
    "lr_schedule",
)


@dataclass
class SFTConfig:
    """One SFT run. The control plane builds this from a job's hyperparameters."""

    model_path: str  # checkpoint directory: config.json, safetensors, tokenizer.json
    lora_r: int = 8  # LoRA rank
    lora_alpha: int = 16  # LoRA scale numerator: the update is (alpha / r) * B @ A
    lora_dropout: float = 0.0  # dropout on the LoRA input (training only)
    targets: tuple[str, ...] = ("mla", "mlp")  # LoRA target sets, see finetune.lora.TARGET_SETS
    learning_rate: float = 2e-4  # peak AdamW learning rate (after warmup)
    weight_decay: float = 0.0  # AdamW decoupled weight decay on the LoRA weights
    warmup_steps: int = 0  # optimizer steps of linear warmup from 0 to learning_rate
    # After warmup: "cosine" decays to 0 at the last step; "constant" holds learning_rate (a
    # federated member's few local steps: the federation decays the rate across rounds).
    lr_schedule: str = "cosine"
    max_steps: int | None = None  # optimizer steps to run; None: `epochs` passes over the data
    epochs: int = 1  # passes over the training rows when max_steps is None
    batch_size: int = 4  # rows per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    max_grad_norm: float = 1.0  # clip the global gradient norm to this; 0 disables clipping
    max_seq_len: int = 512  # row length in tokens; longer examples are truncated
    # Pack several examples per row (else one per row). Either way the forward skips the
    # padding and runs each example as its own sequence (positions from 0, attention within
    # the example): packing changes the batches, never what an example trains on.
    packing: bool = False
    seed: int = 0  # LoRA init, validation split, example and batch order, dropout
    val_fraction: float = 0.0  # share of train_examples held out when val_examples is None
    early_stopping_patience: int | None = None  # evaluations without a better val_loss
    log_every: int = 1  # on_metrics every this many steps (and at the last step)
    checkpoint_every: int = 0  # on_checkpoint every this many steps; 0: never
    eval_every: int = 0  # validation every this many steps; 0: only after the last step
    # LoRA tensors whose parameter name contains one of these stay at their initial value
    # and out of the optimizer: ("lora_A",) is FFA-LoRA (only B trains; federated averaging
    # of B is then exact because every member shares A).
    freeze: tuple[str, ...] = ()
    # Dtype of the frozen FP8 base's matmuls, forward and backward: "auto" (bf16 where it is
    # fast: CUDA, or a CPU with AVX512-BF16 or AMX; else fp32), "fp32" or "bf16". The LoRA
    # weights, optimizer, norms, router, attention and loss stay float32 either way.
    precision: str = "auto"
    # MiB of the base's dequantised weights (in that dtype) kept for the run, so that layers
    # do not decode their float8 bytes in every pass; 0 decodes on every use (least memory).
    fp8_cache_mb: int = 2048

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot describe a run."""
        positive = ("lora_r", "lora_alpha", "epochs", "batch_size", "grad_accum", "max_seq_len")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"SFTConfig.{name} must be >= 1, got {getattr(self, name)}")
        non_negative = (
            "weight_decay",
            "warmup_steps",
            "max_grad_norm",
            "checkpoint_every",
            "eval_every",
        )
        for name in non_negative:
            if getattr(self, name) < 0:
                raise ValueError(f"SFTConfig.{name} must be >= 0, got {getattr(self, name)}")
        if not self.learning_rate > 0:
            raise ValueError(f"SFTConfig.learning_rate must be > 0, got {self.learning_rate}")
        if not 0 <= self.lora_dropout < 1:
            raise ValueError(f"SFTConfig.lora_dropout must be in [0, 1), got {self.lora_dropout}")
        if not 0 <= self.val_fraction < 1:
            raise ValueError(f"SFTConfig.val_fraction must be in [0, 1), got {self.val_fraction}")
        if self.max_steps is not None and self.max_steps < 1:
            raise ValueError(f"SFTConfig.max_steps must be >= 1 or None, got {self.max_steps}")
        if self.log_every < 1:
            raise ValueError(f"SFTConfig.log_every must be >= 1, got {self.log_every}")
        if self.lr_schedule not in run.LR_SCHEDULES:
            raise ValueError(
                f"SFTConfig.lr_schedule must be one of {run.LR_SCHEDULES}: {self.lr_schedule!r}"
            )
        if self.precision not in run.PRECISIONS:
            raise ValueError(
                f"SFTConfig.precision must be one of {run.PRECISIONS}: {self.precision!r}"
            )
        if self.fp8_cache_mb < 0:
            raise ValueError(f"SFTConfig.fp8_cache_mb must be >= 0, got {self.fp8_cache_mb}")
        if self.early_stopping_patience is not None and self.early_stopping_patience < 1:
            raise ValueError("SFTConfig.early_stopping_patience must be >= 1 or None")
        if isinstance(self.freeze, str) or not all(isinstance(f, str) and f for f in self.freeze):
            raise ValueError(f"SFTConfig.freeze must be a tuple of name parts: {self.freeze!r}")
        unknown = set(self.targets) - set(lora.TARGET_SETS)
        if unknown or not self.targets:
            raise ValueError(f"SFTConfig.targets must be from {lora.TARGET_SETS}: {self.targets}")


class SFTCallbacks(TrainingCallbacks, Protocol):
    """What ``train_sft`` reports to and asks of its caller (all called between steps).

    on_metrics(metrics): after every ``log_every`` steps and the last one: step, epoch, loss
        (mean per assistant token over the step), token_accuracy (argmax hits on those
        tokens), lr (the rate the step used), grad_norm (before clipping), tokens_per_s
        (input tokens, padding excluded, since the previous report), trained_tokens (so
        far), elapsed_s (training time over all resumed segments), eta_s; plus val_loss and
        val_token_accuracy on steps that evaluated.
    on_checkpoint(step, state): every ``checkpoint_every`` steps; ``state`` is opaque bytes
        for ``resume_state`` (adapter, optimizer, scheduler, RNG, data position).
    should_stop(): polled before every step; "cancel" or "pause" ends the run there.
    """


@dataclass
class SFTResult:
    """How a run ended.

    status: "succeeded" (all steps, or early stopping), "cancelled" or "paused".
    steps: optimizer steps done in total (resumed segments included).
    adapter_files: the adapter in PEFT format (file name -> bytes); with early stopping,
        the adapter of the best evaluation.
    metrics: the last metrics dict reported, plus ``precision`` (the base's matmul dtype,
        "fp32" or "bf16"), and ``early_stopped`` and ``best_val_loss`` when validation ran.
    trained_tokens: assistant tokens the loss saw, over all segments.
    state: resumable state bytes after the last step (pass to ``resume_state``).
    """

    status: str
    steps: int
    adapter_files: dict[str, bytes]
    metrics: dict = field(default_factory=dict)
    trained_tokens: int = 0
    state: bytes = b""


def train_sft(
    config: SFTConfig,
    *,
    train_examples: Sequence[dict],
    val_examples: Sequence[dict] | None = None,
    callbacks: SFTCallbacks | None = None,
    resume_state: bytes | None = None,
    initial_adapter: Mapping[str, bytes] | None = None,
    extra_loss: Callable[[Any], torch.Tensor] | None = None,
    base_model: torch.nn.Module | None = None,
    tokenizer: Any = None,
) -> SFTResult:
    """Train a LoRA adapter on ``train_examples`` (chat, alpaca or sharegpt dicts).

    ``val_examples``: held-out examples; when None, ``config.val_fraction`` of the training
    examples are held out (chosen by seed). ``initial_adapter``: PEFT files to start from
    (its rank and alpha must match the config) instead of a fresh adapter.
    ``resume_state``: bytes from ``on_checkpoint`` or ``SFTResult.state``; the run continues
    exactly where that one stopped (the examples and config must be the same).

    ``extra_loss``: called with the PEFT model once per optimizer step, after the token
    loss's backward pass; its scalar result is added to the objective (e.g. FedProx's
    proximal term, ``federated.aggregation.fedprox_penalty``). Its value is reported as the
    metric ``extra_loss``; ``loss`` stays the token loss.
    ``base_model`` / ``tokenizer``: the already loaded model and tokenizer of
    ``config.model_path`` (a warm federated node keeps them between rounds). The model is
    copied before LoRA goes on, never modified, so one base serves every call.

    Raises ValueError for a bad config, invalid examples (``data.DataError`` names the
    example, 1-based), no trainable tokens, or a state/adapter that does not fit;
    ``inference.CheckpointError`` for an unreadable model. Exceptions from callbacks
    propagate.
    """
    config.validate()
    callbacks = callbacks or NullCallbacks()
    state = _load_state(resume_state, config) if resume_state is not None else None

    train_msgs = _normalise(train_examples, "train_examples")
    val_msgs = _normalise(val_examples, "val_examples") if val_examples else []
    if val_examples is None and config.val_fraction > 0:
        train_msgs, val_msgs = _split(train_msgs, config.val_fraction, config.seed)

    tokenizer = tokenizer if tokenizer is not None else _load_tokenizer(config.model_path)
    run.check_chat_encoding(config.model_path, tokenizer, train_msgs[0])
    train_rows = _rows(tokenizer, train_msgs, config, shuffle_seed=config.seed)
    val_rows = _rows(tokenizer, val_msgs, config, shuffle_seed=None) if val_msgs else []
    if not any(label != data.IGNORE_INDEX for row in train_rows for label in row.labels):
        raise ValueError("train_examples hold no assistant tokens to train on")

    device = run.pick_device()
    torch.manual_seed(config.seed)  # LoRA A init
    if base_model is not None:
        model = copy.deepcopy(base_model).to(device)  # peft wraps in place: keep the base clean
    else:
        model = inference.load_model(config.model_path, device=device)
    if initial_adapter is not None:  # a resume state then overwrites its tensors
        peft_model = lora.load_adapter(model, initial_adapter, trainable=True)
        _check_adapter_matches(peft_model, config)
    else:
        peft_model = lora.apply_lora(
            model, config.targets, config.lora_r, config.lora_alpha, config.lora_dropout
        )
    _freeze(peft_model, config.freeze)
    precision = run.prepare_base(peft_model, config.precision, config.fp8_cache_mb, device)
    params = [p for p in peft_model.parameters() if p.requires_grad]

    batches = data.BatchIterator(
        data.PackedDataset(train_rows),
        config.batch_size,
        seed=config.seed,
        epochs=None if config.max_steps is not None else config.epochs,
    )
    total_steps = config.max_steps or math.ceil(len(batches) * config.epochs / config.grad_accum)
    optimizer = torch.optim.AdamW(
        params, lr=config.learning_rate, weight_decay=config.weight_decay, foreach=False
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda step: run.lr_factor(step, config.warmup_steps, total_steps, config.lr_schedule),
    )
    progress = _Progress()
    if state is not None:
        _restore(state, peft_model, optimizer, scheduler, batches, progress)

    peft_model.train()
    last_metrics: dict = {}
    status = "succeeded"
    segment_start = time.perf_counter()
    elapsed_before = progress.elapsed_s
    report_time, report_tokens = segment_start, 0
    while progress.step < total_steps:
        request = check_stop_request(callbacks.should_stop())
        if request is not None:
            status = "cancelled" if request == "cancel" else "paused"
            break
        micro = _take(batches, config.grad_accum)
        if not micro:
            break  # the data ran out (epochs mode): the last step was the final one
        lr = scheduler.get_last_lr()[0]
        loss_sum, hits, n_tokens, n_input = _train_step(peft_model, micro, device)
        extra_value = None
        if extra_loss is not None:
            extra = extra_loss(peft_model)
            if extra.requires_grad:
                extra.backward()
            extra_value = float(extra.detach())
        grad_norm = run.clip_gradients(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        progress.step += 1
        progress.trained_tokens += n_tokens
        report_tokens += n_input
        progress.elapsed_s = elapsed_before + time.perf_counter() - segment_start

        last = progress.step == total_steps
        metrics = None
        if progress.step % config.log_every == 0 or last:
            now = time.perf_counter()
            done_here = progress.step - progress.segment_start_step
            eta = (now - segment_start) / max(done_here, 1) * (total_steps - progress.step)
            metrics = {
                "step": progress.step,
                "epoch": batches.epoch,
                "loss": loss_sum / max(n_tokens, 1),
                "token_accuracy": hits / max(n_tokens, 1),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens_per_s": report_tokens / max(now - report_time, 1e-9),
                "trained_tokens": progress.trained_tokens,
                "elapsed_s": progress.elapsed_s,
                "eta_s": eta,
            }
            if extra_value is not None:
                metrics["extra_loss"] = extra_value
            report_time, report_tokens = now, 0
        evaluate = val_rows and (
            last or (config.eval_every and progress.step % config.eval_every == 0)
        )
        stop_early = False
        if evaluate:
            val_loss, val_acc = _evaluate(peft_model, val_rows, config.batch_size, device)
            peft_model.train()
            metrics = metrics or {"step": progress.step, "epoch": batches.epoch}
            metrics.update(val_loss=val_loss, val_token_accuracy=val_acc)
            stop_early = _note_evaluation(progress, val_loss, peft_model, config)
        if metrics is not None:
            callbacks.on_metrics(metrics)
            last_metrics = metrics
        if config.checkpoint_every and progress.step % config.checkpoint_every == 0:
            callbacks.on_checkpoint(
                progress.step,
                _save_state(config, peft_model, optimizer, scheduler, batches, progress),
            )
        if stop_early:
            progress.early_stopped = True
            break

    final_state = _save_state(config, peft_model, optimizer, scheduler, batches, progress)
    if progress.best_lora is not None and config.early_stopping_patience is not None:
        run.load_lora_tensors(peft_model, progress.best_lora)
    result_metrics = dict(last_metrics, precision=precision)
    if progress.best_val_loss is not None:
        result_metrics.update(
            early_stopped=progress.early_stopped, best_val_loss=progress.best_val_loss
        )
    return SFTResult(
        status=status,
        steps=progress.step,
        adapter_files=lora.adapter_files(peft_model),
        metrics=result_metrics,
        trained_tokens=progress.trained_tokens,
        state=final_state,
    )


def evaluate_adapter(
    model_path: str,
    adapter_files: Mapping[str, bytes] | None,
    examples: Sequence[dict],
    *,
    max_seq_len: int = 512,
    batch_size: int = 4,
    precision: str = "auto",
) -> dict:
    """Loss of the base model plus ``adapter_files`` (None: the base alone) on ``examples``.

    Returns {"loss": mean per assistant token, "token_accuracy", "tokens"}: the numbers
    ``train_sft`` reports as val_loss and val_token_accuracy (with the same ``precision``:
    the base's matmul dtype, as ``SFTConfig.precision``). Raises as ``train_sft`` does.
    """
    config = SFTConfig(
        model_path=model_path, max_seq_len=max_seq_len, batch_size=batch_size, precision=precision
    )
    config.validate()
    rows = _rows(
        _load_tokenizer(model_path), _normalise(examples, "examples"), config, shuffle_seed=None
    )
    device = run.pick_device()
    model = inference.load_model(model_path, device=device)
    if adapter_files is not None:
        model = lora.load_adapter(model, adapter_files)
    run.prepare_base(model, precision, 0, device)
    loss, accuracy = _evaluate(model, rows, batch_size, device)
    tokens = sum(sum(1 for x in r.labels[1:] if x != data.IGNORE_INDEX) for r in rows)
    return {"loss": loss, "token_accuracy": accuracy, "tokens": tokens}


# ---- data ------------------------------------------------------------------------------


def _normalise(examples: Sequence[dict], what: str) -> list[list[dict]]:
    """Validate examples with finetune.data's rules and return their chat messages.

    The examples go through an in-memory JSONL stream (never a file), so every rule of the
    Files API applies here too. Raises data.DataError naming the 1-based example.
    """
    if isinstance(examples, (str, bytes)) or not isinstance(examples, Sequence):
        raise ValueError(f"{what} must be a sequence of example dicts")
    stream = io.BytesIO(
        b"".join(json.dumps(e, ensure_ascii=False).encode() + b"\n" for e in examples)
    )
    stream.name = f"<{what}>"
    return [example.messages for example in data.iter_examples(stream)]


def _split(
    messages: list[list[dict]], fraction: float, seed: int
) -> tuple[list[list[dict]], list[list[dict]]]:
    """(train, val): ``fraction`` of the examples (at least one) held out, chosen by seed."""
    if len(messages) < 2:
        raise ValueError("val_fraction needs at least two training examples")
    order = list(range(len(messages)))
    random.Random(f"val:{seed}").shuffle(order)
    n_val = min(max(1, round(len(messages) * fraction)), len(messages) - 1)
    held = set(order[:n_val])
    train = [m for i, m in enumerate(messages) if i not in held]
    val = [m for i, m in enumerate(messages) if i in held]
    return train, val


def _rows(
    tokenizer, messages: list[list[dict]], config: SFTConfig, shuffle_seed: int | None
) -> list[data.PackedRow]:
    encoded = [data.encode_chat(tokenizer, m) for m in messages]
    if shuffle_seed is not None and config.packing:
        # Which examples share a row depends on their order; fix it by seed.
        random.Random(f"examples:{shuffle_seed}").shuffle(encoded)
    rows, _ = data.pack_examples(
        encoded, config.max_seq_len, pack=config.packing, overflow="truncate"
    )
    if not rows:
        raise ValueError("no example has a trainable token within max_seq_len")
    return rows


def _load_tokenizer(model_path: str):
    from finetune.tokenizer import load_tokenizer

    return load_tokenizer(model_path)


def _take(batches: data.BatchIterator, n: int) -> list[dict[str, torch.Tensor]]:
    out = []
    for _ in range(n):
        try:
            out.append(next(batches))
        except StopIteration:
            break
    return out


# ---- the step ---------------------------------------------------------------------------


def token_loss(
    logits: torch.Tensor, labels: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Next-token loss on labelled positions: logits [B, T, V], labels [B, T] (aligned with
    the inputs, IGNORE_INDEX where untrained) -> (summed cross-entropy, top-1 hits, count)."""
    shift_logits = logits[:, :-1].float()
    shift_labels = labels[:, 1:]
    loss = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=data.IGNORE_INDEX,
        reduction="sum",
    )
    mask = shift_labels != data.IGNORE_INDEX
    hits = _hits(shift_logits[mask], shift_labels[mask])
    return loss, hits, int(mask.sum())


def _hits(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """How many rows of ``logits`` [n, V] score their target highest (an exact tie counts):
    the label's logit against the row maximum, 9x cheaper on a CPU than argmax."""
    logits = logits.detach()
    return (logits.gather(1, targets[:, None]).squeeze(1) >= logits.amax(-1)).sum()


def labelled_loss(
    model,
    ids: torch.Tensor,
    labels: torch.Tensor,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """``token_loss(model(ids), labels)`` computed with the vocabulary projection run only on
    the positions whose next token is labelled (``logits_at``): the same values, a fraction
    of the head's work and of the [B, T, vocab] logits' memory (about a third of the
    positions in chat SFT data are the assistant's).

    ``attention_mask`` (1 on real tokens) and ``position_ids``, as ``finetune.data``'s rows
    carry them: right padding is then not computed at all, and the examples packed into a
    row (positions restarting at 0) attend within themselves only (``segments``), so a
    packed example trains exactly as it would alone."""
    targets_mask = labels[:, 1:] != data.IGNORE_INDEX
    at = torch.zeros_like(labels, dtype=torch.bool)
    at[:, :-1] = targets_mask
    segments = row_segments(attention_mask, position_ids)
    # A sequence's last token never has a labelled target (the next one starts with bos,
    # unlabelled; padding is unlabelled), so the segments change no scored position.
    logits = model(ids, logits_at=at, segments=segments).float()
    targets = labels[:, 1:][targets_mask]
    loss = F.cross_entropy(logits, targets, reduction="sum")
    return loss, _hits(logits, targets), int(targets_mask.sum())


def row_segments(
    attention_mask: torch.Tensor | None, position_ids: torch.Tensor | None = None
) -> list[list[int]] | None:
    """Per row, the lengths of the sequences in it (``Transformer.forward``'s ``segments``):
    the real prefix of a right-padded ``attention_mask``, split where ``position_ids``
    restart at 0 (each sequence numbered 0, 1, 2, ...). None when there is nothing to skip
    or split, or the mask or positions are not of that form (the plain path then runs)."""
    if attention_mask is None:
        return None
    bsz, seqlen = attention_mask.shape
    lengths = attention_mask.sum(dim=1)
    steps = torch.arange(seqlen, device=attention_mask.device)
    if bool((lengths == 0).any()) or not torch.equal(
        attention_mask.bool(), steps < lengths[:, None]
    ):
        return None
    rows = []
    for b, n in enumerate(lengths.tolist()):
        if position_ids is None:
            rows.append([n])
            continue
        pos = position_ids[b, :n]
        starts = (pos == 0).nonzero().flatten().tolist()
        if not starts or starts[0] != 0:
            return None
        row = [end - start for start, end in zip(starts, [*starts[1:], n], strict=True)]
        if not torch.equal(pos.cpu(), torch.cat([torch.arange(m) for m in row])):
            return None
        rows.append(row)
    if all(row == [seqlen] for row in rows):
        return None
    return rows


def _train_step(
    model, micro: list[dict[str, torch.Tensor]], device: torch.device
) -> tuple[float, int, int, int]:
    """Forward and backward over the micro-batches of one step. Gradients are of the mean
    loss per trained token over the whole step. Returns (loss sum, hits, tokens, inputs)."""
    total = sum(int((b["labels"][:, 1:] != data.IGNORE_INDEX).sum()) for b in micro)
    loss_sum, hits_sum, n_input = 0.0, 0, 0
    for batch in micro:
        ids = batch["input_ids"].to(device)
        labels = batch["labels"].to(device)
        mask = batch["attention_mask"].to(device)
        positions = batch["position_ids"].to(device)
        loss, hits, count = labelled_loss(model, ids, labels, mask, positions)
        if count:
            (loss / max(total, 1)).backward()
        loss_sum += loss.item()
        hits_sum += int(hits)
        n_input += int(batch["attention_mask"].sum())
    return loss_sum, hits_sum, total, n_input


@torch.no_grad()
def _evaluate(
    model, rows: list[data.PackedRow], batch_size: int, device: torch.device
) -> tuple[float, float]:
    """(mean loss per trained token, token accuracy) over every validation row."""
    model.eval()
    dataset = data.PackedDataset(rows)
    loss_sum, hits, count = 0.0, 0, 0
    for start in range(0, len(dataset), batch_size):
        items = [dataset[i] for i in range(start, min(start + batch_size, len(dataset)))]
        ids = torch.stack([it["input_ids"] for it in items]).to(device)
        labels = torch.stack([it["labels"] for it in items]).to(device)
        mask = torch.stack([it["attention_mask"] for it in items]).to(device)
        positions = torch.stack([it["position_ids"] for it in items]).to(device)
        loss, h, c = labelled_loss(model, ids, labels, mask, positions)
        loss_sum, hits, count = loss_sum + loss.item(), hits + int(h), count + c
    return loss_sum / max(count, 1), hits / max(count, 1)


# ---- progress, early stopping and state -------------------------------------------------


@dataclass
class _Progress:
    step: int = 0
    trained_tokens: int = 0
    elapsed_s: float = 0.0
    best_val_loss: float | None = None
    bad_evals: int = 0
    best_lora: dict[str, torch.Tensor] | None = None
    early_stopped: bool = False
    segment_start_step: int = 0


def _note_evaluation(progress: _Progress, val_loss: float, model, config: SFTConfig) -> bool:
    """Track the best val_loss (and its adapter); True when patience has run out."""
    if progress.best_val_loss is None or val_loss < progress.best_val_loss:
        progress.best_val_loss = val_loss
        progress.bad_evals = 0
        if config.early_stopping_patience is not None:
            progress.best_lora = {k: v.detach().clone() for k, v in lora.lora_state(model).items()}
        return False
    progress.bad_evals += 1
    patience = config.early_stopping_patience
    return patience is not None and progress.bad_evals >= patience


def _resume_view(config: SFTConfig) -> dict:
    d = dataclasses.asdict(config)
    view = {k: d[k] for k in _RESUME_KEYS}
    view["targets"] = list(view["targets"])
    if config.freeze:  # only when set, so states written before the field still resume
        view["freeze"] = list(config.freeze)
    return view


def _save_state(config, model, optimizer, scheduler, batches, progress: _Progress) -> bytes:
    """Everything a fresh process needs to continue, as bytes (see finetune.run)."""
    payload = {
        "lora": run.lora_tensors(model),
        "optimizer": copy.deepcopy(optimizer.state_dict()),
        "scheduler": scheduler.state_dict(),
        "rng": run.rng_state(),
        "data": json.dumps(batches.state_dict()),
        "progress": json.dumps(
            {
                "step": progress.step,
                "trained_tokens": progress.trained_tokens,
                "elapsed_s": progress.elapsed_s,
                "best_val_loss": progress.best_val_loss,
                "bad_evals": progress.bad_evals,
            }
        ),
        "best_lora": progress.best_lora or {},
    }
    return run.dump_state("sft", _resume_view(config), payload)


def _load_state(raw: bytes, config: SFTConfig) -> dict:
    state = run.load_state(raw, "sft", _resume_view(config))
    saved = json.loads(state["config"]).get("freeze", [])
    if saved != list(config.freeze):  # the view only carries freeze when it is set
        raise ValueError(f"resume_state was written with freeze={saved!r}, not {config.freeze!r}")
    return state


def _restore(state: dict, model, optimizer, scheduler, batches, progress: _Progress) -> None:
    run.load_lora_tensors(model, state["lora"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    batches.load_state_dict(json.loads(state["data"]))
    saved = json.loads(state["progress"])
    progress.step = saved["step"]
    progress.segment_start_step = saved["step"]
    progress.trained_tokens = saved["trained_tokens"]
    progress.elapsed_s = saved["elapsed_s"]
    progress.best_val_loss = saved["best_val_loss"]
    progress.bad_evals = saved["bad_evals"]
    progress.best_lora = dict(state["best_lora"]) or None
    run.set_rng_state(state["rng"])


def _freeze(peft_model, parts: Sequence[str]) -> None:
    """Take the LoRA parameters whose name contains one of ``parts`` out of training.
    ValueError when a part matches no LoRA parameter or nothing would be left to train."""
    if not parts:
        return
    named = [(n, p) for n, p in peft_model.named_parameters() if "lora_" in n]
    for part in parts:
        if not any(part in n for n, _ in named):
            raise ValueError(f"SFTConfig.freeze: {part!r} matches no LoRA parameter")
    for name, p in named:
        if any(part in name for part in parts):
            p.requires_grad_(False)
    if not any(p.requires_grad for _, p in named):
        raise ValueError(f"SFTConfig.freeze={tuple(parts)} leaves no LoRA parameter to train")


def _check_adapter_matches(peft_model, config: SFTConfig) -> None:
    peft_config = peft_model.peft_config[lora.ADAPTER_NAME]
    if peft_config.r != config.lora_r or peft_config.lora_alpha != config.lora_alpha:
        raise ValueError(
            f"initial_adapter has r={peft_config.r}, alpha={peft_config.lora_alpha}; the config "
            f"asks for r={config.lora_r}, alpha={config.lora_alpha}"
        )


# ---- command line -----------------------------------------------------------------------


def parse_overrides(pairs: Sequence[str], config_cls: type) -> dict:
    """``["lora_r=16", "targets=mla,mlp"]`` -> {"lora_r": 16, "targets": ("mla", "mlp")}.

    Values are read as JSON when they parse (numbers, true, null), else as strings; tuple
    fields take comma-separated lists. ValueError for an unknown field or a missing "=".
    """
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    out: dict = {}
    for pair in pairs:
        key, sep, raw = pair.partition("=")
        if not sep or key not in fields or key == "model_path":
            raise ValueError(
                f"--set wants FIELD=VALUE with a field of {config_cls.__name__}: {pair!r}"
            )
        if str(fields[key].type).startswith("tuple"):
            out[key] = tuple(v for v in raw.split(",") if v)
            continue
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out
