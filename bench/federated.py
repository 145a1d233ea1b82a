"""Federated LoRA against its anchors, in one run: local-only, centralised, FedAvg, FFA-LoRA.

    python bench/federated.py                 # the README table (a few minutes on 2 CPUs)
    python bench/federated.py --smoke --out DIR   # one round, tiny data, no svd arm: a check

Setup: the shipped base model models/enclave-tiny (FP8, its tokenizer; ``--model PATH`` for
another, ``--model random`` for the random 2-layer model of models/configs/tiny.json);
three hospitals, non-IID. ``--split department`` (the default): medical triage, each
hospital's referrals mostly (``--skew``) its own specialties (SPECIALTIES: cardiology and
neurology; gastroenterology and pulmonology; orthopedics, dermatology and urology), the
rest from the others'. ``--split family``: the medical suite, each hospital mostly one task
family (weight dosing, BMI, eGFR); the shipped model cannot learn the arithmetic families
(see its model card), so that split shows nothing but the base rate. Every arm is scored
on the same held-out items (every specialty or family in turn) by the suite's reward on
greedy completions, overall and per specialty or family, and by loss per assistant token
on ``--n-test`` held-out rows.

Arms, all with the same compute (``rounds * local_steps`` optimizer steps per member):
  local-only   each member trains alone on its own data
  fedavg       federated, Flower simulation runtime, FedAvg weighted by examples
  ffa          federated, FFA-LoRA (A frozen at the shared init, B averaged: exact)
  svd          federated, dW = B A averaged and re-factored to rank r by SVD (exact up to
               the rank)
  centralised  one trainer on the pooled data (what federation avoids): the same examples
               in the same number of updates (a step takes the three members' batches)
  centralised 3x steps   the pooled data in three times the updates, one batch a step

The federation decays the learning rate across rounds (``--lr-decay rounds``, members hold
each round's rate over their local steps), as the centralised runs decay it across steps.

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


# The department split: three hospitals that each mostly refer to their own specialties.
SPECIALTIES = {
    "hospital-a": ("cardiology", "neurology"),
    "hospital-b": ("gastroenterology", "pulmonology"),
    "hospital-c": ("orthopedics", "dermatology", "urology"),
}


def _triage_items(seed: int, departments, n: int, start: int = 0):
    """``n`` triage items of ``seed`` whose department is in ``departments``, in index order
    from ``start`` (an item's department is drawn from its own stream, so filter)."""
    from finetune.domains import SUITES

    suite, items, index = SUITES["medical"], [], start
    while len(items) < n:
        item = suite.item(index, seed, "triage")
        index += 1
        if item.meta["department"] in departments:
            items.append(item)
    return items


def make_data(out: Path, n_train: int, n_test: int, skew: float, seed: int, split: str) -> dict:
    """Three members' JSONL and the union test set (loss rows).

    split "department": medical triage, each member's referrals mostly (``skew``) its own
    specialties (SPECIALTIES), the rest from the others'. split "family": the medical suite,
    each member mostly one task family (weight dosing, BMI, eGFR)."""
    from finetune.domains import SUITES

    suite = SUITES["medical"]
    rng = random.Random(seed)
    members = []
    for i, name in enumerate(("hospital-a", "hospital-b", "hospital-c")):
        if split == "department":
            own = SPECIALTIES[name]
            others = [d for spec in SPECIALTIES.values() for d in spec if d not in own]
            pool_own = iter(_triage_items(seed * 10 + i, own, n_train))
            pool_other = iter(_triage_items(seed * 10 + i + 5, others, n_train))
            items = [next(pool_own if rng.random() < skew else pool_other) for _ in range(n_train)]
            label = "+".join(own)
        else:
            families = suite.families
            own_family = families[i % len(families)]
            others = [f for f in families if f != own_family]
            items = [
                suite.item(
                    seed * 10_000 + i * 1000 + j,
                    seed,
                    own_family if rng.random() < skew else rng.choice(others),
                )
                for j in range(n_train)
            ]
            label = own_family
        rows = [{"messages": it.sft_messages(), "task": it.to_dict()} for it in items]
        path = out / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        members.append({"name": name, "data": str(path), "family": label})
    if split == "department":
        test_items = _triage_items(seed + 999, [d for s in SPECIALTIES.values() for d in s], n_test)
    else:
        test_items = suite.generate(n_test, seed=seed + 999)
    test = [{"messages": it.sft_messages(), "task": it.to_dict()} for it in test_items]
    test_path = out / "test.jsonl"
    test_path.write_text("".join(json.dumps(r) + "\n" for r in test))
    return {"members": members, "test": str(test_path)}


def score_items(engine, items, adapter_dir, max_tokens: int, key) -> dict:
    """Greedy completions of ``items`` scored by the suite's reward: accuracy overall and per
    ``key(item)`` (the department, or the task family)."""
    from finetune.domains import score
    from inference.engine import Request
    from inference.sampling import SamplingParams

    requests = [
        Request(
            messages=[dict(m) for m in item.messages],
            sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens),
            adapter=str(adapter_dir) if adapter_dir is not None else None,
        )
        for item in items
    ]
    groups: dict[str, list[int]] = {}
    for item, done in zip(items, engine.generate(requests), strict=True):
        groups.setdefault(key(item), []).append(int(score(done.text, item).correct))
    hits = sum(sum(g) for g in groups.values())
    return {
        "accuracy": round(hits / len(items), 4),
        "scored": len(items),
        "per_group": {k: round(sum(g) / len(g), 4) for k, g in sorted(groups.items())},
    }


