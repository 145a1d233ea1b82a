"""What a federation is: one ``FederationConfig`` plus one ``ParticipantSpec`` per member.

Both are plain dataclasses that round-trip through JSON (``to_dict``/``from_dict``), because
the ServerApp and the ClientApps run in other processes (Flower's SuperLink, SuperExec and
SuperNodes start them) and read the federation from a JSON file named in the run config.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from federated.privacy import DPConfig  # the one definition: clip, noise, delta, budget

AGGREGATIONS = ("fedavg", "fedprox", "fedadam", "ffa", "svd")
LR_DECAYS = ("rounds", "local")
ROBUST = ("none", "trimmed_mean", "krum")
TARGET_SETS = ("mla", "mlp", "experts", "router")


@dataclass
class FederationConfig:
    """One federated LoRA run. The control plane builds this from a federation's settings.

    Aggregation: ``fedavg`` (weighted by examples), ``fedprox`` (FedAvg plus the proximal
    term ``proximal_mu`` sent to members), ``fedadam`` (server Adam on the averaged update),
    ``ffa`` (FFA-LoRA: A frozen at its shared init, only B trained and averaged, exact) and
    ``svd`` (average the products B @ A and re-factorise by truncated SVD, exact up to rank).
    ``robust`` bounds each update's norm to ``norm_bound`` and replaces the mean with a
    trimmed mean or Krum.
    """

    model_path: str  # base model directory (config.json, safetensors, tokenizer), on every node
    num_rounds: int = 3
    aggregation: str = "fedavg"  # one of AGGREGATIONS
    robust: str = "none"  # one of ROBUST
    norm_bound: float | None = None  # clip each update to this L2 norm before aggregating
    trim_fraction: float = 0.2  # trimmed mean: share cut at each end
    proximal_mu: float = 0.0  # fedprox
    server_learning_rate: float = 0.1  # fedadam
    # Local training, per member and round (finetune.sft.SFTConfig fields)
    lora_r: int = 4
    lora_alpha: int = 8
    targets: tuple[str, ...] = ("mla", "mlp")
    learning_rate: float = 2e-3
    # "rounds": each round's local steps run at one rate, decayed by a cosine across the
    # run's rounds (as a centralised run decays it across its steps); "local": every round
    # restarts a cosine from learning_rate to 0 over its own local steps.
    lr_decay: str = "rounds"
    local_steps: int = 5
    batch_size: int = 4
    max_seq_len: int = 256
    seed: int = 0
    # Evaluation on each member's validation data
    evaluate_every: int = 1  # federated evaluation after every this many rounds; 0: never
    eval_generations: int = 4  # greedy completions scored by the suite reward (0: loss only)
    eval_max_new_tokens: int = 48
    # Membership and fault tolerance
    min_available: int = 2  # members connected before a round starts
    min_train: int = 2  # replies needed for a round to count
    round_timeout_s: float = 300.0  # a member that has not replied by then is left out
    # Once min_train members have replied to a round's training, wait at most this long for
    # the rest, and as long for the evaluation replies once those members have answered;
    # never less than the quorum itself took (None: until round_timeout_s). A dead member's site then costs a round this
    # grace, not the whole timeout: Flower marks a lost SuperNode offline only after missing
    # two 30 s heartbeats.
    straggler_timeout_s: float | None = None
    wait_for_nodes_s: float = 120.0  # how long a round waits for min_available members
    max_round_retries: int = 1  # a failed round is retried this many times, then the run fails
    # Privacy
    secure_aggregation: bool = False  # the server learns only the sum (federated.secagg)
    secagg_clip: float = 8.0  # fixed-point range of each masked coordinate (|value| <= clip)
    dp: DPConfig | None = None  # client-side clip + noise; the server refuses rounds past budget
    # Continue from an earlier global adapter (a PEFT directory) instead of a fresh one: the
    # control plane runs each scheduled round as its own run, starting from the last one.
    initial_adapter: str | None = None
    # DP rounds an earlier run of this federation already spent (its privacy is cumulative:
    # a run that continues from an earlier adapter must count them, or the budget resets).
    dp_rounds_done: int = 0

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if isinstance(self.dp, dict):
            self.dp = DPConfig(**self.dp)

    def validate(self) -> None:
        """Raise ValueError naming the first field that cannot describe a run."""
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"aggregation must be one of {AGGREGATIONS}: {self.aggregation!r}")
        if self.robust not in ROBUST:
            raise ValueError(f"robust must be one of {ROBUST}: {self.robust!r}")
        for name in ("num_rounds", "lora_r", "lora_alpha", "local_steps", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"FederationConfig.{name} must be >= 1")
        if self.lr_decay not in LR_DECAYS:
            raise ValueError(f"lr_decay must be one of {LR_DECAYS}: {self.lr_decay!r}")
        if self.min_train < 1 or self.min_available < self.min_train:
            raise ValueError("need 1 <= min_train <= min_available")
        if not set(self.targets) <= set(TARGET_SETS) or not self.targets:
            raise ValueError(f"targets must be from {TARGET_SETS}: {self.targets}")
        if not 0 <= self.trim_fraction < 0.5:
            raise ValueError("trim_fraction must be in [0, 0.5)")
        if self.round_timeout_s <= 0 or self.max_round_retries < 0:
            raise ValueError("round_timeout_s must be > 0 and max_round_retries >= 0")
        if self.straggler_timeout_s is not None and self.straggler_timeout_s < 0:
            raise ValueError(f"straggler_timeout_s must be >= 0: {self.straggler_timeout_s}")
        if self.secure_aggregation:
            # The server sees only the (weighted) sum: rules that need each member's update
            # cannot run on it.
            if self.aggregation in ("svd", "fedadam") or self.robust != "none" or self.norm_bound:
                raise ValueError(
                    "secure_aggregation supports fedavg, fedprox and ffa without robust rules"
                )
            if self.min_train < 2:
                raise ValueError("secure_aggregation needs min_train >= 2")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["targets"] = list(self.targets)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> FederationConfig:
        """Inverse of to_dict. TypeError for an unknown field."""
        return cls(**d)


@dataclass
class ParticipantSpec:
    """One member and where its data lives: only that member's own process reads it.

    data: a local JSONL file (chat, alpaca or sharegpt rows; a row may carry ``"task"``, a
        ``finetune.domains.TaskItem.to_dict()``, to be scored by the suite's reward).
    val_data: its validation JSONL; without it, ``val_fraction`` of ``data`` is held out.
    data_provider: ``"package.module:function"`` called in the member's process as
        ``function(options) -> {"train": [example, ...], "val": [example, ...]}``; the control
        plane uses it to decrypt hosted datasets in memory. ``options`` is
        ``provider_options`` (plain strings, numbers, booleans).
    """

    name: str
    data: str | None = None
    val_data: str | None = None
    val_fraction: float = 0.2
    data_provider: str | None = None
    provider_options: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if (self.data is None) == (self.data_provider is None):
            raise ValueError(f"participant {self.name!r}: give exactly one of data, data_provider")

    def node_config(self) -> dict[str, Any]:
        """The flat key/value form for a SuperNode's ``--node-config``."""
        out: dict[str, Any] = {"participant": self.name, "val-fraction": self.val_fraction}
        if self.data is not None:
            out["data"] = str(Path(self.data).resolve())
        if self.val_data is not None:
            out["val-data"] = str(Path(self.val_data).resolve())
        if self.data_provider is not None:
            out["data-provider"] = self.data_provider
            out.update({f"provider.{k}": v for k, v in self.provider_options.items()})
        return out


def write_run_file(
    path: Path, config: FederationConfig, participants: list[ParticipantSpec], **extra: Any
) -> None:
    """The JSON the ServerApp (and, in simulation, the ClientApps) read."""
    body = {
        "federation": config.to_dict(),
        "participants": [dataclasses.asdict(p) for p in participants],
        **extra,
    }
    path.write_text(json.dumps(body, indent=1))


def read_run_file(path: str | Path) -> dict[str, Any]:
    return json.loads(Path(path).read_text())
