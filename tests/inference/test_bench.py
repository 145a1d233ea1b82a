"""The benchmark scripts run end to end: forward.py in smoke mode, gpu_check.py without CUDA
and its decode check on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_forward_bench_smoke_writes_json(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "forward.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "fp32 prefill vs transformers" in proc.stdout
    report = json.loads((tmp_path / "forward-tiny.json").read_text())
    assert report["smoke"] is True and report["prompt_tokens"] == 32 and report["batch"] == 1
    assert set(report["sides"]) == {"hf_fp32", "ours_fp32", "ours_fp8"}
    for side in report["sides"].values():
        assert side["tokens_per_s"] > 0 and side["peak_rss_bytes"] > side["weight_bytes"] > 0
    # Same weights on both sides: our fp32 logits are transformers' logits.
    assert report["accuracy"]["fp32_max_rel_err_vs_transformers"] < 1e-4
    assert report["ratios"]["fp8_weight_bytes_vs_fp32"] <= 0.30
    assert report["targets"]["fp8_weight_memory_met"] is True
    assert sum(report["sides"]["ours_fp8"]["fp8_kernel_choices"].values()) > 0


def test_gpu_check_without_cuda_exits_with_a_clear_message():
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "gpu_check.py")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "CUDA is not available" in proc.stderr
    assert "nothing was measured" in proc.stderr


def test_gpu_check_decode_runs_its_parity_and_rates_on_the_cpu():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import gpu_check
    finally:
        sys.path.remove(str(REPO / "bench"))
    report = gpu_check.check_decode("cpu", "tiny", tokens=8)
    assert report["float32"]["greedy_equals_no_cache_argmax"]
    assert report["float32"]["greedy_equals_cpu_fp32"] and report["float32"]["ok"]
    for name in ("float32", "fp8"):
        assert report[name]["batch1_tokens_per_s"] > 0
        assert report[name]["concurrent16_tokens_per_s"] > 0
    assert report["fp8"]["tokens_agreeing_before_divergence"] >= 4
