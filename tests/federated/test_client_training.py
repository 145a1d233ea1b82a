"""What a member's training does for the aggregation rules: FFA-LoRA keeps A frozen so the
server's average is exact, FedProx's proximal term holds the update near the global
adapter, and the warm trainer loads the base model once. Real SFT on the tiny FP8 model;
the ServerApp's round loop runs over the in-process Grid of test_apps."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import inference
from federated.client_app import NodeTrainer, content_arrays
from federated.server_app import Federation, initial_adapter
from tests.federated.test_apps import _adapter, _config, _events, _grid, _task_identity

__all__ = ["_task_identity"]  # the autouse fixture, imported to be active here


def _capture_train_replies(grid) -> list:
    replies: list = []
    original = grid.send_and_receive

    def record(messages, *, timeout=None):
        out = original(messages, timeout=timeout)
        if messages and messages[0].metadata.message_type == "train":
            replies.extend(out)
        return out

    grid.send_and_receive = record
    return replies


def _members(replies, global_tensors) -> tuple[list[dict], list[float]]:
    """Each member's full adapter (FFA replies hold only B: A is the global one)."""
    updates = [
        {
            **global_tensors,
            **{k: torch.from_numpy(v.copy()) for k, v in content_arrays(m.content).items()},
        }
        for m in replies
    ]
    weights = [float(m.content.metric_records["metrics"]["num-examples"]) for m in replies]
    return updates, weights


def _rel_error_of_products(aggregate: dict, updates: list[dict], weights: list[float]) -> float:
    """||B A (aggregate) - sum_i w_i B_i A_i|| / ||sum_i w_i B_i A_i|| over all modules."""
    w = np.asarray(weights) / sum(weights)
    num = den = 0.0
    for ka in (k for k in aggregate if "lora_A" in k):
        kb = ka.replace("lora_A", "lora_B")
        exact = sum(
            wi * (u[kb].double() @ u[ka].double()) for wi, u in zip(w, updates, strict=True)
        )
        got = aggregate[kb].double() @ aggregate[ka].double()
        num += float((got - exact).pow(2).sum())
        den += float(exact.pow(2).sum())
    return (num / den) ** 0.5


@pytest.mark.parametrize("aggregation", ["ffa", "fedavg"])
def test_ffa_aggregate_is_the_exact_mean_of_the_members_products_and_naive_is_not(
    aggregation, fed_model_dir, member_files, tmp_path
):
    # Non-IID: each hospital trains on its own task family (member_files), 4 local steps.
    grid = _grid(member_files)
    replies = _capture_train_replies(grid)
    config = _config(fed_model_dir, aggregation=aggregation, local_steps=4, min_train=3)
    Federation(grid, config, tmp_path).run()
    start, end = _adapter(tmp_path, 0), _adapter(tmp_path, 1)
    updates, weights = _members(replies, start)
    assert len(updates) == 3
    error = _rel_error_of_products(end, updates, weights)
    print(f"{aggregation}: relative error of the aggregate's product {error:.3g}")
    logged = next(e for e in _events(tmp_path) if e["event"] == "round")["metrics"]
    if aggregation == "ffa":
        assert all("lora_A" not in k for m in replies for k in content_arrays(m.content))
        assert all(m["lora_A_change"] == 0.0 for m in logged["members"].values())
        assert error < 1e-6, error  # float32 precision
        assert logged["lora_aggregation_error"] < 1e-6
    else:
        # Averaging A and B separately: a clear error on non-IID members, and the log says so.
        assert error > 0.01, error
        assert logged["lora_aggregation_error"] == pytest.approx(error, rel=1e-3)
    # Either way the round moved B (the test is not passing on an untrained adapter).
    assert max(float((end[k] - start[k]).abs().max()) for k in start if "lora_B" in k) > 1e-4


def _train_config(model_dir: str, adapter_config: str, **overrides) -> dict:
    base = {
        "seed": 0,
        "server-round": 1,
        "model-path": model_dir,
        "adapter-config": adapter_config,
        "aggregation": "fedprox",
        "lora-r": 4,
        "lora-alpha": 8,
        "targets": ["mla", "mlp"],
        "learning-rate": 5e-3,
        "local-steps": 6,
        "batch-size": 4,
        "max-seq-len": 256,
    }
    return base | overrides


