"""bench/secagg.py runs both protocols on the same update and checks each one's sum."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_secagg_bench_compares_ours_with_flowers_secaggplus_on_the_same_round(tmp_path):
    out = subprocess.run(
        [sys.executable, str(REPO / "bench" / "secagg.py"), "--members", "3", "4",
         "--vector-len", "3000", "--dropouts", "1", "--repeats", "1", "--out", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "ratio" in out.stdout
    report = json.loads((tmp_path / "secagg.json").read_text())
    assert [r["members"] for r in report["rows"]] == [3, 4]
    for row in report["rows"]:
        assert row["vector_len"] == 3000 and row["dropouts"] == 1
        # SecAgg+'s reconstruction (a dropped member's masks rebuilt) matched the plain mean.
        assert row["flower_secaggplus"]["max_abs_error"] < 1e-4
        for side in ("ours", "flower_secaggplus"):
            assert row[side]["client_s"] > 0 and row[side]["server_s"] > 0
        assert row["client_ratio"] == row["ours"]["client_s"] / row["flower_secaggplus"]["client_s"]
