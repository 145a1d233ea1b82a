"""bench/finetune.py runs end to end at tiny sizes: both SFT sides and both GRPO sides (ours
through the serving engine, TRL's GRPOTrainer) report positive figures and the ratios."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_finetune_bench_quick_writes_json(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(REPO / "bench" / "finetune.py"),
            "--quick",
            "--jobs",
            "2",
            "--out",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "SFT tokens/s vs peft + transformers" in proc.stdout
    assert "GRPO steps/s vs TRL GRPOTrainer" in proc.stdout
    report = json.loads((tmp_path / "finetune.json").read_text())
    assert report["quick"] is True and report["config"] == "tiny" and report["jobs"] == 2
    sides = report["sides"]
    sft_sides = ("ours_sft", "peft_sft", "ours_sft_fp32", "peft_sft_bf16")
    assert set(sides) == {*sft_sides, "ours_grpo", "trl_grpo"}
    assert sides["ours_sft_fp32"]["precision"] == sides["peft_sft"]["precision"] == "fp32"
    assert sides["peft_sft_bf16"]["precision"] == "bf16"
    for name in sft_sides:
        assert sides[name]["tokens_per_s"] > 0 and sides[name]["peak_rss_bytes"] > 0
        assert len(sides[name]["step_s"]) == report["settings"]["sft_steps"]
    for name in ("ours_grpo", "trl_grpo"):
        side = sides[name]
        assert side["steps_per_s"] > 0
        assert len(side["step_s"]) == report["settings"]["grpo_steps"]
        assert 0 < side["generation_share"] < 1
        assert all(g > 0 for g in side["generation_s"])
    for key in (
        "sft_tokens_per_s_vs_peft",
        "sft_fp32_tokens_per_s_vs_peft_fp32",
        "sft_peak_rss_vs_peft",
        "grpo_steps_per_s_vs_trl",
    ):
        assert report["ratios"][key] > 0
    assert report["generation_share"]["ours"] == sides["ours_grpo"]["generation_share"]
    # Same weights on both SFT sides (ours FP8-rounded): the first loss agrees closely.
    first = report["first_step_sft_loss"]
    assert abs(first["ours"] - first["peft"]) < 0.02 * first["peft"]
    assert set(report["targets"]) >= {"sft_met", "grpo_met", "generation_share_met"}
