"""Federated LoRA against its anchors, in one run: local-only, centralised, FedAvg, FFA-LoRA.

    python bench/federated.py                 # the README table (a few minutes on 2 CPUs)
    python bench/federated.py --smoke --out DIR   # one round, tiny data: an end-to-end check

Setup: the shipped base model models/enclave-tiny (FP8, its tokenizer; ``--model PATH`` for
another, ``--model random`` for the random 2-layer model of models/configs/tiny.json);
three hospitals drawn from the medical suite, non-IID: each member's training set is
mostly (``--skew``) one task family. The test set is the union of all families (held out),
scored two ways: loss per assistant token (``--n-test`` rows) and accuracy of greedy
completions by the suite's reward on ``--n-eval`` held-out items (finetune.evaluate: the
serving engine, the same scoring as the model card).

Arms, all with the same compute (``rounds * local_steps`` optimizer steps per member):
  local-only   each member trains alone on its own data; evaluated on the union test set
  fedavg       federated, Flower simulation runtime, FedAvg weighted by examples
  ffa          federated, FFA-LoRA (A frozen at the shared init, B averaged: exact)
  centralised  one trainer on the pooled data (what federation avoids), 3x the steps

Overhead: seconds per round on the simulation runtime and on the deployment runtime (TLS,
node auth, warm node trainers; ``--no-deployment`` skips it) against pure local training
(the three members' ``train_sft`` for ``local_steps`` steps each, in turn, in this
process), and bytes per round against shipping the full base model both ways.

Writes ``<out>/federated.json`` (default bench/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a script, not a package: find `federated` from the checkout

os.environ.setdefault("OMP_NUM_THREADS", "1")


def make_model(out: Path, seed: int = 0) -> str:
    """FP8 model directory from models/configs/tiny.json (2 layers, vocab 512) + tokenizer."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    import inference
    from finetune.tokenizer import train_tokenizer

    d = json.loads((REPO / "models" / "configs" / "tiny.json").read_text())
    d.update(num_hidden_layers=2, vocab_size=512)
    torch.manual_seed(seed)
    hf = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(d)).eval()
    hf.save_pretrained(out / "hf")
    inference.save_checkpoint(inference.load_model(out / "hf", fp8=True), out / "fp8")
    tok = train_tokenizer(out / "tok", vocab_size=512, n_docs=300)
    for f in Path(tok).iterdir():
        shutil.copy(f, out / "fp8" / f.name)
    return str(out / "fp8")


def make_data(out: Path, n_train: int, n_test: int, skew: float, seed: int) -> dict:
    """Three members' JSONL (mostly one family each) and the union test set."""
    from finetune.domains import SUITES

    suite = SUITES["medical"]
    families = suite.families
    rng = random.Random(seed)
    members = []
    for i in range(3):
        own = families[i % len(families)]
        others = [f for f in families if f != own]
        rows = []
        for j in range(n_train):
            family = own if rng.random() < skew else rng.choice(others)
            item = suite.item(seed * 10_000 + i * 1000 + j, seed, family)
            rows.append({"messages": item.sft_messages(), "task": item.to_dict()})
        path = out / f"hospital-{'abc'[i]}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        members.append({"name": f"hospital-{'abc'[i]}", "data": str(path), "family": own})
    test = [
        {"messages": it.sft_messages(), "task": it.to_dict()}
        for it in suite.generate(n_test, seed=seed + 999)
    ]
    test_path = out / "test.jsonl"
    test_path.write_text("".join(json.dumps(r) + "\n" for r in test))
    return {"members": members, "test": str(test_path)}


