"""The shortened polls of the deployment runtime: the ServerApp's FastPollGrid and the
SuperNode launcher (federated.supernode). The deployment test runs both for real."""

from __future__ import annotations

import inspect
import subprocess
import sys
import time

import pytest

from federated.server_app import FastPollGrid
from federated.supernode import _ShortSleeps


class _Reply:
    def __init__(self, reply_to: str):
        self.metadata = type("Metadata", (), {"reply_to_message_id": reply_to})()

    def has_error(self) -> bool:
        return self.metadata.reply_to_message_id.startswith("err")


class SlowGrid:
    """A Grid whose replies appear after a number of pulls; ``late`` never replies."""

    def __init__(self, pulls_needed: dict[str, int]):
        self.pulls_needed = pulls_needed
        self.pulls = 0
        self.node_ids = [1, 2]

    def push_messages(self, messages):
        return list(messages)

    def pull_messages(self, message_ids):
        self.pulls += 1
        return [_Reply(m) for m in message_ids if self.pulls_needed.get(m, 10**9) <= self.pulls]

    def get_node_ids(self):
        return self.node_ids


def test_fast_poll_grid_collects_replies_as_they_come_and_stops_at_the_timeout():
    grid = SlowGrid({"a": 1, "b": 3})
    fast = FastPollGrid(grid, poll_s=0.001)
    replies = fast.send_and_receive(["a", "b"], timeout=60)
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b"]
    assert grid.pulls == 3  # stopped as soon as the last reply was in
    assert fast.get_node_ids() == [1, 2]  # everything else is the wrapped Grid

    grid = SlowGrid({"a": 1})
    replies = FastPollGrid(grid, poll_s=0.01).send_and_receive(["a", "late"], timeout=0.05)
    assert [r.metadata.reply_to_message_id for r in replies] == ["a"]


def test_once_the_quorum_replied_stragglers_get_only_the_grace():
    # An error reply does not count towards the quorum: the grace starts at "b", pull 4.
    grid = SlowGrid({"a": 1, "err": 2, "b": 4, "c": 6})
    fast = FastPollGrid(grid, poll_s=0.001)
    start = time.monotonic()
    replies = fast.send_and_receive(
        ["a", "err", "b", "c", "never"], timeout=60, quorum=2, grace_s=0.2
    )
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c", "err"]
    assert 0.2 <= time.monotonic() - start < 5  # not the 60 s timeout
    # A grace longer than the timeout leaves the timeout in charge.
    grid = SlowGrid({"a": 1, "b": 2})
    start = time.monotonic()
    replies = FastPollGrid(grid, poll_s=0.001).send_and_receive(
        ["a", "b", "late"], timeout=0.1, quorum=1, grace_s=60
    )
    assert len(replies) == 2 and time.monotonic() - start < 5
    # A quorum that took long stretches the grace to as long again: "c" comes at 1.5 times
    # the quorum's time, far past the 0.01 s grace alone (about 10 pulls).
    grid = SlowGrid({"a": 1, "b": 200, "c": 300})
    replies = FastPollGrid(grid, poll_s=0.001).send_and_receive(
        ["a", "b", "c", "late"], timeout=60, quorum=2, grace_s=0.01
    )
    assert sorted(r.metadata.reply_to_message_id for r in replies) == ["a", "b", "c"]


def test_the_supernode_sleeps_we_cap_are_still_flowers_fixed_ones():
    # If a Flower upgrade makes the idle poll configurable (or renames the module), this
    # fails and federated.supernode should use the setting instead.
    from flwr.supernode import start_client_internal

    source = inspect.getsource(start_client_internal)
    assert "import time\n" in source and "time.sleep(3)" in source
    short = _ShortSleeps(0.0001)
    short.sleep(3)  # returns at once: capped
    assert short.monotonic() > 0  # the rest of `time` passes through


def test_the_supernode_launcher_is_flowers_cli():
    out = subprocess.run(
        [sys.executable, "-m", "federated.supernode", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert "--superlink" in out.stdout and "--auth-supernode-private-key" in out.stdout


def test_the_straggler_grace_is_a_validated_config_field_that_travels():
    from federated.config import FederationConfig

    config = FederationConfig(model_path="m", straggler_timeout_s=12.5)
    assert FederationConfig.from_dict(config.to_dict()).straggler_timeout_s == 12.5
    config.straggler_timeout_s = -1
    with pytest.raises(ValueError, match="straggler_timeout_s must be >= 0: -1"):
        config.validate()
