"""Fine-tuning speed: our LoRA SFT and GRPO against peft + transformers and TRL, same run.

    python bench/finetune.py                 # models/configs/tiny.json, the full settings
    python bench/finetune.py --quick --out DIR  # tiny sizes: a quick end-to-end check
    python bench/finetune.py --quick --jobs 2   # the same, two sides at once (the test)

One random ``DeepseekV3ForCausalLM`` is built from the config (transformers, seeded) and
saved; ours is the same checkpoint converted to our FP8 format (what we ship and train on:
FP8 frozen base, fp32 LoRA). transformers has no CPU FP8 path, so its side trains the fp32
original. Both sides get the shipped model's tokenizer (models/enclave-tiny; TRL gets it as a
``PreTrainedTokenizerFast`` built from tokenizer.json, nothing downloaded), the same LoRA
(rank, alpha, the "mla" and "mlp" target sets resolved to the same module names), the same
data and the same optimizer settings.

- SFT: ours is ``finetune.sft.train_sft``; the anchor is the plain peft + transformers loop
  (forward, the same token loss, backward, clip, AdamW, cosine schedule) over exactly the
  batches ``train_sft`` sees (the finance suite's SFT conversations, packed rows). Both keep
  packed examples apart: ours runs each as its own sequence with no padding computed;
  transformers builds a block-diagonal mask from the restarting position ids. Each side
  runs in float32 and in bf16 matmuls (ours: ``precision``, the FP8 base's products in
  bf16; the anchor: ``torch.autocast``), and the like-for-like pairs are compared.
  Measured: input tokens per second over the steps after the first, and peak RSS.
- GRPO: ours is ``finetune.grpo.train_grpo`` (groups sampled by our serving engine); the
  anchor is TRL's ``GRPOTrainer`` with the same LoRA (its generation: transformers'
  ``generate`` with a KV cache). Same prompts (finance tasks, chat-rendered), group size,
  completion length, temperature, loss (dapo, beta 0, epsilon 0.2/0.28), one optimizer step
  per generation batch, no gradient checkpointing (TRL's default is on; ours has none).
  Both score completions with the same cheap rule (the share of digits). Measured: steps
  per second over the steps after the first, and the share of each step spent generating
  (ours: the engine call; TRL: its ``_generate``).

Every side runs in its own subprocess (so its peak RSS is its own); sides alternate,
``--rounds`` times, and the best round counts, as the machine may be shared. Writes
``<out>/finetune.json`` and prints the ratios. Targets on CPU: SFT >= 1.5x tokens/s,
GRPO >= 2x steps/s, generation <= 50% of our GRPO step.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a script, not a package: find `finetune` from the checkout

SIDES = ("ours_sft", "peft_sft", "ours_sft_fp32", "peft_sft_bf16", "ours_grpo", "trl_grpo")
TOKENIZER_DIR = REPO / "models" / "enclave-tiny"
TARGET_SFT_SPEEDUP = 1.5
TARGET_GRPO_SPEEDUP = 2.0
TARGET_GENERATION_SHARE = 0.5

FULL = {
    "layers": None,  # the config's own
    "lora_r": 8,
    "lora_alpha": 16,
    "learning_rate": 1e-4,
    "sft_steps": 12,
    "sft_batch": 4,
    "sft_seq_len": 256,
    "grpo_steps": 5,
    "grpo_prompts": 4,
    "grpo_group": 8,
    "grpo_completion": 64,
    "grpo_prompt_len": 256,
}
QUICK = {
    **FULL,
    "layers": 2,
    "sft_steps": 3,
    "sft_batch": 1,
    "grpo_steps": 2,
    "grpo_prompts": 2,
    "grpo_group": 2,
    "grpo_completion": 4,
}


# ---- the shared checkpoint -----------------------------------------------------------------


def make_checkpoints(config_path: Path, work: Path, layers: int | None, seed: int) -> None:
    """work/hf: random transformers model (save_pretrained); work/fp8: ours, converted from
    it; both with the shipped tokenizer."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    import inference

    d = json.loads(config_path.read_text())
    if layers is not None:
        d["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(d)).eval()
    model.save_pretrained(work / "hf")
    inference.save_checkpoint(inference.load_model(work / "hf", fp8=True), work / "fp8")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        for target in (work / "hf", work / "fp8"):
            shutil.copy(TOKENIZER_DIR / name, target / name)


def _peak_rss_bytes() -> int:
    """VmHWM: this process's own peak (imports included)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# ---- SFT -------------------------------------------------------------------------------------


def _sft_examples(s: dict) -> list[dict]:
    from finetune.domains import SUITES

    n = s["sft_batch"] * s["sft_steps"] * 3  # packed rows hold several conversations
    return [{"messages": it.sft_messages()} for it in SUITES["finance"].generate(n, seed=1)]


def _sft_config(work: Path, s: dict, precision: str = "auto"):
    from finetune.sft import SFTConfig

    return SFTConfig(
        precision=precision,
        model_path=str(work / "fp8"),
        lora_r=s["lora_r"],
        lora_alpha=s["lora_alpha"],
        learning_rate=s["learning_rate"],
        max_steps=s["sft_steps"],
        batch_size=s["sft_batch"],
        max_seq_len=s["sft_seq_len"],
        packing=True,
    )


def _sft_batches(work: Path, s: dict) -> list[dict]:
    """The batches ``train_sft`` draws for these settings (its encoding, packing and order)."""
    import random

    from finetune import data
    from finetune.tokenizer import load_tokenizer

    config = _sft_config(work, s)
    tokenizer = load_tokenizer(work / "fp8")
    encoded = [data.encode_chat(tokenizer, e["messages"]) for e in _sft_examples(s)]
    random.Random(f"examples:{config.seed}").shuffle(encoded)
    rows, _ = data.pack_examples(encoded, config.max_seq_len, pack=True, overflow="truncate")
    batches = data.BatchIterator(data.PackedDataset(rows), config.batch_size, seed=config.seed)
    return [next(batches) for _ in range(config.max_steps)]


def _rate(step_times: list[float], step_tokens: list[int] | None = None) -> tuple[float, float]:
    """(per second, seconds) over every step but the first (warm-up: kernel choice, caches)."""
    times = step_times[1:]
    amount = sum(step_tokens[1:]) if step_tokens is not None else len(times)
    return amount / sum(times), sum(times)


def ours_sft(work: Path, s: dict, precision: str = "auto") -> dict:
    import torch

    from finetune.sft import train_sft

    stamps: list[float] = []

    class Clock:
        def on_metrics(self, metrics):
            stamps.append(time.perf_counter())
            losses.append(metrics["loss"])

        def on_checkpoint(self, step, state):
            pass

        def should_stop(self):
            return None

    losses: list[float] = []
    tokens = [int(b["attention_mask"].sum()) for b in _sft_batches(work, s)]
    torch.manual_seed(0)
    start = time.perf_counter()
    result = train_sft(
        _sft_config(work, s, precision), train_examples=_sft_examples(s), callbacks=Clock()
    )
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    rate, seconds = _rate(times, tokens)
    return {
        "tokens_per_s": rate,
        "timed_s": seconds,
        "step_s": times,
        "losses": losses,
        "precision": result.metrics["precision"],
    }


def peft_sft(work: Path, s: dict, bf16: bool = False) -> dict:
    """The anchor: peft's LoRA on transformers' model, the textbook loop; ``bf16``: under
    ``torch.autocast`` to bfloat16 (mixed precision, as ours with precision bf16)."""
    import contextlib

    import torch
    from transformers import DeepseekV3ForCausalLM

    from finetune import lora, run
    from finetune.sft import token_loss

    config = _sft_config(work, s)
    batches = _sft_batches(work, s)
    model = DeepseekV3ForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    torch.manual_seed(config.seed)
    # finetune.lora resolves the target sets to the same module names on transformers' model
    # and keeps peft's DeepSeek MoE target rewrite off, exactly as for ours.
    peft_model = lora.apply_lora(model, config.targets, config.lora_r, config.lora_alpha)
    peft_model.train()
    params = [p for p in peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=config.learning_rate, foreach=False)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: run.lr_factor(step, config.warmup_steps, config.max_steps)
    )
    times, tokens, losses = [], [], []
    for batch in batches:
        t = time.perf_counter()
        cast = torch.autocast("cpu", dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()
        with cast:
            # transformers' own packed-sequence support: position ids restarting at each
            # example, no 2-D mask, so each example attends within itself (as ours does).
            logits = peft_model(
                input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=False
            ).logits
        loss, _, count = token_loss(logits, batch["labels"])
        (loss / max(count, 1)).backward()
        run.clip_gradients(params, config.max_grad_norm)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        tokens.append(int(batch["attention_mask"].sum()))
        losses.append(loss.item() / max(count, 1))
    rate, seconds = _rate(times, tokens)
    return {
        "tokens_per_s": rate,
        "timed_s": seconds,
        "step_s": times,
        "losses": losses,
        "precision": "bf16" if bf16 else "fp32",
    }


# ---- GRPO ------------------------------------------------------------------------------------


def digit_share(text: str) -> float:
    """The bench's reward, the same on both sides: cheap, and it varies within a group."""
    return sum(c.isdigit() for c in text) / max(len(text), 1)


def _grpo_tasks(s: dict):
    from finetune.domains import SUITES

    return SUITES["finance"].generate(s["grpo_prompts"] * s["grpo_steps"], seed=2)


def ours_grpo(work: Path, s: dict) -> dict:
    from finetune.grpo import GRPOConfig, train_grpo

    records: list[tuple[float, dict]] = []

    class Clock:
        def on_metrics(self, metrics):
            records.append((time.perf_counter(), metrics))

        def on_checkpoint(self, step, state):
            pass

        def should_stop(self):
            return None

    config = GRPOConfig(
        model_path=str(work / "fp8"),
        lora_r=s["lora_r"],
        lora_alpha=s["lora_alpha"],
        learning_rate=s["learning_rate"],
        max_steps=s["grpo_steps"],
        prompts_per_step=s["grpo_prompts"],
        group_size=s["grpo_group"],
        max_prompt_len=s["grpo_prompt_len"],
        max_completion_length=s["grpo_completion"],
        loss_type="dapo",
        beta=0.0,
        precision="fp32",  # like TRL's side (bf16=False)
    )
    start = time.perf_counter()
    train_grpo(
        config,
        tasks=_grpo_tasks(s),
        reward_fn=lambda text, item: digit_share(text),
        callbacks=Clock(),
    )
    stamps = [t for t, _ in records]
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    generation = [m["generation_s"] for _, m in records]
    rate, seconds = _rate(times)
    return {
        "steps_per_s": rate,
        "timed_s": seconds,
        "step_s": times,
        "generation_s": generation,
        "generation_share": sum(generation[1:]) / seconds,
        "completion_length": [m["completion_length"] for _, m in records],
    }


def trl_grpo(work: Path, s: dict) -> dict:
    """The anchor: TRL's GRPOTrainer with the same LoRA, generating with transformers."""
    import torch
    from datasets import Dataset
    from transformers import DeepseekV3ForCausalLM, PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from finetune import lora, run
    from finetune.tokenizer import BOS, EOS, PAD

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_file=str(work / "hf" / "tokenizer.json"),
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
    )
    tokenizer.padding_side = "left"
    prompts = [
        run.chat_text(str(work / "fp8"), it.prompt, add_generation_prompt=True)
        for it in _grpo_tasks(s)
    ]
    model = DeepseekV3ForCausalLM.from_pretrained(work / "hf", dtype=torch.float32)
    torch.manual_seed(0)
    peft_model = lora.apply_lora(model, ("mla", "mlp"), s["lora_r"], s["lora_alpha"])
    n = s["grpo_prompts"] * s["grpo_group"]
    args = GRPOConfig(
        output_dir=str(work / "trl-out"),
        use_cpu=True,
        report_to="none",
        save_strategy="no",
        logging_steps=1,
        disable_tqdm=True,
        bf16=False,
        max_steps=s["grpo_steps"],
        per_device_train_batch_size=n,
        gradient_accumulation_steps=1,
        num_generations=s["grpo_group"],
        max_completion_length=s["grpo_completion"],
        temperature=1.0,
        top_p=1.0,
        learning_rate=s["learning_rate"],
        lr_scheduler_type="cosine",
        warmup_steps=0,
        max_grad_norm=1.0,
        loss_type="dapo",
        beta=0.0,
        epsilon=0.2,
        epsilon_high=0.28,
        gradient_checkpointing=False,
        dataloader_num_workers=0,
        seed=0,
    )

    def reward(prompts, completions, **kwargs):
        return [digit_share(c) for c in completions]

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    trainer = GRPOTrainer(
        model=peft_model,
        reward_funcs=[reward],
        args=args,
        train_dataset=Dataset.from_list([{"prompt": p} for p in prompts]),
        processing_class=tokenizer,
        callbacks=[Clock()],
    )
    generation: list[float] = []
    generate = trainer._generate

    def timed_generate(*a, **k):
        t = time.perf_counter()
        try:
            return generate(*a, **k)
        finally:
            generation.append(time.perf_counter() - t)

    trainer._generate = timed_generate
    start = time.perf_counter()
    trainer.train()
    times = [b - a for a, b in zip([start, *stamps[:-1]], stamps, strict=True)]
    rate, seconds = _rate(times)
    return {
        "steps_per_s": rate,
        "timed_s": seconds,
        "step_s": times,
        "generation_s": generation,
        "generation_share": sum(generation[1:]) / seconds,
    }


