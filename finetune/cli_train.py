"""The training subcommands of ``python -m finetune``: sft, grpo, eval, pretrain.

Each is a pair, as ``finetune/__main__.py`` expects: ``add_<name>(subparsers)`` declares the
arguments, ``run_<name>(args)`` runs and returns the exit status. Common behaviour:

- a JSON summary on stdout at the end (the eval report for ``eval``);
- per-step metrics appended as JSON lines to ``--metrics`` (default: ``OUT/metrics.jsonl``),
  through ``finetune.callbacks.JsonlMetricsLog``, so a UI can tail them;
- a progress bar on stderr, only when stderr is a terminal (logs and pipes stay clean);
- the first Ctrl-C asks the loop to stop between steps: the run ends "cancelled" and the
  adapter (or model) trained so far is still written; a second Ctrl-C aborts at once.

Heavy imports (torch, transformers) happen inside ``run_*`` so ``--help`` is quick.
Exit status: 0 done, 1 invalid data, 2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
from pathlib import Path

# ---- shared: callbacks with a progress bar, Ctrl-C as a stop request ---------------------


class CliCallbacks:
    """TrainingCallbacks for a terminal: metrics to a JSONL file, a tqdm bar on a TTY, and
    Ctrl-C turned into a "cancel" stop request (restored by ``close``)."""

    def __init__(self, metrics_path: str | Path | None, total: int | None, desc: str):
        from finetune.callbacks import JsonlMetricsLog

        self.log = JsonlMetricsLog(metrics_path) if metrics_path else None
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, unit="step", file=sys.stderr)
        self.stop: str | None = None
        self._previous = signal.getsignal(signal.SIGINT)
        signal.signal(signal.SIGINT, self._on_interrupt)

    def _on_interrupt(self, signum, frame) -> None:
        if self.stop is not None:  # a second Ctrl-C: the user means it
            signal.signal(signal.SIGINT, self._previous)
            raise KeyboardInterrupt
        self.stop = "cancel"
        print("\nstopping after this step (Ctrl-C again to abort)", file=sys.stderr)

    def on_metrics(self, metrics: dict) -> None:
        if self.log is not None:
            self.log.on_metrics(metrics)
        if self.bar is not None and isinstance(metrics.get("step"), int):
            self.bar.update(metrics["step"] - self.bar.n)
            shown = {k: metrics[k] for k in ("loss", "reward_mean", "lr") if k in metrics}
            self.bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items() if v is not None})

    def on_checkpoint(self, step: int, state: bytes) -> None:
        pass  # the CLI runs are not resumable; jobs in the platform are

    def should_stop(self) -> str | None:
        return self.stop

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        signal.signal(signal.SIGINT, self._previous)


def _write_adapter(out: Path, files: dict[str, bytes]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, blob in files.items():
        (out / name).write_bytes(blob)


def _metrics_path(args) -> Path:
    return Path(args.metrics) if args.metrics else Path(args.out) / "metrics.jsonl"


def _set_threads(threads: int | None) -> None:
    if threads:
        import torch

        torch.set_num_threads(threads)


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--metrics", help="JSONL file the metrics are appended to (default: OUT/metrics.jsonl)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument(
        "--set",
        action="append",
        metavar="FIELD=VALUE",
        help="any other config field, e.g. --set lora_dropout=0.05 (repeatable)",
    )


# ---- sft ---------------------------------------------------------------------------------


def add_sft(subparsers) -> None:
    parser = subparsers.add_parser(
        "sft",
        help="LoRA supervised fine-tuning on a chat JSONL file",
        description="Train a LoRA adapter on the frozen (FP8) base with loss on assistant "
        "tokens only; write it in PEFT format to OUT. Flags map to finetune.sft.SFTConfig.",
    )
    parser.add_argument("--model", required=True, help="base model directory")
    parser.add_argument("--data", required=True, help="training JSONL (chat, alpaca, sharegpt)")
    parser.add_argument("--val", help="validation JSONL (default: none, or --val-fraction)")
    parser.add_argument("--out", required=True, help="adapter directory to write")
    parser.add_argument("--steps", type=int, help="optimizer steps (default: --epochs passes)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=2e-4, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--grad-accum", type=int, default=1)
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lora-alpha", type=int, default=16)
    parser.add_argument("--targets", default="mla,mlp", help="LoRA target sets, comma-separated")
    parser.add_argument("--val-fraction", type=float, default=0.0)
    parser.add_argument("--packing", action="store_true", help="pack examples into rows")
    parser.add_argument("--seed", type=int, default=0)
    _common(parser)
    parser.set_defaults(func=run_sft)


def run_sft(args: argparse.Namespace) -> int:
    from finetune import data
    from finetune.sft import SFTConfig, parse_overrides, train_sft

    try:
        config = SFTConfig(
            model_path=args.model,
            max_steps=args.steps,
            epochs=args.epochs,
            learning_rate=args.lr,
            warmup_steps=args.warmup_steps,
            batch_size=args.batch_size,
            grad_accum=args.grad_accum,
            max_seq_len=args.max_seq_len,
            lora_r=args.lora_r,
            lora_alpha=args.lora_alpha,
            targets=tuple(t for t in args.targets.split(",") if t),
            val_fraction=args.val_fraction,
            packing=args.packing,
            seed=args.seed,
            **parse_overrides(args.set or [], SFTConfig),
        )
        config.validate()
    except (ValueError, TypeError) as e:
        print(f"sft: {e}", file=sys.stderr)
        return 2
    try:
        train = [{"messages": e.messages} for e in data.iter_examples(args.data)]
        val = [{"messages": e.messages} for e in data.iter_examples(args.val)] if args.val else None
    except data.DataError as e:
        print(str(e), file=sys.stderr)
        return 1
    _set_threads(args.threads)
    callbacks = CliCallbacks(_metrics_path(args), args.steps, "sft")
    try:
        result = train_sft(config, train_examples=train, val_examples=val, callbacks=callbacks)
    except ValueError as e:  # e.g. no example fits max_seq_len, a template mismatch
        print(f"sft: {e}", file=sys.stderr)
        return 1
    finally:
        callbacks.close()
    _write_adapter(Path(args.out), result.adapter_files)
    summary = {
        "status": result.status,
        "steps": result.steps,
        "trained_tokens": result.trained_tokens,
        "metrics": result.metrics,
        "adapter": str(args.out),
    }
    print(json.dumps(summary, sort_keys=True))
    return 0


# ---- grpo --------------------------------------------------------------------------------


def add_grpo(subparsers) -> None:
    from finetune.domains import SUITES

    parser = subparsers.add_parser(
        "grpo",
        help="GRPO with LoRA on a domain suite's verifiable rewards",
        description="Reinforcement learning with GRPO on a task suite (rule-based rewards), "
        "optionally starting from an SFT adapter; write the adapter in PEFT format to OUT. "
        "Flags map to finetune.grpo.GRPOConfig.",
    )
    parser.add_argument("--model", required=True, help="base model directory")
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--out", required=True, help="adapter directory to write")
    parser.add_argument("--n", type=int, default=256, help="task items to draw prompts from")
    parser.add_argument("--task-seed", type=int, default=2, help="seed of the task items")
    parser.add_argument("--initial-adapter", help="PEFT adapter directory to start from")
    parser.add_argument("--steps", type=int, default=100, help="generation batches")
    parser.add_argument("--prompts-per-step", type=int, default=4)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=1e-5, help="peak learning rate")
    parser.add_argument("--max-completion-length", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--loss-type", default="dapo", help="grpo, bnpo, dr_grpo or dapo")
    parser.add_argument("--beta", type=float, default=0.0, help="KL coefficient to the base")
    parser.add_argument("--seed", type=int, default=0)
    _common(parser)
    parser.set_defaults(func=run_grpo)


def run_grpo(args: argparse.Namespace) -> int:
    from finetune.evaluate import suite_items
    from finetune.grpo import GRPOConfig, train_grpo
    from finetune.lora import CONFIG_NAME, WEIGHTS_NAME
    from finetune.sft import parse_overrides

    try:
        config = GRPOConfig(
            model_path=args.model,
            max_steps=args.steps,
            prompts_per_step=args.prompts_per_step,
            group_size=args.group_size,
            learning_rate=args.lr,
            max_completion_length=args.max_completion_length,
            temperature=args.temperature,
            loss_type=args.loss_type,
            beta=args.beta,
            seed=args.seed,
            **parse_overrides(args.set or [], GRPOConfig),
        )
        config.validate()
        if args.n < 1:
            raise ValueError("--n must be at least 1")
    except (ValueError, TypeError) as e:
        print(f"grpo: {e}", file=sys.stderr)
        return 2
    initial = None
    if args.initial_adapter:
        source = Path(args.initial_adapter)
        try:
            initial = {name: (source / name).read_bytes() for name in (CONFIG_NAME, WEIGHTS_NAME)}
        except OSError as e:
            print(f"grpo: cannot read the initial adapter: {e}", file=sys.stderr)
            return 2
    tasks = suite_items(args.suite, args.n, args.task_seed)
    _set_threads(args.threads)
    callbacks = CliCallbacks(_metrics_path(args), args.steps, "grpo")
    try:
        result = train_grpo(config, tasks=tasks, callbacks=callbacks, initial_adapter=initial)
    finally:
        callbacks.close()
    _write_adapter(Path(args.out), result.adapter_files)
    summary = {"status": result.status, "steps": result.steps, "metrics": result.metrics}
    print(json.dumps({**summary, "adapter": str(args.out)}, sort_keys=True))
    return 0


# ---- eval --------------------------------------------------------------------------------


def add_eval(subparsers) -> None:
    from finetune.domains import SUITES
    from finetune.evaluate import DEFAULT_MAX_TOKENS, EVAL_SEED

    parser = subparsers.add_parser(
        "eval",
        help="held-out accuracy per task family, as JSON",
        description="Greedy generation with the serving engine on N items of a suite "
        "(held-out seed), scored by the suite's reward; prints the report as JSON.",
    )
    parser.add_argument("--model", required=True, help="base model directory")
    parser.add_argument("--adapter", help="PEFT LoRA adapter directory (default: none)")
    parser.add_argument("--suite", required=True, choices=sorted(SUITES))
    parser.add_argument("--n", type=int, default=200, help="items (families take turns)")
    parser.add_argument("--seed", type=int, default=EVAL_SEED, help="item seed (held out)")
    parser.add_argument("--max-tokens", type=int, default=DEFAULT_MAX_TOKENS)
    parser.add_argument("--chunk", type=int, default=64, help="prompts submitted together")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    parser.add_argument("--out", help="also write the report to this JSON file")
    parser.set_defaults(func=run_eval)


def run_eval(args: argparse.Namespace) -> int:
    from finetune.evaluate import evaluate_suite

    if args.n < 1 or args.chunk < 1 or args.max_tokens < 1:
        print("eval: --n, --chunk and --max-tokens must be at least 1", file=sys.stderr)
        return 2
    _set_threads(args.threads)
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=args.n, desc=f"eval {args.suite}", unit="item", file=sys.stderr)
    try:
        report = evaluate_suite(
            args.model,
            args.suite,
            n=args.n,
            seed=args.seed,
            adapter=args.adapter,
            max_tokens=args.max_tokens,
            chunk=args.chunk,
            progress=(lambda done, n: bar.update(done - bar.n)) if bar is not None else None,
        )
    except ValueError as e:
        print(f"eval: {e}", file=sys.stderr)
        return 2
    finally:
        if bar is not None:
            bar.close()
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.out:
        Path(args.out).write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0


# ---- pretrain ----------------------------------------------------------------------------


def add_pretrain(subparsers) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="train a small MoE-MLA base model from scratch on the generated corpus",
        description="Train the tokenizer and a DeepSeek-V3-architecture model on the "
        "project's generated corpus (CPU is enough for the tiny sizes), and write an FP8 "
        "checkpoint with tokenizer and chat template to OUT. Flags map to "
        "finetune.pretrain.PretrainConfig; model sizes are changed with --override.",
    )
    parser.add_argument("--out", required=True, help="model directory to write")
    parser.add_argument("--config", help="model config.json (default: models/configs/tiny.json)")
    parser.add_argument(
        "--override",
        action="append",
        metavar="FIELD=VALUE",
        help="replace a model config field, e.g. --override hidden_size=192 (repeatable)",
    )
    parser.add_argument("--steps", type=int, default=360)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, default=20)
    parser.add_argument(
        "--chat-share", type=float, default=0.5, help="share of the corpus's task chats kept"
    )
    parser.add_argument("--tokenizer-docs", type=int, default=30_000)
    parser.add_argument("--tokenizer", help="reuse this tokenizer directory instead of training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--log-every", type=int, default=10)
    parser.add_argument("--metrics", help="JSONL metrics file (default: OUT.metrics.jsonl)")
    parser.set_defaults(func=run_pretrain)


def run_pretrain(args: argparse.Namespace) -> int:
    from finetune.pretrain import DEFAULT_CONFIG, PretrainConfig, train_pretrain

    overrides: dict = {}
    for pair in args.override or []:
        key, sep, raw = pair.partition("=")
        if not sep:
            print(f"pretrain: --override wants FIELD=VALUE, got {pair!r}", file=sys.stderr)
            return 2
        try:
            overrides[key] = json.loads(raw)
        except json.JSONDecodeError:
            overrides[key] = raw
    try:
        config = PretrainConfig(
            out_dir=args.out,
            model_config=args.config or str(DEFAULT_CONFIG),
            overrides=overrides,
            steps=args.steps,
            batch_size=args.batch_size,
            seq_len=args.seq_len,
            learning_rate=args.lr,
            warmup_steps=args.warmup_steps,
            chat_share=args.chat_share,
            tokenizer_docs=args.tokenizer_docs,
            tokenizer_dir=args.tokenizer,
            seed=args.seed,
            threads=args.threads,
            log_every=args.log_every,
        )
        config.validate()
        from finetune.pretrain import model_config

        model_config(config)  # a bad override fails here, before the tokenizer trains
    except (ValueError, TypeError, OSError) as e:
        print(f"pretrain: {e}", file=sys.stderr)
        return 2
    # Beside OUT, not in it: the model directory holds only what ships.
    metrics = Path(args.metrics) if args.metrics else Path(str(Path(args.out)) + ".metrics.jsonl")
    callbacks = CliCallbacks(metrics, args.steps, "pretrain")
    try:
        result = train_pretrain(config, callbacks)
    finally:
        callbacks.close()
    print(json.dumps({**result.__dict__, "metrics_log": str(metrics)}, sort_keys=True))
    return 0


COMMANDS = [add_sft, add_grpo, add_eval, add_pretrain]
