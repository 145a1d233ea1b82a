"""bench/serving.py --smoke runs end to end and writes the JSON the README quotes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_serving_bench_smoke_writes_json(tmp_path):
    root = Path(__file__).resolve().parents[2]
    out = tmp_path / "serving.json"
    cmd = [sys.executable, "bench/serving.py", "--smoke", "--out", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(out.read_text())
    assert result["config"] == "tiny"
    for d in result["batch1_decode"].values():
        assert d["ours_tokens_per_s"] > 0 and d["transformers_tokens_per_s"] > 0
    kv = result["kv_bytes_per_token"]
    assert kv["ours"] == kv["latent_formula"] < kv["transformers"]
    cc = result["concurrent"]
    assert cc["requests"] == 4 and cc["ours"]["ttft_p50_s"] <= cc["ours"]["ttft_p99_s"]
    assert cc["max_tokens"] == [2, 4, 6, 8]  # mixed lengths: a quarter .. all of the longest
    assert 0 < result["bandwidth_bound"]["ours_fraction_of_bound"]
    ps = result["prefix_sharing"]
    # 2 requests x (48 + 16) tokens; shared, each skips its 48 cached prefix tokens.
    assert ps["distinct"]["prompt_tokens_computed"] == 2 * 64
    assert ps["shared"]["prompt_tokens_computed"] == 2 * 16
    assert ps["blocks_saved"] > 0
    f8 = result["fp8"]
    assert f8["ours_fp8_tokens_per_s"] > 0 and f8["transformers_fp32_tokens_per_s"] > 0
    assert f8["weight_bytes"] < 0.3 * f8["fp32_weight_bytes"]
    assert "ratio" in done.stdout