WORKERS = {
    "ours_sft": ours_sft,
    "peft_sft": peft_sft,
    "ours_sft_fp32": lambda work, s: ours_sft(work, s, "fp32"),
    "peft_sft_bf16": lambda work, s: peft_sft(work, s, bf16=True),
    "ours_grpo": ours_grpo,
    "trl_grpo": trl_grpo,
}


def worker(side: str, work: Path, settings: dict, threads: int | None, result: Path) -> None:
    import torch

    if threads:
        torch.set_num_threads(threads)
    out = WORKERS[side](work, settings)
    out.update(side=side, peak_rss_bytes=_peak_rss_bytes(), threads=torch.get_num_threads())
    result.write_text(json.dumps(out, indent=2))


# ---- the run ---------------------------------------------------------------------------------


def _run(cmd: list[str], what: str) -> None:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{what} failed:\n{proc.stderr[-4000:]}")


def run_side(side: str, work: Path, settings: dict, threads: int | None) -> dict:
    result = work / f"{side}.json"
    cmd = [sys.executable, __file__, "--worker", side, "--work", str(work), "--result", str(result)]
    cmd += ["--settings", json.dumps(settings)]
    if threads:
        cmd += ["--threads", str(threads)]
    _run(cmd, f"the {side} worker")
    return json.loads(result.read_text())


