"""bench/federated.py --smoke end to end, as a subprocess: it must write its JSON."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.slow
def test_federated_bench_smoke_writes_its_results(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "federated.py"), "--smoke", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "federated.json").read_text())
    arms = set(report["accuracy"])
    assert {"centralised", "federated fedavg", "federated ffa"} <= arms  # svd: full runs only
    assert sum(a.startswith("local-only") for a in arms) == 3
    for arm in report["accuracy"].values():
        assert arm["test_loss"] > 0 and 0.0 <= arm["accuracy"] <= 1.0
    sim = report["overhead"]["simulation"]
    assert sim["warm_round_s"] > 0 and report["overhead"]["pure_local_train_s_per_round"] > 0
    b = report["bytes_per_round"]
    assert 0 < b["ffa_up"] < b["up"] and b["ratio_vs_full_model"] < 1
