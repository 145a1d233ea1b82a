"""How a training loop talks to whoever runs it: metrics out, checkpoints out, stop requests in.

The SFT and GRPO loops take one object with three methods (``TrainingCallbacks``). A
Celery task implements it over the job row (metric events, encrypted checkpoint blobs, the
cancel/pause flag); a federated client over Flower; the CLI with ``JsonlMetricsLog``.
Callbacks run in the training thread, between steps; an exception raised by one stops the
run and propagates to the caller of ``train_*``.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Protocol, runtime_checkable

STOP_REQUESTS = ("cancel", "pause")


@runtime_checkable
class TrainingCallbacks(Protocol):
    def on_metrics(self, metrics: dict) -> None:
        """One JSON-safe dict per logged step (and per evaluation): see the loop's docs."""

    def on_checkpoint(self, step: int, state: bytes) -> None:
        """Opaque resumable state after ``step``; pass it back as ``resume_state``."""

    def should_stop(self) -> str | None:
        """None to go on, "cancel" or "pause"; polled between steps."""


class NullCallbacks:
    """Callbacks that record nothing and never stop."""

    def on_metrics(self, metrics: dict) -> None:
        pass

    def on_checkpoint(self, step: int, state: bytes) -> None:
        pass

    def should_stop(self) -> str | None:
        return None


class JsonlMetricsLog(NullCallbacks):
    """Appends each metrics dict as one JSON line to ``path`` (created with its parents).

    Append-only and flushed per line, so a UI can tail the file while training runs and a
    resumed run continues the same file. Non-finite floats are written as null (JSON has no
    NaN). Holds no checkpoint and never stops the run.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def on_metrics(self, metrics: dict) -> None:
        line = json.dumps(_json_safe(metrics), sort_keys=True, allow_nan=False)
        with self.path.open("a", encoding="utf-8") as f:
            f.write(line + "\n")
            f.flush()


def _json_safe(value):
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return value


def check_stop_request(request: str | None) -> str | None:
    """Validate what ``should_stop`` returned; ValueError for anything but None and
    STOP_REQUESTS (a typo must not be read as "go on")."""
    if request is not None and request not in STOP_REQUESTS:
        raise ValueError(f"should_stop returned {request!r}; expected None, 'cancel' or 'pause'")
    return request
