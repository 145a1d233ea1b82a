"""Start and stop the platform's processes: web (uvicorn) and Celery workers.

Used by `manage.py demo` and by the test suite, so both run exactly the commands an
operator would. Each process gets its own session (process group), so stopping it also
stops the children it forked (Celery's pool processes).
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from django.conf import settings


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def process_env(overrides: Mapping[str, str] | None = None) -> dict[str, str]:
    """The environment for a child: ours, plus platform/ on the path, plus `overrides`."""
    env = dict(os.environ)
    paths = [str(settings.REPO_DIR / "platform"), str(settings.REPO_DIR)]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    env["PYTHONUNBUFFERED"] = "1"
    env.update(overrides or {})
    return env


def worker_command(*, queues: str = "default,train", name: str = "worker") -> list[str]:
    # gossip, mingle and heartbeats are cluster chatter the job pattern does not rely on;
    # the filesystem transport cannot carry them anyway.
    return [
        sys.executable, "-m", "celery", "-A", "controlplane", "worker",
        "-Q", queues, "-n", f"{name}@%h", "--concurrency", "1", "--pool", "prefork",
        "--prefetch-multiplier", "1", "--without-gossip", "--without-mingle",
        "--without-heartbeat", "--loglevel", "INFO",
    ]  # fmt: skip


def beat_command() -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "controlplane", "beat", "--loglevel", "INFO"]


def web_command(*, port: int, host: str = "127.0.0.1") -> list[str]:
    return [
        sys.executable, "-m", "uvicorn", "controlplane.asgi:application",
        "--host", host, "--port", str(port), "--log-level", "warning",
    ]  # fmt: skip


class ManagedProcess:
    """A child process in its own process group, logging to a file."""

    def __init__(self, name: str, argv: list[str], *, log_path: Path, env: dict[str, str]):
        self.name = name
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            argv,
            cwd=settings.REPO_DIR,
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_for_log(self, needle: str, timeout: float) -> None:
        """Wait until `needle` appears in the log; RuntimeError with the log tail if not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if needle in self.log_text():
                return
            if self.proc.poll() is not None:
                break
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not log {needle!r}:\n{self.log_text()[-3000:]}")

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Send `sig` to the whole process group (the worker and its pool children)."""
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            pass

    def stop(self, timeout: float = 15.0) -> None:
        """SIGTERM the group, then SIGKILL what is left after `timeout`."""
        if self.proc.poll() is None:
            self.kill(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                pass
        # The leader may be gone while pool children linger: sweep the group either way.
        self.kill(signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(timeout=5)
        self._log.close()


def wait_until_ready(base_url: str, timeout: float, process: ManagedProcess | None = None) -> None:
    """Poll `base_url`/readyz until it answers 200; RuntimeError with the reason if not."""
    deadline = time.monotonic() + timeout
    last = "no answer"
    while time.monotonic() < deadline:
        if process is not None and process.proc.poll() is not None:
            raise RuntimeError(f"{process.name} exited:\n{process.log_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/readyz", timeout=2) as resp:
                if resp.status == 200:
                    return
        except OSError as exc:
            last = str(exc)
        time.sleep(0.2)
    raise RuntimeError(f"{base_url}/readyz not ready after {timeout:.0f}s: {last}")