def evaluate(model_path: str, adapter_files: dict, test_path: str, args, engine, name) -> dict:
    """Union-test-set metrics of an adapter: loss by the ClientApp's own evaluation code,
    accuracy by finetune.evaluate on held-out suite items (all families, in turn)."""
    from federated.client_app import NodeTrainer
    from finetune import lora
    from finetune.evaluate import evaluate_suite

    _, tensors = lora.read_adapter_files(adapter_files)
    trainer = NodeTrainer({"data": test_path, "val-data": test_path})
    config = {
        "model-path": model_path,
        "adapter-config": adapter_files["adapter_config.json"].decode(),
        "max-seq-len": args.max_seq_len,
        "eval-generations": 0,
    }
    m = trainer.evaluate(tensors, config)
    adapter_dir = Path(args.work) / "adapters" / name.replace(" ", "-")
    adapter_dir.mkdir(parents=True, exist_ok=True)
    for file_name, blob in adapter_files.items():
        (adapter_dir / file_name).write_bytes(blob)
    suite = evaluate_suite(
        model_path, "medical", n=args.n_eval, adapter=adapter_dir, engine=engine,
        max_tokens=args.max_new_tokens,
    )  # fmt: skip
    return {
        "test_loss": m["val_loss"],
        "accuracy": suite["accuracy"],
        "scored": suite["n"],
        "per_family": {f: v["accuracy"] for f, v in suite["per_family"].items()},
    }


def train_local(model_path: str, rows: list[dict], steps: int, args, initial=None):
    from finetune.sft import SFTConfig, train_sft

    config = SFTConfig(
        model_path=model_path,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        learning_rate=args.lr,
        max_steps=steps,
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        seed=args.seed,
    )
    clean = [{k: v for k, v in r.items() if k != "task"} for r in rows]
    start = time.perf_counter()
    result = train_sft(config, train_examples=clean, initial_adapter=initial)
    return result, time.perf_counter() - start


