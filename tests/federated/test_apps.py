"""The ServerApp's round loop and the ClientApp, in one process: a small in-process Grid
delivers each message to the real ClientApp (real SFT on a tiny model), so fault
tolerance, secure aggregation, DP and the aggregation modes are checked without starting
Flower's runtimes (test_simulation and test_deployment do that)."""

from __future__ import annotations

import json

import pytest
import torch
from flwr.app import Context, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from federated.client_app import NodeTrainer, load_node_data
from federated.client_app import app as client_app
from federated.config import DPConfig, FederationConfig
from federated.server_app import Federation


class InProcessGrid:
    """Enough of flwr's Grid for the ServerApp: node ids, send_and_receive. A node in
    ``silent`` never answers (a killed member: the server's timeout must cover it)."""

    def __init__(self, node_configs: dict[int, dict]):
        self.contexts = {
            node: Context(
                run_id=7, node_id=node, node_config=cfg, state=RecordDict(), run_config={}
            )
            for node, cfg in node_configs.items()
        }
        self.silent: set[int] = set()
        self.sent: list[str] = []

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            self.sent.append(msg.metadata.message_type)
            node = msg.metadata.dst_node_id
            if node in self.silent:
                continue
            TaskIdentity.node_id = node
            replies.append(client_app(msg, self.contexts[node]))
        TaskIdentity.node_id = 1
        return replies


@pytest.fixture(autouse=True)
def _task_identity():
    # Messages created outside Flower's runtimes need a run/task identity.
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 7, 1, 1
    yield


def _grid(member_files) -> InProcessGrid:
    return InProcessGrid(
        {
            101 + i: {"participant": m["name"], "data": m["data"], "val-data": m["val_data"]}
            for i, m in enumerate(member_files)
        }
    )


def _config(model_dir, **overrides) -> FederationConfig:
    base = dict(
        model_path=model_dir,
        num_rounds=1,
        min_available=3,
        min_train=2,
        local_steps=1,
        batch_size=4,
        learning_rate=5e-3,
        eval_generations=0,
        evaluate_every=0,
        wait_for_nodes_s=1,
        max_round_retries=1,
    )
    return FederationConfig(**(base | overrides))


def _events(out_dir) -> list[dict]:
    return [json.loads(line) for line in (out_dir / "events.jsonl").read_text().splitlines()]


def test_a_silent_member_makes_the_round_partial_not_stuck(fed_model_dir, member_files, tmp_path):
    grid = _grid(member_files)
    grid.silent = {103}
    Federation(grid, _config(fed_model_dir), tmp_path).run()
    events = _events(tmp_path)
    rnd = next(e for e in events if e["event"] == "round")["metrics"]
    assert rnd["partial"] and rnd["members_sent"] == 3 and rnd["members_replied"] == 2
    assert set(rnd["members"]) == {"hospital-a", "hospital-b"}
    assert events[-1]["status"] == "completed"
    assert (tmp_path / "rounds" / "0001" / "adapter_model.safetensors").exists()


def test_below_min_train_the_round_fails_then_its_retry_succeeds(
    fed_model_dir, member_files, tmp_path
):
    grid = _grid(member_files)
    grid.silent = {102, 103}
    original = grid.send_and_receive

    def revive_after_first_failure(messages, *, timeout=None):
        replies = original(messages, timeout=timeout)
        if len(replies) < 2:
            grid.silent = set()  # the members come back for the retry
        return replies

    grid.send_and_receive = revive_after_first_failure
    Federation(grid, _config(fed_model_dir), tmp_path).run()
    events = _events(tmp_path)
    failed = [e for e in events if e["event"] == "round_failed"]
    assert len(failed) == 1 and failed[0]["retry"] and "1 of 3 members" in failed[0]["reason"]
    rnd = next(e for e in events if e["event"] == "round")
    assert rnd["metrics"]["attempt"] == 1 and rnd["metrics"]["members_replied"] == 3
    assert events[-1]["status"] == "completed"


