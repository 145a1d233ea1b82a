"""Prefill throughput and memory: our engine against transformers, same weights, same run.

    python bench/forward.py                  # models/configs/tiny.json and small.json
    python bench/forward.py --config small   # one config
    python bench/forward.py --smoke --out DIR  # tiny, few tokens: a quick end-to-end check

For each config: transformers builds a random ``DeepseekV3ForCausalLM`` and saves it with
``save_pretrained``; then three fresh subprocesses load that same checkpoint (so each one's
peak RSS is its own): transformers fp32, ours fp32, ours FP8 (converted on load). Each runs
a batch-1 prompt of ``--tokens`` tokens ``--repeats`` times after a warm-up (the warm-up also
lets the FP8 dispatch measure its kernels) and keeps the best time, as the machine may be
shared. Sides run in turn ``--rounds`` times; the best round counts. Our fp32 logits are
checked against transformers'. transformers has no CPU FP8 path, so FP8 is compared with
both fp32 sides.

Our side runs with the malloc setting ``load_model`` applies on the CPU
(``inference.host_memory``: freed memory is kept for reuse, not faulted in afresh on every
forward). ``--anchor-same-malloc`` adds a fourth subprocess, transformers with that same
setting, and reports the fp32 ratio against it as well: the share of the ratio that is the
setting and the share that is the model code.

Writes ``<out>/forward-<config>.json`` and prints the ratios. Targets on CPU: fp32 prefill
>= 1.25x transformers; FP8 resident weights <= 30% of fp32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a script, not a package: find `inference` from the checkout

SIDES = ("hf_fp32", "ours_fp32", "ours_fp8")
# transformers again, with the malloc setting load_model applies to our side
# (inference.host_memory): how much of the fp32 ratio that setting is. --anchor-same-malloc.
SAME_MALLOC_SIDE = "hf_fp32_retained"
TARGET_FP32_SPEEDUP = 1.25
TARGET_FP8_MEMORY = 0.30


def make_checkpoint(config_path: Path, out: Path, layers: int | None, seed: int) -> None:
    """Random transformers model from our config.json, saved with save_pretrained."""
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    d = json.loads(config_path.read_text())
    if layers is not None:
        d["num_hidden_layers"] = layers
    torch.manual_seed(seed)
    model = DeepseekV3ForCausalLM(DeepseekV3Config.from_dict(d)).eval()
    model.save_pretrained(out)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """VmHWM: this process's own peak. (ru_maxrss would include the parent's RSS at fork:
    Linux carries the pre-exec high-water mark into the child.)"""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def worker(
    side: str, ckpt: Path, tokens: int, repeats: int, threads: int | None, result: Path
) -> None:
    """Load one side, time prefill, write a JSON result and the last-position logits."""
    import torch

    if threads:
        torch.set_num_threads(threads)

    if side == SAME_MALLOC_SIDE:
        from inference.host_memory import retain_freed_memory

        if not retain_freed_memory():
            raise RuntimeError("this C library refused the malloc setting")
    rss_before = _rss_bytes()
    t0 = time.perf_counter()
    if side.startswith("hf_fp32"):
        from transformers import DeepseekV3ForCausalLM

        model = DeepseekV3ForCausalLM.from_pretrained(ckpt, dtype=torch.float32).eval()

        def run(ids):
            return model(ids).logits
    else:
        from inference import load_model

        model = load_model(ckpt, fp8=side == "ours_fp8")

        def run(ids):
            return model(ids)

    load_s = time.perf_counter() - t0
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    vocab = model.config.vocab_size
    ids = torch.randint(0, vocab, (1, tokens), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        logits = run(ids)  # warm-up (and FP8 kernel measurement)
        times = []
        for _ in range(repeats):
            t = time.perf_counter()
            run(ids)
            times.append(time.perf_counter() - t)
    torch.save(logits[0, -8:].float().clone(), result.with_suffix(".pt"))
    out = {
        "side": side,
        "load_s": load_s,
        "prefill_s": min(times),
        "prefill_s_all": times,
        "tokens_per_s": tokens / min(times),
        "weight_bytes": weight_bytes,
        "rss_after_load_bytes": None,
        "rss_load_delta_bytes": None,
        "peak_rss_bytes": _peak_rss_bytes(),  # this process's peak, imports included
        "threads": torch.get_num_threads(),
        "retains_freed_memory": "inference.host_memory" in sys.modules
        and sys.modules["inference.host_memory"].is_retaining(),
    }
    out["rss_after_load_bytes"] = _rss_bytes()
    out["rss_load_delta_bytes"] = out["rss_after_load_bytes"] - rss_before
    if side == "ours_fp8":
        from inference import FP8Linear

        kernels = next(m.kernels for m in model.modules() if isinstance(m, FP8Linear))
        chosen: dict[str, int] = {}
        for name in kernels.choice.values():
            chosen[name] = chosen.get(name, 0) + 1
        out["fp8_kernel_choices"] = chosen
    result.write_text(json.dumps(out, indent=2))


def run_side(side: str, ckpt: Path, args: argparse.Namespace, workdir: Path) -> dict:
    result = workdir / f"{side}.json"
    cmd = [sys.executable, __file__, "--worker", side, "--ckpt", str(ckpt)]
    cmd += ["--tokens", str(args.tokens), "--repeats", str(args.repeats), "--result", str(result)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{side} worker failed:\n{proc.stderr[-4000:]}")
    return json.loads(result.read_text())


def _sides(args: argparse.Namespace) -> tuple[str, ...]:
    return SIDES + ((SAME_MALLOC_SIDE,) if args.anchor_same_malloc else ())


def bench_config(name: str, args: argparse.Namespace) -> dict:
    import torch

    config_path = REPO / "models" / "configs" / f"{name}.json"
    with tempfile.TemporaryDirectory(prefix=f"bench-{name}-") as tmp:
        tmp = Path(tmp)
        ckpt = tmp / "ckpt"
        t0 = time.perf_counter()
        # In a subprocess too, so this parent stays small while the sides run.
        cmd = [sys.executable, __file__, "--make", str(config_path), "--ckpt", str(ckpt)]
        cmd += ["--seed", str(args.seed)] + (["--layers", str(args.layers)] if args.layers else [])
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"making the checkpoint failed:\n{proc.stderr[-4000:]}")
        make_s = time.perf_counter() - t0
        best: dict[str, dict] = {}
        for _ in range(args.rounds):
            for side in _sides(args):
                r = run_side(side, ckpt, args, tmp)
                if side not in best or r["prefill_s"] < best[side]["prefill_s"]:
                    best[side] = r
        ref = torch.load(tmp / "hf_fp32.pt")
        ours = torch.load(tmp / "ours_fp32.pt")
        fp8 = torch.load(tmp / "ours_fp8.pt")
    hf, o32, o8 = best["hf_fp32"], best["ours_fp32"], best["ours_fp8"]
    ratios = {
        "fp32_prefill_speedup_vs_transformers": hf["prefill_s"] / o32["prefill_s"],
        "fp8_prefill_speedup_vs_transformers": hf["prefill_s"] / o8["prefill_s"],
        "fp8_prefill_speed_vs_ours_fp32": o32["prefill_s"] / o8["prefill_s"],
        "fp8_weight_bytes_vs_fp32": o8["weight_bytes"] / o32["weight_bytes"],
        "fp32_peak_rss_vs_transformers": o32["peak_rss_bytes"] / hf["peak_rss_bytes"],
        "fp8_peak_rss_vs_ours_fp32": o8["peak_rss_bytes"] / o32["peak_rss_bytes"],
    }
    if SAME_MALLOC_SIDE in best:
        ratios["fp32_prefill_speedup_vs_transformers_same_malloc"] = (
            best[SAME_MALLOC_SIDE]["prefill_s"] / o32["prefill_s"]
        )
    return {
        "config": name,
        "config_file": str(config_path.relative_to(REPO)),
        "layers": args.layers,
        "prompt_tokens": args.tokens,
        "batch": 1,
        "repeats": args.repeats,
        "rounds": args.rounds,
        "smoke": args.smoke,
        "make_checkpoint_s": make_s,
        "sides": best,
        "ratios": ratios,
        "accuracy": {
            "fp32_max_rel_err_vs_transformers": ((ours - ref).abs().max() / ref.abs().max()).item(),
            "fp8_rel_err_vs_transformers": ((fp8 - ref).norm() / ref.norm()).item(),
        },
        "targets": {
            "fp32_prefill_speedup_min": TARGET_FP32_SPEEDUP,
            "fp32_prefill_met": ratios["fp32_prefill_speedup_vs_transformers"]
            >= TARGET_FP32_SPEEDUP,
            "fp8_weight_memory_max": TARGET_FP8_MEMORY,
            "fp8_weight_memory_met": ratios["fp8_weight_bytes_vs_fp32"] <= TARGET_FP8_MEMORY,
        },
        "environment": {
            "torch": torch.__version__,
            "transformers": __import__("transformers").__version__,
            "python": platform.python_version(),
            "cpu": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(),
            "threads": hf["threads"],
            "load_average": os.getloadavg(),
        },
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", action="append", help="tiny, small (default: both)")
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads on every side (default: torch's). On a CPU shared with other jobs, "
        "1 avoids OpenMP stalls that swamp the comparison",
    )
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument(
        "--smoke", action="store_true", help="tiny config, 32 tokens, 1 repeat, 1 round"
    )
    parser.add_argument(
        "--anchor-same-malloc",
        action="store_true",
        help="also run transformers with the malloc setting our side gets "
        "(inference.host_memory), and report that ratio too",
    )
    parser.add_argument("--worker", choices=SIDES + (SAME_MALLOC_SIDE,), help=argparse.SUPPRESS)
    parser.add_argument("--ckpt", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--make", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.make:
        make_checkpoint(args.make, args.ckpt, args.layers, args.seed)
        return 0
    if args.worker:
        worker(args.worker, args.ckpt, args.tokens, args.repeats, args.threads, args.result)
        return 0
    if args.smoke:
        args.config, args.tokens, args.repeats, args.rounds = ["tiny"], 32, 1, 1
    args.out.mkdir(parents=True, exist_ok=True)
    for name in args.config or ["tiny", "small"]:
        report = bench_config(name, args)
        path = args.out / f"forward-{name}.json"
        path.write_text(json.dumps(report, indent=2) + "\n")
        r, a = report["ratios"], report["accuracy"]
        sides = report["sides"]
        print(f"== {name}: {args.tokens}-token prefill, batch 1 ==")
        for side in _sides(args):
            s = sides[side]
            print(
                f"  {side:16s} {s['tokens_per_s']:9.1f} tok/s  weights {s['weight_bytes'] / 2**20:8.1f} MiB"
                f"  peak RSS {s['peak_rss_bytes'] / 2**20:8.1f} MiB"
            )
        print(
            f"  fp32 prefill vs transformers: {r['fp32_prefill_speedup_vs_transformers']:.2f}x (target >= 1.25)"
        )
        if SAME_MALLOC_SIDE in sides:
            print(
                "  fp32 prefill vs transformers with the same malloc setting: "
                f"{r['fp32_prefill_speedup_vs_transformers_same_malloc']:.2f}x"
            )
        print(f"  FP8 prefill vs transformers:  {r['fp8_prefill_speedup_vs_transformers']:.2f}x")
        print(f"  FP8 prefill vs our fp32:      {r['fp8_prefill_speed_vs_ours_fp32']:.2f}x")
        print(
            f"  FP8 weights / fp32 weights:   {r['fp8_weight_bytes_vs_fp32']:.3f} (target <= 0.30)"
        )
        print(
            f"  fp32 logits max rel err vs transformers: {a['fp32_max_rel_err_vs_transformers']:.2e}"
        )
        print(f"  -> {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
