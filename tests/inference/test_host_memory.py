"""inference.host_memory: freed temporaries are reused, not faulted in again. Each case runs in
its own interpreter, since the malloc setting is process-wide and once set stays set."""

from __future__ import annotations

import json
import os
import subprocess
import sys

# A forward's pattern: a few MiB-sized temporaries and one large logits tensor (512 tokens of
# the small config make 62.5 MiB), allocated, written and freed; four rounds. Reports the
# minor page faults each round took.
SCRIPT = """
import json, resource, sys, torch
MIBS = (3, 4, 2, 3, 64, 4)
from inference.host_memory import retain_freed_memory
applied = retain_freed_memory() if sys.argv[1] == "call" else None
again = retain_freed_memory() if sys.argv[1] == "call" else None
faults = []
for _ in range(4):
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ts = [torch.empty(mib << 18, dtype=torch.float32).fill_(1.0) for mib in MIBS]
    del ts
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(json.dumps({"applied": applied, "again": again, "faults": faults}))
"""

PAGES = ((3 + 4 + 2 + 3 + 64 + 4) << 20) // 4096  # the pages one round writes


def _run(mode: str, **env: str) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode],
        capture_output=True,
        text=True,
        env={**os.environ, **env},
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_retained_memory_is_reused_without_page_faults_and_default_malloc_faults_every_time():
    default = _run("skip")
    # glibc maps blocks this size afresh on every allocation: their pages fault every round.
    assert default["faults"][-1] > PAGES // 2
    retained = _run("call")
    assert retained["applied"] is True and retained["again"] is True
    assert retained["faults"][0] > PAGES // 2  # the first round still meets new memory
    assert retained["faults"][-1] < PAGES // 50


def test_the_environment_switch_turns_it_off():
    off = _run("call", ENCLAVE_RETAIN_FREED_MEMORY="0")
    assert off["applied"] is False
    assert off["faults"][-1] > PAGES // 2
