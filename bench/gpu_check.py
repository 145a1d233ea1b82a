"""CUDA check: our engine on the GPU against the CPU float32 reference, and FP8 GEMM
throughput against bf16. One call, a few minutes.

    python bench/gpu_check.py [--out bench/results] [--quick]

1. Correctness. A random model (models/configs/tiny.json) is saved and loaded on the CPU in
   float32 (the reference) and on CUDA in float32 (TF32 off), bfloat16 and FP8. Logits are
   compared with the reference; the FP8 model's dispatch choices are listed.
2. FP8 kernels. Every CUDA FP8 kernel is checked against the dequantise-then-matmul reference
   on DeepSeek-V3-sized shapes, and timed against a bf16 matmul of the same shape.
3. Decode. The serving engine on CUDA (float32 and FP8, models/configs/small.json at random):
   greedy tokens equal the argmax of the engine's own no-cache forward on the same device,
   the float32 engine's tokens equal the CPU float32 engine's, and decode tokens/s at batch 1
   and with 16 concurrent requests (``check_decode`` runs on any device; a CPU test uses it).

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


def check_decode(device: str, config_name: str = "small", tokens: int = 32) -> dict:
    """Engine parity and decode throughput on ``device`` (float32 and FP8)."""
    import threading

    from inference import Engine, ModelConfig, Request, SamplingParams, Transformer, save_checkpoint

    config = ModelConfig.from_json(REPO / "models" / "configs" / f"{config_name}.json")
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(3, config.vocab_size, (48,), generator=g).tolist()
    prompts = [torch.randint(3, config.vocab_size, (32,), generator=g).tolist() for _ in range(16)]
    greedy = SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True)

    def no_cache_greedy(model, ids: list[int], n: int) -> list[int]:
        out = list(ids)
        with torch.inference_mode():
            for _ in range(n):
                logits = model(torch.tensor([out], device=device))[0, -1]
                out.append(int(logits.argmax()))
        return out[len(ids) :]

    def rate(engine) -> tuple[float, float]:
        times = []
        for delta in engine.stream(Request(prompt_token_ids=prompt, sampling=greedy)):
            times += [time.perf_counter()] * len(delta.token_ids)
        single = (len(times) - 1) / (times[-1] - times[0])
        counts = []
        threads = [
            threading.Thread(
                target=lambda p=p: counts.append(
                    len(
                        engine.generate([Request(prompt_token_ids=p, sampling=greedy)])[0].token_ids
                    )
                )
            )
            for p in prompts
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        return single, sum(counts) / (time.perf_counter() - t0)

    results: dict = {"config": config_name}
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Transformer(config), tmp)
        with Engine(tmp, device="cpu", kv_cache_bytes=64 << 20) as cpu_engine:
            cpu_tokens = cpu_engine.generate([Request(prompt_token_ids=prompt, sampling=greedy)])
        cpu_tokens = cpu_tokens[0].token_ids
        for name, kwargs in (("float32", {}), ("fp8", {"fp8": True})):
            with Engine(tmp, device=device, kv_cache_bytes=256 << 20, **kwargs) as engine:
                got = engine.generate([Request(prompt_token_ids=prompt, sampling=greedy)])
                got = got[0].token_ids
                want = no_cache_greedy(engine.model, prompt, tokens)
                single, concurrent = rate(engine)
            agree = next(
                (i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), len(want)
            )
            entry = {
                "greedy_equals_no_cache_argmax": got == want,
                # FP8 kernels are chosen per batch size, so decode (1 row) and the no-cache
                # forward (48+ rows) round differently; near-ties may flip late tokens.
                "tokens_agreeing_before_divergence": agree,
                "batch1_tokens_per_s": single,
                "concurrent16_tokens_per_s": concurrent,
            }
            if name == "float32":
                entry["greedy_equals_cpu_fp32"] = got == cpu_tokens
            if name == "float32":
                entry["ok"] = (
                    entry["greedy_equals_no_cache_argmax"] and entry["greedy_equals_cpu_fp32"]
                )
            else:
                entry["ok"] = agree >= tokens // 2
            results[name] = entry
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
        "decode": check_decode(device, "tiny" if args.quick else "small"),
    }
    report["seconds"] = time.perf_counter() - t0
    ok = all(v["ok"] for v in report["model"].values())
    ok &= all(v["ok"] for k, v in report["decode"].items() if k != "config")
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
    for name, v in report["decode"].items():
        if name == "config":
            continue
        print(
            f"  decode {name:8s} batch 1 {v['batch1_tokens_per_s']:8.1f} tok/s, 16 concurrent "
            f"{v['concurrent16_tokens_per_s']:8.1f} tok/s, greedy parity {'ok' if v['ok'] else 'FAIL'}"
        )
    print(
        f"  {'all checks passed' if ok else 'SOME CHECKS FAILED'} in {report['seconds']:.0f}s -> {args.out / 'gpu-check.json'}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
