"""`make demo` at this stage: runs one job end to end and leaves no process behind."""

import re
import subprocess
import sys

import psutil
import pytest

from tests.controlplane.test_foundation import REPO, _clean_env


def _processes_mentioning(marker: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if marker in " ".join(proc.info["cmdline"] or []) or any(
                marker in v for v in proc.environ().values()
            ):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


@pytest.mark.slow
def test_demo_runs_the_scenario_on_the_embedded_default_and_stops_everything(tmp_path, base_model):
    """The whole scenario at tiny sizes (--fast) on SQLite and the filesystem broker:
    a fine-tune, a streaming chat, a federated round among three hospitals."""
    from django.conf import settings

    var = tmp_path / "var"
    models = str(settings.ENCLAVE_MODELS_DIR)
    result = subprocess.run(
        [sys.executable, "manage.py", "demo", "--fast", "--model", base_model],
        cwd=REPO,
        env=_clean_env(ENCLAVE_VAR_DIR=str(var), ENCLAVE_MODELS_DIR=models),
        capture_output=True,
        text=True,
        timeout=600,
    )
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "database=sqlite3, broker=filesystem" in out
    assert re.search(r"job\s+diagnostic #\d+\s+status=succeeded", out), out
    assert "tenant       demo-bank" in out
    table = out[out.index("tenant     model") :]
    for tenant in ("demo-bank", "st-anne", "st-bart", "st-clare"):
        assert re.search(rf"{tenant}\s+(ft|fed):{base_model}:", table), table
    assert "scenario took" in out
    assert (var / "enclave.sqlite3").exists()

    pids = [int(p) for p in re.search(r"\(pid (\d+)\); worker pid (\d+)", out).groups()]
    assert not [p for p in pids if psutil.pid_exists(p)]
    assert _processes_mentioning(str(var)) == []

    # A second run reuses the database and the tenant (the smoke part only, for time).
    again = subprocess.run(
        [sys.executable, "manage.py", "demo", "--no-scenario"],
        cwd=REPO,
        env=_clean_env(ENCLAVE_VAR_DIR=str(var)),
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert again.returncode == 0, again.stdout + again.stderr
    assert "status=succeeded" in again.stdout
    assert _processes_mentioning(str(var)) == []
