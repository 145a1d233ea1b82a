"""Federated LoRA fine-tuning on Flower 1.42 (Message API): apps, strategies, runtimes.

Public API (federated.runtime, federated.config):

    run_federation(config: FederationConfig, *, participants: list[ParticipantSpec],
                   callbacks: FederationCallbacks | None = None,
                   runtime: "simulation" | "deployment" = "simulation",
                   work_dir=None, timeout_s=3600, sim_cpus=1, max_restarts=2,
                   deployment: DeploymentOptions | None = None)
        -> FederationResult(status, rounds, failures, adapter_files, reason, out_dir,
                            setup_seconds, run_seconds, restarts)
    FederationCallbacks: on_round_end(round, metrics, adapter_files),
                         on_round_failed(round, reason), should_stop() -> bool
    FederationConfig, ParticipantSpec, DPConfig (federated.privacy)

How it works:
    server_app   ServerApp (``@app.main()`` over the Grid): its own round loop around a
                 flwr.serverapp.strategy (FedAvg, FedProx, FedAdam, or our LoRA-exact and
                 robust rules from federated.aggregation via federated.strategy); timeouts,
                 partial rounds, retries, secure aggregation as four query messages
                 (federated.secagg), the DP budget gate (federated.privacy); events.jsonl
                 and one PEFT adapter per round; resumes after a SuperLink restart.
    client_app   ClientApp (``@app.train``, ``@app.evaluate``, ``@app.query("secagg_*")``):
                 finetune.sft on the member's own data (JSONL or a data provider), loss and
                 suite-reward evaluation, DP clip+noise, masking.
    runtime      flower-superlink (--simulation, or TLS + SuperNode auth), ``flwr run``,
                 callbacks from the event stream.
    node         what a member runs: a warm trainer process + flower-supernode.
    tls          CA, server certificate, node keys (cryptography).

Which tests prove it: tests/federated/test_apps.py (round loop in one process: partial
rounds, retries, secagg = plain mean, secagg with a dropout, DP budget, FFA/SVD, data
providers, reward evaluation), test_simulation.py (Flower simulation runtime, SuperLink
killed and resumed), test_deployment.py (real SuperLink + 3 SuperNodes, TLS, node auth,
a killed member), test_simulation_bench.py (bench/federated.py --smoke).

CLI: python -m federated simulate|deploy|node|certs|node-key (see federated.__main__).
Never imports Django or the control plane.
"""

from federated.config import DPConfig, FederationConfig, ParticipantSpec
from federated.runtime import (
    DeploymentOptions,
    FederationCallbacks,
    FederationError,
    FederationResult,
    NullCallbacks,
    run_federation,
)

__all__ = [
    "DPConfig",
    "DeploymentOptions",
    "FederationCallbacks",
    "FederationConfig",
    "FederationError",
    "FederationResult",
    "NullCallbacks",
    "ParticipantSpec",
    "run_federation",
]
