"""What a member runs on its own premises: ``python -m federated node --superlink HOST:PORT ...``.

It runs two things and keeps both alive until SIGTERM/SIGINT:

1. the warm node trainer: a ``federated.client_app.NodeTrainer`` in this process, serving
   requests over a Unix socket in ``--state-dir`` (authenticated by a random key in a 0600
   file). It reads the member's data once (a JSONL file or a data provider) and keeps
   torch, the tokenizer and the evaluation model loaded between messages;
2. ``flower-supernode`` (a child process) connected to the SuperLink with TLS
   (``--root-certificates``) and, if given, node authentication
   (``--auth-supernode-private-key``). Its node config names the trainer's socket, so the
   ClientApp process Flower starts for each message only forwards tensors to (1).

Why not Flower's own process: in 1.42 the SuperNode starts a fresh ``flwr-clientapp``
process for every message (``--isolation subprocess``), and ``--isolation process`` only
moves that launcher out of the SuperNode; warm executor pools exist for Kubernetes only.
A fresh process per message paid torch's import and the model load every time.

If the SuperNode exits (crash, kill), it is restarted; it re-registers with the same key
and resumes receiving messages. The data never leaves this machine.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
import traceback
from multiprocessing.connection import Listener
from pathlib import Path

from federated.client_app import NodeTrainer


def _node_config_arg(config: dict) -> str:
    """Flower's ``--node-config`` syntax: space-separated key=value, strings quoted."""
    parts = []
    for k, v in config.items():
        if isinstance(v, bool):
            parts.append(f"{k}={'true' if v else 'false'}")
        elif isinstance(v, (int, float)):
            parts.append(f"{k}={v}")
        else:
            text = str(v).replace("\\", "\\\\").replace('"', '\\"')
            parts.append(f'{k}="{text}"')
    return " ".join(parts)


class TrainerServer:
    """Serves one NodeTrainer on a Unix socket, one request at a time, in a thread."""

    def __init__(self, trainer: NodeTrainer, state_dir: Path):
        self.trainer = trainer
        state_dir.mkdir(parents=True, exist_ok=True)
        self.address = str(state_dir / "trainer.sock")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.address)
        self.key_file = state_dir / "trainer.key"
        fd = os.open(self.key_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_bytes(32))
        self.listener = Listener(self.address, family="AF_UNIX", authkey=self.key_file.read_bytes())
        os.chmod(self.address, 0o600)
        self.thread = threading.Thread(target=self._serve, name="node-trainer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn = self.listener.accept()
            except OSError:
                return  # closed
            with conn:
                try:
                    kind, arrays, config = conn.recv()
                    out, metrics = self.trainer.handle(kind, arrays, config)
                    conn.send(("ok", out, metrics))
                except Exception as e:  # the ClientApp turns this into an error reply
                    traceback.print_exc()
                    with contextlib.suppress(OSError):
                        conn.send(("error", f"{type(e).__name__}: {e}", {}))

    def close(self) -> None:
        self.listener.close()


def supernode_argv(args: argparse.Namespace, node_config: dict, runtime_port: int) -> list[str]:
    # Flower's flower-supernode, with its fixed 3 s idle poll shortened (federated.supernode).
    argv = [
        sys.executable, "-m", "federated.supernode",
        "--superlink", args.superlink,
        "--node-config", _node_config_arg(node_config),
        "--host", "127.0.0.1",
        "--port", str(runtime_port),
    ]  # fmt: skip
    if args.insecure:
        argv.append("--insecure")
    else:
        argv += ["--root-certificates", args.root_certificates]
    if args.auth_key:
        argv += ["--auth-supernode-private-key", args.auth_key]
    return argv


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--superlink", required=True, help="SuperLink Fleet API HOST:PORT")
    parser.add_argument("--root-certificates", help="the federation CA certificate (PEM)")
    parser.add_argument("--insecure", action="store_true", help="no TLS (tests only)")
    parser.add_argument("--auth-key", help="this member's node key (OpenSSH EC private key)")
    parser.add_argument("--name", default="member", help="this member's name in the metrics")
    parser.add_argument("--data", help="training data, JSONL (chat, alpaca or sharegpt)")
    parser.add_argument("--val-data", help="validation data, JSONL")
    parser.add_argument("--val-fraction", type=float, default=0.2)
    parser.add_argument("--data-provider", help="module:function returning examples in memory")
    parser.add_argument("--provider-option", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--model-path", help="this member's copy of the base model")
    parser.add_argument("--state-dir", default=".enclave-node", help="socket and key files")


def run_node(args: argparse.Namespace) -> int:
    """Run until SIGTERM/SIGINT. Returns the exit status."""
    if not args.insecure and not args.root_certificates:
        print("node: give --root-certificates (or --insecure for tests)", file=sys.stderr)
        return 2
    if bool(args.data) == bool(args.data_provider):
        print("node: give exactly one of --data, --data-provider", file=sys.stderr)
        return 2
    node_config: dict = {"participant": args.name, "val-fraction": args.val_fraction}
    if args.data:
        node_config["data"] = str(Path(args.data).resolve())
    if args.val_data:
        node_config["val-data"] = str(Path(args.val_data).resolve())
    if args.data_provider:
        node_config["data-provider"] = args.data_provider
        for option in args.provider_option:
            k, _, v = option.partition("=")
            node_config[f"provider.{k}"] = v
    if args.model_path:
        node_config["model-path"] = str(Path(args.model_path).resolve())

    trainer = NodeTrainer(node_config)
    trainer.data  # noqa: B018 (read the data now: a bad file fails here, not mid-round)
    import torch  # noqa: F401 (warm: the first message should not pay the import)

    import finetune.sft  # noqa: F401

    server = TrainerServer(trainer, Path(args.state_dir))
    server.start()
    flower_config = {
        "participant": args.name,
        "trainer-address": server.address,
        "trainer-key": str(server.key_file),
    }
    from federated.runtime import free_port

    stopping = threading.Event()

    def _stop(signum, frame):
        stopping.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    child: subprocess.Popen | None = None
    restarts = 0
    try:
        while not stopping.is_set():
            if child is None or child.poll() is not None:
                if child is not None:
                    restarts += 1
                    print(
                        f"node: SuperNode exited ({child.returncode}); restart {restarts}",
                        flush=True,
                    )
                    time.sleep(1.0)
                child = subprocess.Popen(supernode_argv(args, flower_config, free_port()))
            stopping.wait(0.5)
    finally:
        if child is not None and child.poll() is None:
            child.terminate()
            try:
                child.wait(10)
            except subprocess.TimeoutExpired:
                child.kill()
        server.close()
    return 0
