"""CUDA check: our engine on the GPU against the CPU float32 reference, and FP8 GEMM
throughput against bf16. One call, a few minutes.

    python bench/gpu_check.py [--out bench/results] [--quick]

1. Correctness. A random model (models/configs/tiny.json) is saved and loaded on the CPU in
   float32 (the reference) and on CUDA in float32 (TF32 off), bfloat16 and FP8. Logits are
   compared with the reference; the FP8 model's dispatch choices are listed.
2. FP8 kernels. Every CUDA FP8 kernel is checked against the dequantise-then-matmul reference
   on DeepSeek-V3-sized shapes, and timed against a bf16 matmul of the same shape.

Writes ``<out>/gpu-check.json``. Exit status: 0 all checks passed, 1 a check failed,
2 CUDA is absent (nothing was measured).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # a script, not a package: find `inference` from the checkout

# (M, N, K): decode and prefill rows against DeepSeek-V3 projection shapes.
GEMM_SHAPES = [
    (m, n, k)
    for m in (1, 16, 128, 1024, 4096)
    for n, k in ((7168, 2048), (2048, 7168), (24576, 1536), (7168, 16384))
]
# float32 and bfloat16 against the CPU float32 model; FP8 against the CPU FP8 model (same
# bytes; the GPU may quantise activations and round products to bf16).
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "fp8": 0.15}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float().cpu(), b.float().cpu()
    return ((a - b).norm() / b.norm()).item()


def check_model(device: str) -> dict:
    from inference import FP8Linear, ModelConfig, Transformer, load_model, save_checkpoint

    config = ModelConfig.from_json(REPO / "models" / "configs" / "tiny.json")
    torch.manual_seed(0)
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Transformer(config), tmp)
        ids = torch.randint(
            0, config.vocab_size, (2, 256), generator=torch.Generator().manual_seed(0)
        )
        with torch.inference_mode():
            ref = load_model(tmp)(ids)
            ref_fp8_cpu = load_model(tmp, fp8=True)(ids)
            for name, kwargs in (
                ("float32", {"dtype": torch.float32}),
                ("bfloat16", {"dtype": torch.bfloat16}),
                ("fp8", {"fp8": True}),
            ):
                model = load_model(tmp, device=device, **kwargs)
                out = model(ids.to(device))
                entry = {"rel_err_vs_cpu_fp32": _rel(out, ref)}
                if name == "fp8":
                    entry["rel_err_vs_cpu_fp8"] = _rel(out, ref_fp8_cpu)
                    entry["ok"] = entry["rel_err_vs_cpu_fp8"] < TOLERANCE[name]
                    kernels = next(m.kernels for m in model.modules() if isinstance(m, FP8Linear))
                    entry["kernel_choices"] = {str(k): v for k, v in kernels.choice.items()}
                else:
                    entry["ok"] = entry["rel_err_vs_cpu_fp32"] < TOLERANCE[name]
                results[name] = entry
                del model
    return results


def _time_cuda(fn, iters: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / iters


def check_gemms(device: str, shapes: list[tuple[int, int, int]], iters: int) -> list[dict]:
    from inference import fp8

    rows = []
    for m, n, k in shapes:
        g = torch.Generator(device=device).manual_seed(m + n + k)
        w = torch.randn(n, k, device=device, generator=g)
        x = torch.randn(m, k, device=device, generator=g)
        q, scale = fp8.quantize_weight(w)
        xb, wb = x.to(torch.bfloat16), w.to(torch.bfloat16)
        exact = x @ w.t()
        bf16_s = _time_cuda(lambda xb=xb, wb=wb: xb @ wb.t(), iters)
        flops = 2 * m * n * k
        row = {"m": m, "n": n, "k": k, "bf16_tflops": flops / bf16_s / 1e12, "kernels": {}}
        for name, (kernel, runs_here, _) in fp8._KERNELS.items():
            if name == "reference" or not runs_here("cuda", torch.float32, k, n):
                continue
            try:
                out = kernel(x, q, scale)
            except (RuntimeError, NotImplementedError, TypeError) as e:
                row["kernels"][name] = {"error": f"{type(e).__name__}: {e}"[:300]}
                continue
            err = _rel(out, exact)
            seconds = _time_cuda(lambda kernel=kernel, x=x, q=q, s=scale: kernel(x, q, s), iters)
            row["kernels"][name] = {
                "rel_err_vs_fp32": err,
                "ok": err < 0.06,  # e4m3 weights (and activations for scaled_mm): ~3-4%
                "tflops": flops / seconds / 1e12,
                "speed_vs_bf16": bf16_s / seconds,
            }
        chooser = fp8.FP8Kernels()
        row["dispatch_choice"] = chooser.pick(x, q, scale)
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    parser.add_argument("--quick", action="store_true", help="fewer shapes and iterations")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print(
            "gpu_check: CUDA is not available (torch.cuda.is_available() is False; "
            f"torch {torch.__version__}, CUDA build {torch.version.cuda}): nothing was measured.",
            file=sys.stderr,
        )
        return 2
    device = "cuda"
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 comparison must be real fp32
    torch.backends.cudnn.allow_tf32 = False
    t0 = time.perf_counter()
    shapes = GEMM_SHAPES[::4] if args.quick else GEMM_SHAPES
    report = {
        "device": torch.cuda.get_device_name(),
        "capability": list(torch.cuda.get_device_capability()),
        "torch": torch.__version__,
        "model": check_model(device),
        "gemm": check_gemms(device, shapes, iters=5 if args.quick else 20),
    }
    report["seconds"] = time.perf_counter() - t0
    ok = all(v["ok"] for v in report["model"].values())
    ok &= all(
        k.get("ok", False)
        for row in report["gemm"]
        for k in row["kernels"].values()
        if "error" not in k
    )
    report["ok"] = ok
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.json").write_text(json.dumps(report, indent=2) + "\n")

    print(f"== {report['device']} (sm {report['capability']}) ==")
    for name, v in report["model"].items():
        print(
            f"  model {name:9s} rel err vs CPU fp32 {v['rel_err_vs_cpu_fp32']:.2e}  {'ok' if v['ok'] else 'FAIL'}"
        )
    for row in report["gemm"]:
        parts = [f"bf16 {row['bf16_tflops']:7.1f} TF/s"]
        for name, v in row["kernels"].items():
            if "error" in v:
                parts.append(f"{name}: error")
            else:
                parts.append(
                    f"{name} {v['tflops']:7.1f} TF/s ({v['speed_vs_bf16']:.2f}x, err {v['rel_err_vs_fp32']:.3f})"
                )
        print(
            f"  M={row['m']:5d} N={row['n']:5d} K={row['k']:5d}: "
            + "  ".join(parts)
            + f"  -> {row['dispatch_choice']}"
        )
    print(
        f"  {'all checks passed' if ok else 'SOME CHECKS FAILED'} in {report['seconds']:.0f}s -> {args.out / 'gpu-check.json'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