def group_of(split: str):
    """What an item's accuracy is broken down by: its specialty, or its task family."""
    if split == "department":
        return lambda item: item.meta["department"]
    return lambda item: item.family


def eval_items(split: str, n: int) -> list:
    """The held-out items every arm is scored on (finetune.evaluate's seed, in turns)."""
    from finetune.evaluate import EVAL_SEED, suite_items

    if split == "family":
        return suite_items("medical", n, EVAL_SEED)
    departments = [d for spec in SPECIALTIES.values() for d in spec]
    per = -(-n // len(departments))
    by_dept = {d: _triage_items(EVAL_SEED, [d], per) for d in departments}
    return [by_dept[d][i] for i in range(per) for d in departments][:n]


def evaluate(model_path: str, adapter_files: dict, test_path: str, args, engine, name) -> dict:
    """Union-test-set metrics of an adapter: loss by the ClientApp's own evaluation code,
    accuracy on the held-out items every arm is scored on (``eval_items``, ``score_items``)."""
    from federated.client_app import NodeTrainer
    from finetune import lora

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
    scored = score_items(engine, args.items, adapter_dir, args.max_new_tokens, group_of(args.split))
    return {"test_loss": m["val_loss"], **scored}


def train_local(model_path: str, rows: list[dict], steps: int, args, initial=None, batch_size=None):
    from finetune.sft import SFTConfig, train_sft

    config = SFTConfig(
        model_path=model_path,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        learning_rate=args.lr,
        max_steps=steps,
        batch_size=batch_size or args.batch_size,
        max_seq_len=args.max_seq_len,
        seed=args.seed,
    )
    clean = [{k: v for k, v in r.items() if k != "task"} for r in rows]
    start = time.perf_counter()
    result = train_sft(config, train_examples=clean, initial_adapter=initial)
    return result, time.perf_counter() - start


def federate(model_path, data, aggregation, runtime, args, rounds: int | None = None) -> dict:
    from federated import FederationConfig, ParticipantSpec, run_federation

    config = FederationConfig(
        model_path=model_path,
        num_rounds=rounds or args.rounds,
        aggregation=aggregation,
        min_available=3,
        min_train=3,
        lora_r=args.lora_r,
        lora_alpha=2 * args.lora_r,
        learning_rate=args.lr,
        lr_decay=args.lr_decay,
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
    parser.add_argument(
        "--split",
        choices=("department", "family"),
        default="department",
        help="non-IID by triage specialty (default) or by medical task family",
    )
    parser.add_argument("--rounds", type=int, default=48)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument(
        "--deployment-rounds",
        type=int,
        default=4,
        help="rounds of the deployment run (it measures overhead only)",
    )
    parser.add_argument("--n-train", type=int, default=128)
    parser.add_argument("--n-test", type=int, default=24)
    parser.add_argument("--skew", type=float, default=0.8)
    parser.add_argument("--n-eval", type=int, default=280, help="suite items scored per arm")
    parser.add_argument("--max-new-tokens", type=int, default=160)
    parser.add_argument("--lora-r", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument(
        "--lr-decay",
        choices=("rounds", "local"),
        default="rounds",
        help="the federation's learning-rate decay (FederationConfig.lr_decay)",
    )
    parser.add_argument("--batch-size", type=int, default=8)
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
        data = make_data(work, args.n_train, args.n_test, args.skew, args.seed, args.split)
        args.items = eval_items(args.split, args.n_eval)
        steps = args.rounds * args.local_steps
        rows = {m["name"]: [json.loads(x) for x in open(m["data"])] for m in data["members"]}
        report: dict = {
            "setup": {
                k: getattr(args, k)
                for k in (
                    "smoke",
                    "split",
                    "rounds",
                    "local_steps",
                    "n_train",
                    "n_test",
                    "skew",
                    "lora_r",
                    "lr",
                    "lr_decay",
                    "batch_size",
                )
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
        report["base_model"] = score_items(
            engine, args.items, None, args.max_new_tokens, group_of(args.split)
        )
        # Local-only and pure local training time (the overhead anchor).
        local_times = []
        for name, member_rows in rows.items():
            result, seconds = train_local(model_path, member_rows, steps, args)
            local_times.append(seconds / args.rounds)
            arm = f"local-only {name}"
            acc[arm] = evaluate(model_path, result.adapter_files, data["test"], args, engine, arm)
        pooled = [r for member_rows in rows.values() for r in member_rows]
        # The same examples as the federation, in the same number of sequential updates
        # (a step sees the three members' batches at once) ...
        result, _ = train_local(model_path, pooled, steps, args, batch_size=3 * args.batch_size)
        acc["centralised"] = evaluate(
            model_path, result.adapter_files, data["test"], args, engine, "centralised"
        )
        # ... and in three times the updates (one member's batch a step).
        result, _ = train_local(model_path, pooled, 3 * steps, args)
        acc["centralised 3x steps"] = evaluate(
            model_path, result.adapter_files, data["test"], args, engine, "centralised 3x steps"
        )
        runs = {}
        # The smoke runs two: each simulated federation pays ~18 s of process and Ray start.
        for aggregation in ("fedavg", "ffa") if args.smoke else ("fedavg", "ffa", "svd"):
            runs[aggregation] = federate(model_path, data, aggregation, "simulation", args)
            arm = f"federated {aggregation}"
            acc[arm] = evaluate(
                model_path, runs[aggregation]["adapter_files"], data["test"], args, engine, arm
            )
        if not args.no_deployment:
            runs["deployment"] = federate(
                model_path, data, "fedavg", "deployment", args, args.deployment_rounds
            )

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
