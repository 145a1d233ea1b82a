"""Run a federation on Flower's simulation or deployment runtime; report through callbacks.

    result = run_federation(
        FederationConfig(model_path="models/tiny", num_rounds=3),
        participants=[ParticipantSpec("hospital-a", data="a.jsonl"), ...],
        callbacks=my_callbacks,            # FederationCallbacks
        runtime="simulation",              # or "deployment"
    )

Both runtimes run the same apps (federated.server_app:app, federated.client_app:app),
packaged as a Flower App (a generated pyproject.toml) and started with ``flwr run``
against a SuperLink this function starts on 127.0.0.1:

simulation   ``flower-superlink --simulation``; Flower's simulation runtime (Ray) runs one
             virtual SuperNode per participant. Needs ``flwr[simulation]`` (ray).
             ``init-args-num-cpus`` (``sim_cpus``) bounds the Ray actors; each actor keeps
             its trainers (data, models) warm across messages.
deployment   ``flower-superlink`` with TLS (federated.tls) and SuperNode authentication
             (``--enable-supernode-auth``; each member's public key registered with
             ``flwr supernode register``), and one ``python -m federated node`` per
             participant (a warm node trainer process plus ``flower-supernode``).
             This is the test harness and the single-machine demo; on real premises each
             member runs ``python -m federated node`` itself.

Flower never installs app dependencies here: the SuperLink gets
``--disable-runtime-dependency-installation`` and SuperNodes keep the default (off), so
the apps run in this interpreter's environment.

The ServerApp appends events to ``<work_dir>/out/events.jsonl``; this function tails them
and calls the callbacks in the caller's thread. ``should_stop()`` is polled about once a
second; True ends the run after the current round (status "stopped").
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from federated.config import FederationConfig, ParticipantSpec, write_run_file

RUNTIMES = ("simulation", "deployment")


class FederationCallbacks(Protocol):
    """What the control plane implements to record a run (all called in the caller's thread).

    on_round_end(round, metrics, adapter_files): a round completed; ``metrics`` as in
        ``FederationResult.rounds`` (train_loss, val_loss, accuracy, per-member ``members``,
        bytes_up, bytes_down, seconds, epsilon, partial, ...); ``adapter_files`` the new
        global adapter in PEFT format (adapter_config.json, adapter_model.safetensors).
    on_round_failed(round, reason): an attempt at a round failed (too few members, a
        timeout, a refused privacy budget); it may be retried (another call follows).
    should_stop(): True ends the run after the current round.
    """

    def on_round_end(self, round: int, metrics: dict, adapter_files: dict[str, bytes]) -> None: ...

    def on_round_failed(self, round: int, reason: str) -> None: ...

    def should_stop(self) -> bool: ...


class NullCallbacks:
    def on_round_end(self, round: int, metrics: dict, adapter_files: dict[str, bytes]) -> None:
        pass

    def on_round_failed(self, round: int, reason: str) -> None:
        pass

    def should_stop(self) -> bool:
        return False


@dataclass
class FederationResult:
    """How a run ended.

    status: "completed", "stopped", "failed", "budget_exhausted" (DP) or "timeout".
    rounds: the metrics of every round this call completed, in order (a resumed run
        continues after the rounds an earlier call completed in the same work_dir).
    failures: [{"round", "reason", "retry"}] for every failed attempt.
    adapter_files: the last global adapter (PEFT files); the initial one if no round ran.
    out_dir: where events.jsonl and rounds/NNNN/ are (removed with a temporary work_dir).
    """

    status: str
    rounds: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)
    adapter_files: dict[str, bytes] = field(default_factory=dict)
    reason: str | None = None
    out_dir: str = ""
    setup_seconds: float = 0.0
    run_seconds: float = 0.0
    restarts: int = 0  # times the SuperLink died and the run was resumed


@dataclass
class DeploymentOptions:
    """Where and how the deployment runtime's SuperLink runs.

    host: the interface the SuperLink binds for all its APIs (Fleet, Control, runtime);
        "127.0.0.1" for the single-machine harness, a routable address (or "0.0.0.0") when
        members connect from their premises. Every API is behind TLS; the Control API has
        no user authentication in Flower's open-source SuperLink, so firewall it to the
        platform.
    port: the SuperLink's port (default: a free one).
    tls: an existing federation CA and server certificate (federated.tls.ServerTLS);
        default: made in work_dir for ``host``, 127.0.0.1 and localhost.
    node_keys: participant name -> that member's public key file (OpenSSH), registered
        with the SuperLink; required for members that run their own nodes.
    start_nodes: True starts ``python -m federated node`` for every participant here (the
        harness); False waits for the members' own nodes (``wait_for_nodes_s``).
    """

    host: str = "127.0.0.1"
    port: int | None = None
    tls: Any = None
    node_keys: dict[str, str] | None = None
    start_nodes: bool = True


class FederationError(RuntimeError):
    """The runtime could not start (a SuperLink or SuperNode failed, flwr run refused)."""


def _bin(name: str) -> str:
    return str(Path(sys.executable).with_name(name))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(
    port: int, proc: subprocess.Popen, timeout: float, log: Path, host: str = "127.0.0.1"
) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise FederationError(f"process exited ({proc.returncode}): {_tail(log)}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), 0.5):
            return
        time.sleep(0.2)
    raise FederationError(f"nothing listens on port {port} after {timeout}s: {_tail(log)}")


def _tail(path: Path, n: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return ""


def _env(flwr_home: Path) -> dict[str, str]:
    env = dict(os.environ)
    env["FLWR_HOME"] = str(flwr_home)
    env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
    env["FLWR_TELEMETRY_ENABLED"] = "0"
    env["RAY_DISABLE_USAGE_STATS"] = "1"
    # SuperExec polls for tasks once a second by default: most of a round's latency at
    # small scale. A tenth of a second costs nothing measurable.
    env.setdefault("FLWR_SUPEREXEC_TASK_POLL_INTERVAL", "0.1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    # Several trainers share the machine; one thread each keeps them from fighting.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


class Processes:
    """Processes started for a run; each in its own session, stopped together."""

    def __init__(self, log_dir: Path, env: dict[str, str]):
        self.log_dir, self.env = log_dir, env
        self.procs: dict[str, subprocess.Popen] = {}
        self.argv: dict[str, list[str]] = {}

    def restart(self, name: str) -> subprocess.Popen:
        self.stop(name)
        return self.start(name, self.argv[name])

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        self.argv[name] = list(argv)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (kept by the child)
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
        )
        log.close()
        self.procs[name] = proc
        return proc

    def stop(self, name: str, sig: int = signal.SIGTERM, wait: float = 10.0) -> None:
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(wait)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)

    def stop_all(self) -> None:
        for name in reversed(list(self.procs)):
            self.stop(name)


def write_app(app_dir: Path, run_file: Path) -> None:
    """A Flower App whose components are our installed modules (no code in the FAB)."""
    app_dir.mkdir(parents=True, exist_ok=True)
    (app_dir / "pyproject.toml").write_text(
        f"""[build-system]
requires = ["setuptools"]
build-backend = "setuptools.build_meta"

[project]
name = "enclave-federation"
version = "1.0.0"
description = "Enclave federated LoRA"
license = "Apache-2.0"
dependencies = []

[tool.flwr.app]
publisher = "enclave"

[tool.flwr.app.components]
serverapp = "federated.server_app:app"
clientapp = "federated.client_app:app"

[tool.flwr.app.config]
run-file = {json.dumps(str(run_file))}
"""
    )


def write_flwr_config(
    flwr_home: Path,
    control_port: int,
    root_certificates: Path | None = None,
    host: str = "127.0.0.1",
) -> None:
    """FLWR_HOME/config.toml with one SuperLink connection, "enclave" (the default)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = (
        f"root-certificates = {json.dumps(str(root_certificates))}"
        if root_certificates
        else "insecure = true"
    )
    (flwr_home / "config.toml").write_text(
        f'[superlink]\ndefault = "enclave"\n\n[superlink.enclave]\n'
        f'address = "{host}:{control_port}"\n{security}\n'
    )


def _flwr(env: dict, *args: str, timeout: float = 120) -> dict:
    """Run the flwr CLI with --format json; its JSON answer, or FederationError."""
    proc = subprocess.run(
        [_bin("flwr"), *args, "--format", "json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    lines = [ln for ln in proc.stdout.splitlines() if ln.strip().startswith("{")]
    try:
        answer = json.loads("\n".join(proc.stdout[proc.stdout.index("{") :].splitlines()))
    except (ValueError, json.JSONDecodeError):
        answer = json.loads(lines[-1]) if lines else {}
    if proc.returncode != 0 or not answer.get("success", False):
        raise FederationError(f"flwr {args[0]} failed: {proc.stdout[-1500:]} {proc.stderr[-1500:]}")
    return answer


def run_federation(
    config: FederationConfig,
    *,
    participants: list[ParticipantSpec],
    callbacks: FederationCallbacks | None = None,
    runtime: str = "simulation",
    work_dir: str | Path | None = None,
    timeout_s: float = 3600.0,
    sim_cpus: int = 1,
    max_restarts: int = 2,
    deployment: DeploymentOptions | None = None,
    on_started=None,
) -> FederationResult:
    """Run ``config`` with ``participants`` to the end; see the module docstring.

    work_dir: where the run's files go (kept); default a temporary directory, removed at the
        end (the adapters are in the result and were given to the callbacks). Calling again
        with the work_dir of a stopped, failed or timed-out run resumes it after its last
        completed round (the retry path for the control plane).
    timeout_s: the whole run; past it the run is stopped (status "timeout").
    sim_cpus: CPUs Ray may use in simulation (one virtual node trains per CPU at a time).
    max_restarts: if the SuperLink dies, it is restarted and the run resubmitted (resuming
        after the last completed round) at most this many times.
    deployment: DeploymentOptions for runtime="deployment" (default: everything on
        127.0.0.1, nodes started here).
    on_started: test hook, called with the Processes (and the SuperLink's port) once the
        run is started, e.g. to kill a SuperNode mid-round.

    Raises ValueError for a bad config or participant list, FederationError when the
    runtime cannot start. Failures inside the run end in the result's status, not raised.
    """
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
    config.validate()
    if not participants:
        raise ValueError("a federation needs participants")
    for p in participants:
        p.validate()
    if len({p.name for p in participants}) != len(participants):
        raise ValueError("participant names must be unique")
    callbacks = callbacks or NullCallbacks()
    with _work_dir(work_dir) as work:
        return _run(
            config, participants, callbacks, runtime, work, timeout_s, sim_cpus, max_restarts,
            deployment or DeploymentOptions(), on_started,
        )  # fmt: skip


@contextlib.contextmanager
def _work_dir(work_dir: str | Path | None) -> Iterator[Path]:
    if work_dir is not None:
        path = Path(work_dir).resolve()
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    path = Path(tempfile.mkdtemp(prefix="enclave-federation-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _run(
    config, participants, callbacks, runtime, work, timeout_s, sim_cpus, max_restarts,
    options, on_started,
):  # fmt: skip
    t0 = time.perf_counter()
    out_dir, logs, flwr_home = work / "out", work / "logs", work / "flwr-home"
    for d in (out_dir, logs):
        d.mkdir(parents=True, exist_ok=True)
    run_file = work / "run.json"
    write_run_file(run_file, config, participants, **{"out-dir": str(out_dir)})
    write_app(work / "app", run_file)
    # A work_dir that holds an unfinished run (stopped, failed, timed out) is resumed after
    # its last completed round; the generation fences off any ServerApp of the old one.
    generation_file = out_dir / "generation"
    previous = int(generation_file.read_text()) if generation_file.exists() else -1
    generation_file.write_text(str(previous + 1))
    events_path = out_dir / "events.jsonl"
    offset = events_path.stat().st_size if events_path.exists() else 0
    env = _env(flwr_home)
    procs = Processes(logs, env)
    port = (options.port if runtime == "deployment" else None) or free_port()
    try:
        if runtime == "simulation":
            write_flwr_config(flwr_home, port)
            link = procs.start(
                "superlink",
                [_bin("flower-superlink"), "--simulation", "--insecure", "--host", "127.0.0.1",
                 "--port", str(port), "--disable-runtime-dependency-installation"],
            )  # fmt: skip
            _wait_port(port, link, 60, logs / "superlink.log")
            answer = _flwr(
                env, "run", str(work / "app"), "enclave", *_sim_args(len(participants), sim_cpus)
            )
        else:
            answer = _start_deployment(participants, work, procs, env, port, options)
        if on_started is not None:
            on_started(procs, port)
        setup = time.perf_counter() - t0

        def resubmit() -> dict:
            generation = int((out_dir / "generation").read_text()) + 1
            (out_dir / "generation").write_text(str(generation))
            # The SuperLink died: start it again (deployment keeps its state in a database
            # file, so registered nodes stay registered; SuperNodes reconnect by themselves)
            # and submit the run again; the ServerApp resumes from the last saved round.
            link = procs.restart("superlink")
            wildcard = runtime == "simulation" or options.host in ("0.0.0.0", "::")
            _wait_port(
                port, link, 60, logs / "superlink.log", "127.0.0.1" if wildcard else options.host
            )
            if runtime == "simulation":
                return _flwr(
                    env,
                    "run",
                    str(work / "app"),
                    "enclave",
                    *_sim_args(len(participants), sim_cpus),
                )
            return _flwr(env, "run", str(work / "app"), "enclave")

        result = _follow(
            out_dir, callbacks, procs, env, answer.get("run-id"), timeout_s, resubmit, max_restarts,
            offset,
        )  # fmt: skip
        result.setup_seconds = setup
        result.run_seconds = time.perf_counter() - t0 - setup
        result.out_dir = str(out_dir)
        return result
    finally:
        procs.stop_all()


def _sim_args(n_nodes: int, sim_cpus: int) -> list[str]:
    return [
        "--federation-config", f"num-supernodes={n_nodes}",
        "--federation-config", f"init-args-num-cpus={sim_cpus}",
        "--federation-config", "client-resources-num-cpus=1",
    ]  # fmt: skip


def _start_deployment(participants, work, procs, env, port, options: DeploymentOptions) -> dict:
    from federated import tls

    pki = work / "pki"
    local = options.host if options.host not in ("0.0.0.0", "::") else "127.0.0.1"
    server = options.tls or tls.make_server_tls(
        pki / "server", hosts=tuple(dict.fromkeys((local, "127.0.0.1", "localhost")))
    )
    write_flwr_config(work / "flwr-home", port, root_certificates=server.ca_cert, host=local)
    link = procs.start(
        "superlink",
        [_bin("flower-superlink"), "--host", options.host, "--port", str(port),
         "--ssl-ca-certfile", str(server.ca_cert), "--ssl-certfile", str(server.server_cert),
         "--ssl-keyfile", str(server.server_key), "--enable-supernode-auth",
         "--disable-runtime-dependency-installation",
         "--database", str(work / "superlink.db")],
    )  # fmt: skip
    _wait_port(port, link, 60, work / "logs" / "superlink.log", host=local)
    for p in participants:
        key = None
        if options.node_keys and p.name in options.node_keys:
            public_key = Path(options.node_keys[p.name])
        elif options.start_nodes:
            key = tls.make_node_key(pki / "nodes", _safe(p.name))
            public_key = key.public_key
        else:
            raise ValueError(f"participant {p.name!r} runs its own node: give its public key")
        _flwr(env, "supernode", "register", str(public_key), "enclave", "--name", _safe(p.name))
        if not options.start_nodes:
            continue
        if key is None:
            raise ValueError(f"start_nodes needs the private key of {p.name!r}: omit node_keys")
        argv = [sys.executable, "-m", "federated", "node",
                "--superlink", f"{local}:{port}", "--root-certificates", str(server.ca_cert),
                "--auth-key", str(key.private_key), "--name", p.name,
                "--state-dir", str(work / "nodes" / _safe(p.name))]  # fmt: skip
        if p.data:
            argv += ["--data", str(Path(p.data).resolve())]
        if p.val_data:
            argv += ["--val-data", str(Path(p.val_data).resolve())]
        if p.data_provider:
            argv += ["--data-provider", p.data_provider]
            for k, v in p.provider_options.items():
                argv += ["--provider-option", f"{k}={v}"]
        argv += ["--val-fraction", str(p.val_fraction)]
        procs.start(f"node-{_safe(p.name)}", argv)
    return _flwr(env, "run", str(work / "app"), "enclave")


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)


def _follow(
    out_dir, callbacks, procs, env, run_id, timeout_s, resubmit, max_restarts, offset=0
) -> FederationResult:
    from federated.client_app import ADAPTER_CONFIG, ADAPTER_WEIGHTS

    events_path = out_dir / "events.jsonl"
    result = FederationResult(status="running")
    deadline = time.monotonic() + timeout_s
    last_adapter: Path | None = None
    while True:
        if events_path.exists():
            with open(events_path, encoding="utf-8") as f:
                f.seek(offset)
                chunk = f.read()
            complete = chunk[: chunk.rfind("\n") + 1]  # a line being written waits
            offset += len(complete.encode())
            for line in complete.splitlines():
                event = json.loads(line)
                kind = event["event"]
                if kind == "start":
                    last_adapter = out_dir / "rounds" / "0000"
                elif kind == "resume":
                    previous = event["round"] - 1
                    last_adapter = out_dir / "rounds" / f"{previous:04d}"
                elif kind == "round":
                    last_adapter = Path(event["adapter_dir"])
                    files = {
                        n: (last_adapter / n).read_bytes()
                        for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
                    }
                    result.rounds.append(event["metrics"])
                    callbacks.on_round_end(event["round"], event["metrics"], files)
                elif kind == "round_failed":
                    result.failures.append({k: event[k] for k in ("round", "reason", "retry")})
                    callbacks.on_round_failed(event["round"], event["reason"])
                elif kind == "end":
                    result.status, result.reason = event["status"], event.get("reason")
                    if last_adapter is not None:
                        result.adapter_files = {
                            n: (last_adapter / n).read_bytes()
                            for n in (ADAPTER_CONFIG, ADAPTER_WEIGHTS)
                        }
                    return result
        if callbacks.should_stop():
            (out_dir / "stop").touch()
        link = procs.procs.get("superlink")
        if link is not None and link.poll() is not None:
            if result.restarts < max_restarts:
                result.restarts += 1
                run_id = resubmit().get("run-id")
                continue
            result.status, result.reason = (
                "failed",
                f"SuperLink exited: {_tail(procs.log_dir / 'superlink.log')}",
            )
            return result
        if time.monotonic() > deadline:
            (out_dir / "stop").touch()
            if run_id:
                with contextlib.suppress(Exception):
                    _flwr(env, "stop", str(run_id), "enclave", timeout=30)
            result.status, result.reason = "timeout", f"run exceeded {timeout_s}s"
            return result
        time.sleep(0.5)