def bench(args: argparse.Namespace) -> dict:
    import torch

    settings = QUICK if args.quick else FULL
    config_path = REPO / "models" / "configs" / f"{args.config}.json"
    best: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-finetune-") as tmp:
        work = Path(tmp)
        cmd = [sys.executable, __file__, "--make", str(config_path), "--work", str(work)]
        cmd += ["--seed", str(args.seed)]
        if settings["layers"]:
            cmd += ["--layers", str(settings["layers"])]
        _run(cmd, "making the checkpoints")
        for round_no in range(args.rounds):
            # Alternate who goes first, so neither side always meets the same machine state.
            pairs = [
                ("ours_sft", "peft_sft_bf16"),
                ("ours_sft_fp32", "peft_sft"),
                ("ours_grpo", "trl_grpo"),
            ]
            order = [side for pair in pairs for side in (pair if round_no % 2 == 0 else pair[::-1])]
            # --jobs 2 runs sides side by side: a smoke check's wall time, not a measurement.
            with ThreadPoolExecutor(args.jobs) as pool:
                results = pool.map(lambda side: run_side(side, work, settings, args.threads), order)
                for side, r in zip(order, results, strict=True):
                    key = "tokens_per_s" if "_sft" in side else "steps_per_s"
                    if side not in best or r[key] > best[side][key]:
                        best[side] = r
    ours_sft_, peft, ours_fp32, peft_bf16, ours_grpo_, trl = (best[s] for s in SIDES)
    ratios = {
        # Like for like: ours (precision "auto": bf16 base matmuls on this CPU) against the
        # anchor under bf16 autocast; ours in fp32 against the plain fp32 anchor.
        "sft_tokens_per_s_vs_peft": ours_sft_["tokens_per_s"] / peft_bf16["tokens_per_s"],
        "sft_fp32_tokens_per_s_vs_peft_fp32": ours_fp32["tokens_per_s"] / peft["tokens_per_s"],
        "sft_tokens_per_s_vs_peft_fp32": ours_sft_["tokens_per_s"] / peft["tokens_per_s"],
        "sft_peak_rss_vs_peft": ours_sft_["peak_rss_bytes"] / peft["peak_rss_bytes"],
        "grpo_steps_per_s_vs_trl": ours_grpo_["steps_per_s"] / trl["steps_per_s"],
    }
    return {
        "config": args.config,
        "config_file": str(config_path.relative_to(REPO)),
        "quick": args.quick,
        "settings": settings,
        "rounds": args.rounds,
        "jobs": args.jobs,
        "sides": best,
        "ratios": ratios,
        "generation_share": {
            "ours": ours_grpo_["generation_share"],
            "trl": trl["generation_share"],
        },
        "first_step_sft_loss": {"ours": ours_sft_["losses"][0], "peft": peft["losses"][0]},
        "targets": {
            "sft_speedup_min": TARGET_SFT_SPEEDUP,
            "sft_met": min(
                ratios["sft_tokens_per_s_vs_peft"], ratios["sft_fp32_tokens_per_s_vs_peft_fp32"]
            )
            >= TARGET_SFT_SPEEDUP,
            "grpo_speedup_min": TARGET_GRPO_SPEEDUP,
            "grpo_met": ratios["grpo_steps_per_s_vs_trl"] >= TARGET_GRPO_SPEEDUP,
            "generation_share_max": TARGET_GENERATION_SHARE,
            "generation_share_met": ours_grpo_["generation_share"] <= TARGET_GENERATION_SHARE,
        },
        "environment": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "peft": __import__("peft").__version__,
            "trl": __import__("trl").__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": ours_sft_["threads"],
            "load_average": os.getloadavg(),
        },
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="tiny", help="a name in models/configs")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads on every side (default 1: on a CPU shared with other jobs, more "
        "threads mostly measure OpenMP stalls)",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 1 round: a smoke run")
    parser.add_argument(
        "--jobs",
        type=int,
        default=1,
        help="sides run at once (default 1; more only for a smoke run: sides that share the "
        "CPUs do not measure anything)",
    )
    parser.add_argument("--worker", choices=SIDES, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--settings", help=argparse.SUPPRESS)
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.jobs < 1 or (args.jobs > 1 and not args.quick):
        parser.error("--jobs must be 1, or more only with --quick (shared CPUs measure nothing)")
    if args.make:
        make_checkpoints(args.make, args.work, args.layers, args.seed)
        return 0
    if args.worker:
        worker(args.worker, args.work, json.loads(args.settings), args.threads, args.result)
        return 0
    if args.quick:
        args.rounds = 1
    args.out.mkdir(parents=True, exist_ok=True)
    report = bench(args)
    path = args.out / "finetune.json"
    path.write_text(json.dumps(report, indent=2) + "\n")
    r, sides, share = report["ratios"], report["sides"], report["generation_share"]
    s = report["settings"]
    print(f"== {args.config}{' (quick)' if args.quick else ''}: LoRA r={s['lora_r']} ==")
    for side in ("ours_sft", "peft_sft_bf16", "ours_sft_fp32", "peft_sft"):
        x = sides[side]
        print(
            f"  {side:13s} {x['tokens_per_s']:9.1f} tok/s"
            f"  peak RSS {x['peak_rss_bytes'] / 2**20:7.1f} MiB"
        )
    for side in ("ours_grpo", "trl_grpo"):
        x = sides[side]
        print(
            f"  {side:9s} {x['steps_per_s']:9.3f} steps/s  generating"
            f" {100 * x['generation_share']:5.1f}% of the step"
        )
    print(
        f"  SFT tokens/s vs peft + transformers, both bf16 matmuls: "
        f"{r['sft_tokens_per_s_vs_peft']:.2f}x (target >= 1.5)"
    )
    print(
        f"  SFT tokens/s vs peft + transformers, both fp32: "
        f"{r['sft_fp32_tokens_per_s_vs_peft_fp32']:.2f}x; ours bf16 vs their fp32: "
        f"{r['sft_tokens_per_s_vs_peft_fp32']:.2f}x"
    )
    print(f"  SFT peak RSS vs peft + transformers: {r['sft_peak_rss_vs_peft']:.2f}")
    print(
        f"  GRPO steps/s vs TRL GRPOTrainer:     {r['grpo_steps_per_s_vs_trl']:.2f}x (target >= 2)"
    )
    print(
        f"  generation share of the GRPO step: ours {100 * share['ours']:.1f}% (target <= 50%),"
        f" TRL {100 * share['trl']:.1f}%"
    )
    print(f"  -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
