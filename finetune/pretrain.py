"""Pre-training from scratch on CPU: the recipe of the tiny base model we ship.

    train_pretrain(PretrainConfig(out_dir=..., steps=...), callbacks=...) -> PretrainResult

One run does everything the shipped model needs, in order:

1. trains the byte-level BPE tokenizer on the project's own corpus
   (``finetune.tokenizer.train_tokenizer`` over ``finetune.corpus.generate_corpus``);
2. builds a DeepSeek-V3-architecture ``inference.Transformer`` (MLA + DeepSeekMoE) from a
   config.json, in float32, randomly initialised;
3. trains it with next-token loss on packed documents of the same generated corpus (domain
   chats in the R1 ``<think>…</think><answer>…</answer>`` format, templated reports,
   arithmetic, prose, multilingual lines), AdamW with warmup and cosine decay, and the
   DeepSeek-V3 auxiliary-loss-free expert balancing (the router's correction bias is nudged
   towards under-used experts after every step, no gradient involved);
4. writes the result in the DeepSeek-V3 FP8 checkpoint format (``inference.convert``):
   config.json, model.safetensors, tokenizer.json, tokenizer_config.json with the chat
   template.

Task chats in the corpus come from the suites' items of ``corpus_seed``; evaluation and the
fine-tuning runs use other seeds, so what they measure is held out (the classification
families draw from finite templates, so a held-out item can still repeat a seen sentence).

Nothing is downloaded. The same config, seed and thread count give the same weights.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import shutil
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from finetune.callbacks import NullCallbacks, TrainingCallbacks, check_stop_request
from finetune.run import lr_factor

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "models" / "configs" / "tiny.json"


@dataclass
class PretrainConfig:
    """Everything a pre-training run depends on. ``validate()`` raises ValueError."""

    out_dir: str  # where the FP8 checkpoint and tokenizer are written (created)
    model_config: str = str(DEFAULT_CONFIG)  # a config.json (HF DeepseekV3 keys)
    overrides: dict = field(default_factory=dict)  # ModelConfig fields replaced, e.g. sizes
    steps: int = 360  # optimizer steps
    batch_size: int = 8  # packed rows per step
    seq_len: int = 256  # tokens per row
    learning_rate: float = 3e-3  # peak AdamW learning rate
    min_lr_ratio: float = 0.1  # the cosine ends at this share of the peak
    warmup_steps: int = 20  # linear warmup steps
    weight_decay: float = 0.1  # AdamW decoupled weight decay (matrices only)
    max_grad_norm: float = 1.0  # global gradient-norm clip
    bias_update_rate: float = 1e-3  # aux-loss-free balancing step (DeepSeek-V3's gamma)
    seed: int = 0  # weight init and document order
    corpus_seed: int = 0  # seed of the generated corpus (and of the task items it holds)
    chat_share: float = 0.5  # share of the corpus's task chats kept (the rest are skipped)
    tokenizer_docs: int = 30_000  # corpus documents the tokenizer is trained on
    tokenizer_dir: str | None = None  # reuse a trained tokenizer instead of training one
    threads: int = 1  # torch intra-op threads
    log_every: int = 10  # on_metrics every this many steps (and at the last one)
    fp8: bool = True  # write FP8 (the shipped format); False keeps float32

    def validate(self) -> None:
        positive = ("steps", "batch_size", "seq_len", "threads", "log_every", "tokenizer_docs")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")
        if not 0.0 < self.chat_share <= 1.0:
            raise ValueError("chat_share must be in (0, 1]")
        if self.learning_rate <= 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError("learning_rate must be positive and min_lr_ratio in [0, 1]")


@dataclass
class PretrainResult:
    out_dir: str
    status: str  # "completed" or "cancelled" (a cancelled run still writes its weights)
    steps: int
    trained_tokens: int
    elapsed_s: float
    metrics: dict  # the last logged metrics
    params: int  # parameters of the float32 model
    size_bytes: int  # bytes of the written safetensors


def model_config(config: PretrainConfig):
    """The ModelConfig the run builds: the JSON file with ``overrides`` applied."""
    from inference.config import ModelConfig

    base = ModelConfig.from_json(config.model_config)
    return base.replace(**config.overrides) if config.overrides else base


def documents(corpus_seed: int, chat_share: float) -> Iterator[str]:
    """The pre-training stream, endless: ``generate_corpus`` documents, with each of its task
    chats replaced, with probability ``chat_share``, by a chat of our own (else dropped).

    Ours cycle through both suites and every family in turn: ``generate_corpus`` picks the
    suite and the item index in lockstep (slot i % 5, family i % 4), so it only ever holds
    two of the four families of each suite. Non-chat documents get the bos/eos tokens the
    chats carry, so every document starts with <|bos|> and ends with <|end|>, as served
    conversations do.
    """
    from finetune.corpus import generate_corpus
    from finetune.domains import SUITES
    from finetune.tokenizer import BOS, EOS, render_chat

    rng = random.Random(f"pretrain-docs:{corpus_seed}")
    suites = [SUITES[name] for name in sorted(SUITES)]
    chats = 0
    # generate_corpus fixes its length up front; a long run asks for blocks of documents
    # from successive seeds, so the stream never repeats itself.
    block = 0
    while True:
        for text in generate_corpus(corpus_seed + 1000 * block, 10_000):
            if not text.startswith(BOS):
                yield f"{BOS}{text}{EOS}"
            elif rng.random() < chat_share:
                suite = suites[chats % len(suites)]
                family = suite.families[(chats // len(suites)) % len(suite.families)]
                chats += 1
                try:
                    item = suite.item(chats, corpus_seed, family)
                except ZeroDivisionError:
                    # finance's balance-sheet generator can draw a zero denominator; that
                    # draw is skipped rather than ending the run.
                    continue
                yield render_chat(item.sft_messages())
        block += 1


def token_rows(tokenizer, docs: Iterator[str], seq_len: int) -> Iterator[list[int]]:
    """Pack documents end to end and cut rows of ``seq_len + 1`` tokens (inputs + the next
    token). Documents cross row boundaries; attention crosses document boundaries, as in
    GPT-style packing (the bos token marks where a new one starts)."""
    buffer: list[int] = []
    while True:
        while len(buffer) < seq_len + 1:
            buffer.extend(tokenizer.encode(next(docs), add_special_tokens=False))
        yield buffer[: seq_len + 1]
        buffer = buffer[seq_len + 1 :]


def init_weights(model: torch.nn.Module, num_layers: int, seed: int) -> None:
    """GPT-2-style init: normal(0.02) everywhere, output projections scaled by
    1/sqrt(2 * layers) so the residual stream does not grow with depth. Norms stay at one,
    the router at its own init, the correction bias at zero."""
    generator = torch.Generator().manual_seed(seed)
    residual_std = 0.02 / math.sqrt(2 * num_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                continue
            if name.endswith("mlp.gate.weight"):
                continue
            std = residual_std if name.endswith(("o_proj.weight", "down_proj.weight")) else 0.02
            p.copy_(torch.randn(p.shape, generator=generator) * std)


class _ExpertLoad:
    """Counts the tokens each router sends to each expert during one step (forward hooks),
    for the aux-loss-free balancing update."""

    def __init__(self, model: torch.nn.Module):
        from inference.model import Gate

        self.gates = [m for m in model.modules() if isinstance(m, Gate)]
        self.counts = [torch.zeros(g.weight.shape[0]) for g in self.gates]
        for i, gate in enumerate(self.gates):
            gate.register_forward_hook(self._hook(i))

    def _hook(self, i: int):
        def hook(module, inputs, output):
            _, indices = output
            self.counts[i] += torch.bincount(
                indices.flatten(), minlength=self.counts[i].numel()
            ).float()

        return hook

    def update_biases(self, rate: float) -> float:
        """Raise the bias of under-loaded experts, lower the over-loaded ones (sign update,
        DeepSeek-V3 section 2.1.2); return the worst max/mean load ratio, then reset."""
        worst = 0.0
        with torch.no_grad():
            for gate, count in zip(self.gates, self.counts, strict=True):
                if count.sum() == 0:
                    continue
                mean = count.mean()
                worst = max(worst, float(count.max() / mean))
                if gate.e_score_correction_bias is not None and rate > 0:
                    gate.e_score_correction_bias += rate * torch.sign(mean - count)
                count.zero_()
        return worst


def train_pretrain(
    config: PretrainConfig, callbacks: TrainingCallbacks | None = None
) -> PretrainResult:
    """Train a base model from scratch and write it to ``config.out_dir``.

    ``callbacks.on_metrics`` gets a dict every ``log_every`` steps and at the end: step,
    steps, loss, lr, grad_norm, tokens_per_s, elapsed_s, eta_s, expert_imbalance (max/mean
    routed load of the worst MoE layer). ``should_stop`` is polled between steps; "cancel" or
    "pause" ends the run early and still writes the weights (status "cancelled").
    Checkpoints are not written: a run is short enough to repeat.

    Raises ValueError for a bad config, and whatever the tokenizer or writer raise (OSError
    for an unwritable ``out_dir``).
    """
    from finetune.tokenizer import load_tokenizer, train_tokenizer
    from inference.checkpoint import save_checkpoint
    from inference.convert import convert
    from inference.model import Transformer

    config.validate()
    callbacks = callbacks or NullCallbacks()
    torch.set_num_threads(config.threads)
    out = Path(config.out_dir)
    work = out.with_name(out.name + ".fp32") if config.fp8 else out
    work.mkdir(parents=True, exist_ok=True)

    if config.tokenizer_dir:
        for name in ("tokenizer.json", "tokenizer_config.json"):
            shutil.copy2(Path(config.tokenizer_dir) / name, work / name)
    else:
        # Trained on the same stream the model reads (all task families included).
        texts = itertools.islice(
            documents(config.corpus_seed, config.chat_share), config.tokenizer_docs
        )
        train_tokenizer(work, texts=texts)
    tokenizer = load_tokenizer(work)
    mconfig = model_config(config)
    if len(tokenizer) > mconfig.vocab_size:
        raise ValueError(
            f"the tokenizer has {len(tokenizer)} tokens, the model {mconfig.vocab_size}"
        )

    torch.manual_seed(config.seed)
    model = Transformer(mconfig, compute_dtype=torch.float32)
    init_weights(model, mconfig.num_hidden_layers, config.seed)
    model.train()
    params = sum(p.numel() for p in model.parameters())
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "mlp.gate." not in n]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2 or "mlp.gate." in n]
    optimizer = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": config.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=config.learning_rate,
        betas=(0.9, 0.95),
    )
    load = _ExpertLoad(model)
    rows = token_rows(tokenizer, documents(config.corpus_seed, config.chat_share), config.seq_len)

    start = time.monotonic()
    tokens = 0
    status = "completed"
    metrics: dict = {}
    done = 0
    for step in range(config.steps):
        if check_stop_request(callbacks.should_stop()):
            status = "cancelled"
            break
        factor = lr_factor(step, config.warmup_steps, config.steps)
        lr = config.learning_rate * (config.min_lr_ratio + (1 - config.min_lr_ratio) * factor)
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = torch.tensor([next(rows) for _ in range(config.batch_size)])
        logits = model(batch[:, :-1])
        loss = F.cross_entropy(logits.flatten(0, 1).float(), batch[:, 1:].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm))
        optimizer.step()
        imbalance = load.update_biases(config.bias_update_rate)
        tokens += batch[:, 1:].numel()
        done = step + 1
        if done % config.log_every == 0 or done == config.steps:
            elapsed = time.monotonic() - start
            metrics = {
                "step": done,
                "steps": config.steps,
                "loss": loss.item(),
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": tokens,
                "tokens_per_s": tokens / elapsed,
                "elapsed_s": elapsed,
                "eta_s": elapsed / done * (config.steps - done),
                "expert_imbalance": imbalance,
            }
            callbacks.on_metrics(metrics)
    elapsed = time.monotonic() - start

    model.eval()
    save_checkpoint(model, work)
    if config.fp8:
        convert(work, out, "fp8")
        shutil.rmtree(work)
    (out / "pretrain_config.json").write_text(
        json.dumps(asdict(config), indent=2, sort_keys=True) + "\n"
    )
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    return PretrainResult(
        out_dir=str(out),
        status=status,
        steps=done,
        trained_tokens=tokens,
        elapsed_s=elapsed,
        metrics=metrics,
        params=params,
        size_bytes=size,
    )
