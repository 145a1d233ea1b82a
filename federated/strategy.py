"""Flower strategies for LoRA adapters, chosen by ``FederationConfig.aggregation``.

    fedavg   flwr.serverapp.strategy.FedAvg (weighted by num-examples)
    fedprox  flwr.serverapp.strategy.FedProx (sends proximal-mu to members)
    fedadam  flwr.serverapp.strategy.FedAdam (server Adam on the averaged adapter)
    ffa      FedAvg over the B matrices only: members keep A at the shared init (FFA-LoRA),
             so the average of the B's times A is the average of the members' products
    svd      LoraExact: average the products B_i @ A_i and re-factorise (federated.aggregation)

``robust`` (trimmed_mean, krum) and ``norm_bound`` replace the weighted mean with
``federated.aggregation``'s robust rules on the members' updates. We use Flower's own
strategies where they exist (sampling, message construction, metric averaging) and
override only ``aggregate_train`` where the rule is ours.
"""

from __future__ import annotations

from collections.abc import Iterable

from flwr.app import ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, Strategy

from federated.config import FederationConfig


class OwnAggregation(FedAvg):
    """FedAvg's sampling and metrics; the adapter aggregation is ``federated.aggregation``'s.

    ``current`` must be set (to the global adapter's tensors) before ``aggregate_train``;
    the server does that each round. Raises ImportError when federated.aggregation is
    missing and ValueError when a rule does not fit the replies.
    """

    def __init__(self, config: FederationConfig, **kwargs):
        super().__init__(**kwargs)
        self.config = config
        self.current: dict | None = None
        self.last_report: dict = {}

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid, _ = self._check_and_log_replies(list(replies), is_train=True)
        if not valid:
            return None, None
        from federated import aggregation
        from federated.client_app import content_arrays, to_torch

        updates = [to_torch(content_arrays(m.content)) for m in valid]
        weights = [float(m.content.metric_records["metrics"]["num-examples"]) for m in valid]
        tensors, report = aggregation.aggregate_lora(
            updates,
            weights,
            current=self.current,
            method=self.config.aggregation,
            robust=self.config.robust,
            norm_bound=self.config.norm_bound,
            trim_fraction=self.config.trim_fraction,
            lora_alpha=self.config.lora_alpha,
            lora_r=self.config.lora_r,
        )
        self.last_report = dict(report or {})
        metrics = self.train_metrics_aggr_fn([m.content for m in valid], self.weighted_by_key)
        return ArrayRecord(tensors), metrics


def build_strategy(config: FederationConfig) -> Strategy:
    """The strategy for ``config``. Sampling asks for every connected member (fraction 1)
    and at least ``min_train``; the server checks the replies against ``min_train``."""
    common = dict(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=config.min_train,
        min_evaluate_nodes=config.min_train,
        min_available_nodes=config.min_available,
    )
    own_rule = config.aggregation == "svd" or config.robust != "none" or config.norm_bound
    if own_rule:
        return OwnAggregation(config, **common)
    if config.aggregation == "fedprox":
        return FedProx(proximal_mu=config.proximal_mu, **common)
    if config.aggregation == "fedadam":
        return FedAdam(eta=config.server_learning_rate, eta_l=config.learning_rate, **common)
    return FedAvg(**common)  # fedavg, and ffa (the replies hold only B)
