"""``python -m federated``: run federations and member nodes from the command line.

    python -m federated simulate --config run.json [--work-dir DIR]
    python -m federated deploy   --config run.json [--work-dir DIR]   # all on 127.0.0.1
    python -m federated node --superlink HOST:PORT --root-certificates ca.crt \\
        --auth-key node.key --data train.jsonl [--val-data val.jsonl] [--name NAME]
    python -m federated certs --out DIR [--host 10.0.0.5 --host link.example.org]
    python -m federated node-key --out DIR --name hospital-a

run.json: {"federation": {FederationConfig fields}, "participants": [{ParticipantSpec
fields}, ...]}. simulate/deploy print one JSON line per round and the result at the end;
the exit status is 0 when the run completed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import sys

from federated import node, tls
from federated.config import FederationConfig, ParticipantSpec


class _PrintCallbacks:
    def on_round_end(self, round: int, metrics: dict, adapter_files: dict[str, bytes]) -> None:
        print(json.dumps({"round": round, **{k: v for k, v in metrics.items() if k != "members"}}))
        sys.stdout.flush()

    def on_round_failed(self, round: int, reason: str) -> None:
        print(json.dumps({"round": round, "failed": reason}), flush=True)

    def should_stop(self) -> bool:
        return False


def _run(args: argparse.Namespace, runtime: str) -> int:
    from federated.runtime import run_federation

    with open(args.config, encoding="utf-8") as f:
        spec = json.load(f)
    result = run_federation(
        FederationConfig.from_dict(spec["federation"]),
        participants=[ParticipantSpec(**p) for p in spec["participants"]],
        callbacks=_PrintCallbacks(),
        runtime=runtime,
        work_dir=args.work_dir,
        timeout_s=args.timeout,
    )
    print(
        json.dumps(
            {
                "status": result.status,
                "reason": result.reason,
                "rounds": len(result.rounds),
                "setup_seconds": result.setup_seconds,
                "run_seconds": result.run_seconds,
                "out_dir": result.out_dir if args.work_dir else None,
            }
        )
    )
    return 0 if result.status == "completed" else 1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m federated")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("simulate", "deploy"):
        p = sub.add_parser(name, help=f"run a federation ({name} runtime)")
        p.add_argument("--config", required=True, help="run JSON (federation, participants)")
        p.add_argument("--work-dir", help="keep the run's files here")
        p.add_argument("--timeout", type=float, default=3600.0)
    node.add_arguments(sub.add_parser("node", help="a member's SuperNode and warm trainer"))
    p = sub.add_parser("certs", help="federation CA and SuperLink TLS certificate")
    p.add_argument("--out", required=True)
    p.add_argument("--host", action="append", help="IP or DNS name members dial (repeat)")
    p = sub.add_parser("node-key", help="a member's node authentication key pair")
    p.add_argument("--out", required=True)
    p.add_argument("--name", required=True)
    args = parser.parse_args(argv)

    if args.command == "simulate":
        return _run(args, "simulation")
    if args.command == "deploy":
        return _run(args, "deployment")
    if args.command == "node":
        return node.run_node(args)
    if args.command == "certs":
        made = tls.make_server_tls(args.out, hosts=tuple(args.host or ("127.0.0.1", "localhost")))
        print(json.dumps({k: str(v) for k, v in made.__dict__.items()}))
        return 0
    made = tls.make_node_key(args.out, args.name)
    print(json.dumps({k: str(v) for k, v in made.__dict__.items()}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