def _nonzero_global(model_dir: str) -> tuple[dict, str]:
    """A global adapter with B away from zero, as after a few rounds."""
    tensors, adapter_config = initial_adapter(_config(model_dir))
    g = torch.Generator().manual_seed(1)
    for k, v in tensors.items():
        if "lora_B" in k:
            tensors[k] = 0.02 * torch.randn(v.shape, generator=g)
    return tensors, adapter_config


def test_fedprox_term_pulls_the_update_toward_the_global_adapter(fed_model_dir, member_files):
    member = member_files[0]
    trainer = NodeTrainer({"participant": member["name"], "data": member["data"]})
    tensors, adapter_config = _nonzero_global(fed_model_dir)

    def train(**overrides):
        out, metrics = trainer.train(
            {k: v.clone() for k, v in tensors.items()},
            _train_config(fed_model_dir, adapter_config, **overrides),
        )
        distance = sum(float((out[k] - tensors[k]).pow(2).sum()) for k in tensors) ** 0.5
        return out, metrics, distance

    free, free_metrics, d_free = train(**{"proximal-mu": 0.0})
    held, held_metrics, d_held = train(**{"proximal-mu": 20.0})
    plain, _, _ = train(aggregation="fedavg")
    assert d_held < 0.7 * d_free, (d_held, d_free)
    assert held_metrics["proximal_term"] > 0 and "proximal_term" not in free_metrics
    for k in plain:  # mu = 0 is plain SFT, bit for bit
        assert torch.equal(plain[k], free[k]), k


def test_fedprox_mu_reaches_the_members_in_a_round(fed_model_dir, member_files, tmp_path):
    grid = _grid(member_files)
    config = _config(fed_model_dir, aggregation="fedprox", proximal_mu=5.0, local_steps=3)
    Federation(grid, config, tmp_path).run()
    rnd = next(e for e in _events(tmp_path) if e["event"] == "round")["metrics"]
    assert len(rnd["members"]) == 3
    assert all(m["proximal_term"] > 0 for m in rnd["members"].values()), rnd["members"]


def test_the_warm_trainer_loads_the_base_model_once(fed_model_dir, member_files, monkeypatch):
    tensors, adapter_config = _nonzero_global(fed_model_dir)
    loads: list[str] = []
    real_load = inference.load_model

    def counting_load(path, *args, **kwargs):
        loads.append(str(path))
        return real_load(path, *args, **kwargs)

    monkeypatch.setattr(inference, "load_model", counting_load)
    member = member_files[1]
    trainer = NodeTrainer(
        {"participant": member["name"], "data": member["data"], "val-data": member["val_data"]}
    )
    config = _train_config(fed_model_dir, adapter_config, **{"local-steps": 1})
    for rnd in (1, 2, 3):
        out, _ = trainer.train(tensors, config | {"server-round": rnd})
        trainer.evaluate(out, config | {"eval-generations": 0})
    assert loads == [fed_model_dir], loads
    assert json.dumps(sorted(trainer._bases)) == json.dumps([fed_model_dir])


def test_the_federation_decays_the_rate_across_rounds_not_within_each(fed_model_dir, member_files):
    from federated.server_app import round_learning_rate

    config = _config(fed_model_dir)
    config.num_rounds, config.learning_rate = 4, 1e-2
    rates = [round_learning_rate(config, r) for r in range(1, 5)]
    assert rates[0] == 1e-2 and all(a > b > 0 for a, b in zip(rates, rates[1:], strict=False))
    config.lr_decay = "local"  # the old way: every round restarts its own cosine
    assert [round_learning_rate(config, r) for r in (1, 4)] == [1e-2, 1e-2]
    config.lr_decay = "linear"
    with pytest.raises(ValueError, match="lr_decay must be one of"):
        config.validate()

    # A member holds the round's rate over its local steps under "constant": a larger step
    # away from the global adapter than the within-round cosine gives.
    member = member_files[0]
    trainer = NodeTrainer({"participant": member["name"], "data": member["data"]})
    tensors, adapter_config = _nonzero_global(fed_model_dir)

    def distance(schedule: str) -> float:
        out, _ = trainer.train(
            {k: v.clone() for k, v in tensors.items()},
            _train_config(fed_model_dir, adapter_config, aggregation="fedavg")
            | {"lr-schedule": schedule},
        )
        return sum(float((out[k] - tensors[k]).pow(2).sum()) for k in tensors) ** 0.5

    assert distance("constant") > 1.05 * distance("cosine")