def federate(model_path, data, aggregation, runtime, args) -> dict:
    from federated import FederationConfig, ParticipantSpec, run_federation

    config = FederationConfig(
        model_path=model_path,
        num_rounds=args.rounds,
        aggregation=aggregation,
        min_available=3,
        min_train=3,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        learning_rate=args.lr,
        local_steps=args.local_steps,
        batch_size=args.batch_size,
        max_seq_len=args.max_seq_len,
        seed=args.seed,
        evaluate_every=0,  # the bench evaluates the final adapter on the union test set
        round_timeout_s=900,
    )
    participants = [
        ParticipantSpec(name=m["name"], data=m["data"], val_fraction=0.1) for m in data["members"]
    ]
    start = time.perf_counter()
    result = run_federation(config, participants=participants, runtime=runtime, timeout_s=3600)
    if result.status != "completed":
        raise RuntimeError(f"{aggregation}/{runtime}: {result.status}: {result.reason}")
    rounds = result.rounds
    return {
        "adapter_files": result.adapter_files,
        "wall_s": time.perf_counter() - start,
        "setup_s": result.setup_seconds,
        "round_s": [r["seconds"] for r in rounds],
        "member_train_s": [[m["train_seconds"] for m in r["members"].values()] for r in rounds],
        "bytes_up": [r["bytes_up"] for r in rounds],
        "bytes_down": [r["bytes_down"] for r in rounds],
        "adapter_bytes": rounds[-1]["adapter_bytes"],
        "train_loss": [r["train_loss"] for r in rounds],
        "exchange_overhead_s": [r.get("train_exchange_overhead_s") for r in rounds],
        "phases_s": [r.get("phases_s") for r in rounds],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one round, tiny data")
    parser.add_argument("--out", default=str(REPO / "bench" / "results"))
    parser.add_argument(
        "--model",
        default=str(REPO / "models" / "enclave-tiny"),
        help="base model directory (default: the shipped enclave-tiny); 'random' builds one",
    )
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--local-steps", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=32)
    parser.add_argument("--n-test", type=int, default=24)
    parser.add_argument("--skew", type=float, default=0.8)
    parser.add_argument("--n-eval", type=int, default=100, help="suite items scored per arm")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--lora-r", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=256)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-deployment", action="store_true")
    args = parser.parse_args()
    if args.smoke:
        args.rounds, args.local_steps, args.n_train, args.n_test = 1, 1, 6, 4
        args.n_eval, args.max_new_tokens, args.no_deployment = 4, 16, True

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench-federated-"))
    args.work = str(work)
    engine = None
    try:
        t0 = time.perf_counter()
        random_model = args.model == "random"
        model_path = make_model(work / "model", args.seed) if random_model else args.model
        from inference.engine import Engine

        engine = Engine(model_path, max_batch_tokens=2048)
        data = make_data(work, args.n_train, args.n_test, args.skew, args.seed)
        steps = args.rounds * args.local_steps
        rows = {m["name"]: [json.loads(x) for x in open(m["data"])] for m in data["members"]}
        report: dict = {
            "setup": {
                k: getattr(args, k)
                for k in ("smoke", "rounds", "local_steps", "n_train", "n_test", "skew", "lora_r")
            }
            | {
                "members": {m["name"]: m["family"] for m in data["members"]},
                "model": "models/configs/tiny.json, 2 layers, vocab 512, FP8, random"
                if random_model
                else args.model,
                "n_eval": args.n_eval,
                "python": platform.python_version(),
                "cpus": os.cpu_count(),
            },
            "accuracy": {},
        }
        acc = report["accuracy"]
        from finetune.evaluate import evaluate_suite

        base = evaluate_suite(
            model_path, "medical", n=args.n_eval, engine=engine, max_tokens=args.max_new_tokens
        )
        report["base_model_accuracy"] = base["accuracy"]
        # Local-only and pure local training time (the overhead anchor).
        local_times = []
        for name, member_rows in rows.items():
            result, seconds = train_local(model_path, member_rows, steps, args)
            local_times.append(seconds / args.rounds)
            arm = f"local-only {name}"
            acc[arm] = evaluate(model_path, result.adapter_files, data["test"], args, engine, arm)
        pooled = [r for member_rows in rows.values() for r in member_rows]
        result, _ = train_local(model_path, pooled, 3 * steps, args)
        acc["centralised"] = evaluate(
            model_path, result.adapter_files, data["test"], args, engine, "centralised"
        )
        runs = {}
        for aggregation in ("fedavg", "ffa"):
            runs[aggregation] = federate(model_path, data, aggregation, "simulation", args)
            arm = f"federated {aggregation}"
            acc[arm] = evaluate(
                model_path, runs[aggregation]["adapter_files"], data["test"], args, engine, arm
            )
        if not args.no_deployment:
            runs["deployment"] = federate(model_path, data, "fedavg", "deployment", args)

        # The anchor: the same training with no framework, every member in turn (the
        # simulation runs one Ray actor; deployment nodes share this machine's CPUs).
        pure = sum(local_times)
        overhead = {
            "pure_local_train_s_per_round": pure,
            "pure_local_train_s_per_member_round": local_times,
        }
        for key, run in (("simulation", runs["fedavg"]), ("deployment", runs.get("deployment"))):
            if run is None:
                continue
            # The first round pays process start and model loading; later rounds are warm.
            warm = run["round_s"][1:] or run["round_s"]
            overhead[key] = {
                "setup_s": run["setup_s"],
                "round_s": run["round_s"],
                "warm_round_s": sum(warm) / len(warm),
                "member_train_s": run["member_train_s"],
                "overhead_vs_pure_local_s": sum(warm) / len(warm) - pure,
                # Per round: the train exchange minus the slowest member's training.
                "exchange_overhead_s": run["exchange_overhead_s"],
                "phases_s": run["phases_s"],
            }
        report["overhead"] = overhead
        model_bytes = sum(f.stat().st_size for f in Path(model_path).glob("*.safetensors"))
        fed = runs["fedavg"]
        report["bytes_per_round"] = {
            "up": fed["bytes_up"][-1],
            "down": fed["bytes_down"][-1],
            "ffa_up": runs["ffa"]["bytes_up"][-1],
            "adapter_bytes": fed["adapter_bytes"],
            "full_model_both_ways": 2 * 3 * model_bytes,
            "ratio_vs_full_model": (fed["bytes_up"][-1] + fed["bytes_down"][-1])
            / (2 * 3 * model_bytes),
        }
        report["train_loss_per_round"] = {k: v["train_loss"] for k, v in runs.items()}
        report["total_s"] = time.perf_counter() - t0
        (out / "federated.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report["accuracy"], indent=1))
        print(json.dumps(report["overhead"], indent=1))
        print(json.dumps(report["bytes_per_round"], indent=1))
        return 0
    finally:
        if engine is not None:
            engine.close()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