def test_too_few_members_connected_fails_the_run_cleanly(fed_model_dir, member_files, tmp_path):
    grid = _grid(member_files[:1])
    Federation(grid, _config(fed_model_dir, max_round_retries=0), tmp_path).run()
    events = _events(tmp_path)
    assert events[-1]["status"] == "failed"
    assert "1 members connected, min_available is 3" in events[-1]["reason"]


def _adapter(out_dir, rnd: int) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out_dir / "rounds" / f"{rnd:04d}" / "adapter_model.safetensors"))


def test_secure_aggregation_gives_the_plain_weighted_mean(fed_model_dir, member_files, tmp_path):
    plain, secure = tmp_path / "plain", tmp_path / "secure"
    for out, on in ((plain, False), (secure, True)):
        out.mkdir()
        grid = _grid(member_files)
        Federation(grid, _config(fed_model_dir, secure_aggregation=on), out).run()
        if on:
            stages = [t for t in grid.sent if t.startswith("query.")]
            assert stages == [
                f"query.secagg_{s}"
                for s in ("advertise", "share", "masked", "unmask")
                for _ in range(3)
            ]
    a, b = _adapter(plain, 1), _adapter(secure, 1)
    assert a.keys() == b.keys()
    moved = max(float((a[k] - _adapter(plain, 0)[k]).abs().max()) for k in a)
    assert moved > 1e-4
    for k in a:  # equal up to the fixed-point encoding
        assert torch.allclose(a[k], b[k], atol=1e-5), k
    report = next(e for e in _events(secure) if e["event"] == "round")["metrics"]["secagg"]
    assert report["survivors"] == 3 and report["threshold"] == 2


def test_secure_aggregation_with_dp_survives_a_lost_member_and_stops_at_the_budget(
    fed_model_dir, member_files, tmp_path
):
    # The budget allows one round at sigma = 1 (epsilon ~4.3 at delta 1e-5), not two.
    dp = DPConfig(clip_norm=0.05, noise_multiplier=1.0, delta=1e-5, max_epsilon=6.0)
    grid = _grid(member_files)
    original = grid.send_and_receive

    def drop_c_before_masking(messages, *, timeout=None):
        if messages and messages[0].metadata.message_type == "query.secagg_masked":
            grid.silent = {103}
        return original(messages, timeout=timeout)

    grid.send_and_receive = drop_c_before_masking
    config = _config(fed_model_dir, num_rounds=3, secure_aggregation=True, dp=dp)
    Federation(grid, config, tmp_path).run()
    events = _events(tmp_path)
    rounds = [e["metrics"] for e in events if e["event"] == "round"]
    assert len(rounds) == 1 and 0 < rounds[0]["epsilon"] <= 6.0
    assert rounds[0]["secagg"]["survivors"] == 2
    assert all(0 < m["dp_clip_factor"] <= 1.0 for m in rounds[0]["members"].values())
    assert torch.isfinite(torch.cat([v.flatten() for v in _adapter(tmp_path, 1).values()])).all()
    assert events[-1]["status"] == "budget_exhausted" and "budget" in events[-1]["reason"]


def test_ffa_keeps_a_and_svd_reports_its_truncation(fed_model_dir, member_files, tmp_path):
    ffa, svd = tmp_path / "ffa", tmp_path / "svd"
    ffa.mkdir()
    svd.mkdir()
    grid = _grid(member_files)
    Federation(grid, _config(fed_model_dir, aggregation="ffa"), ffa).run()
    start, end = _adapter(ffa, 0), _adapter(ffa, 1)
    for k in start:
        if "lora_A" in k:
            assert torch.equal(start[k], end[k])
    assert any(float((end[k] - start[k]).abs().max()) > 0 for k in start if "lora_B" in k)
    Federation(_grid(member_files), _config(fed_model_dir, aggregation="svd"), svd).run()
    report = next(e for e in _events(svd) if e["event"] == "round")["metrics"]
    assert report["aggregation_report"]["truncation_error_max"] is not None
    assert report["aggregation_report"]["naive_lora_error"] > 0


