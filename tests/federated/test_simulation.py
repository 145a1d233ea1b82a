"""The simulation runtime end to end: Flower's simulation engine (Ray), our ServerApp and
ClientApp, real SFT on a tiny model, three members with non-IID data. The SuperLink is
killed after round 1: the runtime restarts it and the run resumes at round 2."""

from __future__ import annotations

import json
import os
import signal

from safetensors.torch import load as load_safetensors

from federated import FederationConfig, ParticipantSpec, run_federation


class Recorder:
    def __init__(self, stop_after: int | None = None, kill_link_after: int | None = None):
        self.rounds: list[tuple[int, dict, dict]] = []
        self.failed: list[tuple[int, str]] = []
        self.stop_after = stop_after
        self.kill_link_after = kill_link_after
        self.procs = None

    def started(self, procs, port) -> None:
        self.procs = procs

    def on_round_end(self, round: int, metrics: dict, adapter_files: dict[str, bytes]) -> None:
        self.rounds.append((round, metrics, adapter_files))
        if round == self.kill_link_after:
            os.killpg(self.procs.procs["superlink"].pid, signal.SIGKILL)

    def on_round_failed(self, round: int, reason: str) -> None:
        self.failed.append((round, reason))

    def should_stop(self) -> bool:
        return self.stop_after is not None and len(self.rounds) >= self.stop_after


def test_simulation_trains_reports_each_round_and_resumes_after_a_superlink_restart(
    fed_model_dir, member_files, tmp_path
):
    # The SuperLink is killed when the host sees round 1 end. Rounds after it must still be
    # to run then: a 2-round run could finish within one poll of the events file (it did,
    # once training got faster), and the kill would come after the end. Three more rounds
    # are seconds of work, not one poll.
    config = FederationConfig(
        model_path=fed_model_dir,
        num_rounds=4,
        min_available=3,
        min_train=3,
        local_steps=3,
        batch_size=4,
        learning_rate=5e-3,
        eval_generations=1,
        eval_max_new_tokens=8,
    )
    recorder = Recorder(kill_link_after=1)
    result = run_federation(
        config,
        participants=[ParticipantSpec(**m) for m in member_files],
        callbacks=recorder,
        runtime="simulation",
        work_dir=tmp_path / "run",
        timeout_s=600,
        on_started=recorder.started,
    )
    assert result.status == "completed", (result.reason, (tmp_path / "run" / "logs").iterdir())
    assert [r for r, _, _ in recorder.rounds] == [1, 2, 3, 4]
    assert result.restarts == 1  # the SuperLink came back and the rest ran on the resumed run
    first, last = recorder.rounds[0][1], recorder.rounds[-1][1]
    assert set(first["members"]) == {m["name"] for m in member_files}
    for member in first["members"].values():
        assert member["train_loss"] > 0 and member["val_loss"] > 0 and "accuracy" in member
    assert last["members_replied"] == 3 and not last["partial"]
    assert last["bytes_up"] > 0 and last["bytes_down"] > last["bytes_up"]
    # The global adapter moved away from its start (B = 0) and is valid PEFT.
    files = recorder.rounds[-1][2]
    assert json.loads(files["adapter_config.json"])["r"] == config.lora_r
    tensors = load_safetensors(files["adapter_model.safetensors"])
    assert any("lora_B" in k and float(v.abs().sum()) > 0 for k, v in tensors.items())
    assert result.adapter_files == files
