"""Federated LoRA fine-tuning on Flower (Message API): apps, strategies, runtimes.

Public API (see federated.runtime and federated.config):

    run_federation(config, *, participants, callbacks, runtime="simulation"|"deployment")
        -> FederationResult
    FederationConfig, ParticipantSpec, DPConfig, FederationCallbacks, FederationResult

Flower entry points: federated.server_app:app, federated.client_app:app.
CLI: python -m federated simulate|deploy|node|certs|node-key.
Never imports Django or the control plane.
"""

from federated.config import DPConfig, FederationConfig, ParticipantSpec
from federated.runtime import (
    FederationCallbacks,
    FederationError,
    FederationResult,
    NullCallbacks,
    run_federation,
)

__all__ = [
    "DPConfig",
    "FederationCallbacks",
    "FederationConfig",
    "FederationError",
    "FederationResult",
    "NullCallbacks",
    "ParticipantSpec",
    "run_federation",
]