def provide(options: dict) -> dict:
    """A data provider as the control plane would write one: examples in memory."""
    rows = [json.loads(line) for line in open(options["path"])]
    return {"train": rows[: int(options["n"])], "val": rows[-1:]}


def test_data_provider_supplies_examples_in_memory(member_files):
    node_config = {
        "data-provider": "tests.federated.test_apps:provide",
        "provider.path": member_files[0]["data"],
        "provider.n": 3,
    }
    train, val = load_node_data(node_config)
    assert len(train) == 3 and len(val) == 1
    with pytest.raises(ValueError, match="cannot load data provider"):
        load_node_data({"data-provider": "tests.federated.test_apps:missing"})


def test_evaluate_scores_suite_tasks_by_reward(fed_model_dir, member_files):
    from federated.server_app import initial_adapter

    tensors, adapter_config = initial_adapter(_config(fed_model_dir))
    trainer = NodeTrainer(
        {"data": member_files[0]["data"], "val-data": member_files[0]["val_data"]}
    )
    config = {
        "model-path": fed_model_dir,
        "adapter-config": adapter_config,
        "max-seq-len": 256,
        "eval-generations": 2,
        "eval-max-new-tokens": 4,
    }
    metrics = trainer.evaluate(tensors, config)
    assert metrics["num-scored"] == 2 and 0.0 <= metrics["accuracy"] <= 1.0
    assert metrics["val_loss"] > 0 and metrics["num-examples"] == 2
    again = trainer.evaluate(tensors, config)  # the warm model, adapter reloaded in place
    assert again["val_loss"] == pytest.approx(metrics["val_loss"])


def test_a_stopped_run_resumes_after_its_last_round_in_the_same_directory(
    fed_model_dir, member_files, tmp_path
):
    grid = _grid(member_files)
    original = grid.send_and_receive

    def stop_during_round_1(messages, *, timeout=None):
        (tmp_path / "stop").touch()  # what should_stop() does through federated.runtime
        return original(messages, timeout=timeout)

    grid.send_and_receive = stop_during_round_1
    Federation(grid, _config(fed_model_dir, num_rounds=2), tmp_path).run()
    assert _events(tmp_path)[-1]["status"] == "stopped"
    after_round_1 = _adapter(tmp_path, 1)

    Federation(_grid(member_files), _config(fed_model_dir, num_rounds=2), tmp_path).run()
    events = _events(tmp_path)
    assert [e["round"] for e in events if e["event"] == "round"] == [1, 2]
    assert any(e["event"] == "resume" and e["round"] == 2 for e in events)
    assert events[-1]["status"] == "completed"
    assert not torch.equal(
        after_round_1["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"],
        _adapter(tmp_path, 2)["base_model.model.model.layers.0.self_attn.o_proj.lora_B.weight"],
    )
    with pytest.raises(RuntimeError, match="already completed"):
        Federation(_grid(member_files), _config(fed_model_dir, num_rounds=2), tmp_path).run()


def test_dp_budget_spent_by_earlier_runs_counts(fed_model_dir, member_files, tmp_path):
    # One round at sigma = 1 reaches epsilon ~4.3 (delta 1e-5); a second passes 6.
    dp = DPConfig(clip_norm=0.05, noise_multiplier=1.0, delta=1e-5, max_epsilon=6.0)
    grid = _grid(member_files)
    Federation(grid, _config(fed_model_dir, dp=dp, dp_rounds_done=1), tmp_path).run()
    events = _events(tmp_path)
    assert not [e for e in events if e["event"] == "round"] and grid.sent == []
    assert events[-1]["status"] == "budget_exhausted"
