"""The ServerApp: rounds of federated LoRA training over Flower's Grid, recorded as it goes.

The run file (JSON, named by the run config key ``run-file``; see federated.config) holds the
FederationConfig, the participants (used only by simulated ClientApps) and ``out-dir``.
Everything the ServerApp learns it appends to ``out-dir/events.jsonl`` and the global adapter
of each round goes to ``out-dir/rounds/NNNN/`` in PEFT format; ``federated.runtime`` tails
the events and calls the control plane's callbacks. A file ``out-dir/stop`` ends the run
after the current round.

One round:
  1. wait (up to ``wait_for_nodes_s``) for ``min_available`` members;
  2. DP: refuse the round if it would exceed the privacy budget (the run ends);
  3. train: the strategy's messages, replies collected until ``round_timeout_s`` (or, once
     ``min_train`` have replied, ``straggler_timeout_s`` more; evaluation likewise once
     the members that trained have answered); a member
     that is killed or slow is left out and the round is "partial"; fewer than ``min_train``
     replies fail the round, which is retried up to ``max_round_retries`` times;
  4. with secure aggregation, four more message exchanges (query.secagg_*) so the server
     sees only the weighted sum of the updates;
  5. aggregate (federated.strategy), evaluate on every member's validation data, save.

Events (one JSON object a line): {"event": "start", ...}, {"event": "round", "round": r,
"metrics": {...}, "adapter_dir": "..."}, {"event": "round_failed", "round": r, "reason":
"...", "retry": bool}, {"event": "end", "status": "completed|stopped|failed|budget_exhausted",
"reason": ...}.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp

from federated.client_app import (
    LAYOUT_KEY,
    content_arrays,
    is_packed,
    pack_arrays,
    to_torch,
    unpack_arrays,
)
from federated.config import FederationConfig, read_run_file
from federated.strategy import OwnAggregation, build_strategy


class RoundFailed(Exception):
    """A round could not complete; ``retry`` says whether trying again can help."""

    def __init__(self, reason: str, retry: bool = True):
        super().__init__(reason)
        self.reason, self.retry = reason, retry


class Superseded(Exception):
    """A newer submission of this run took over (after a SuperLink restart)."""


class EventLog:
    """Appends one JSON object per line and flushes, so a reader can tail it.

    ``out_dir/generation`` (written by federated.runtime before each submission) names the
    ServerApp that owns the log; one from an earlier submission, still winding down after
    its SuperLink died, raises Superseded instead of writing.
    """

    def __init__(self, path: Path):
        self.path = path
        self.generation_file = path.parent / "generation"
        self.generation = self._current()

    def _current(self) -> str | None:
        try:
            return self.generation_file.read_text().strip()
        except FileNotFoundError:
            return None

    def write(self, **event: Any) -> None:
        if self._current() != self.generation:
            raise Superseded(f"generation {self.generation} was superseded")
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({"time": time.time(), **event}) + "\n")


def initial_adapter(config: FederationConfig) -> tuple[dict, str]:
    """(tensors, adapter_config.json text) of the run's starting adapter: the PEFT directory
    ``config.initial_adapter`` when given (a federation continuing from its last round),
    else a fresh one: A random by ``seed``, B zero, so every member starts from the same
    point and round 0 is the base model."""
    import torch

    if config.initial_adapter:
        from finetune import lora as peft_files

        directory = Path(config.initial_adapter)
        files = {p.name: p.read_bytes() for p in directory.iterdir() if p.is_file()}
        _, tensors = peft_files.read_adapter_files(files)
        return tensors, files["adapter_config.json"].decode()

    import inference
    from finetune import lora

    torch.manual_seed(config.seed)
    model = lora.apply_lora(
        inference.load_model(config.model_path),
        targets=config.targets,
        r=config.lora_r,
        alpha=config.lora_alpha,
    )
    files = lora.adapter_files(model)
    _, tensors = lora.read_adapter_files(files)
    return tensors, files["adapter_config.json"].decode()


def _nbytes(tensors: dict) -> int:
    return int(sum(t.numel() * t.element_size() for t in tensors.values()))


class Federation:
    """Drives the rounds of one run over ``grid``. See the module docstring."""

    def __init__(self, grid: Grid, config: FederationConfig, out_dir: Path, run_id: int = 0):
        self.grid, self.config, self.out_dir = grid, config, out_dir
        self.run_id = run_id
        self.events = EventLog(out_dir / "events.jsonl")
        self.strategy = build_strategy(config)
        self.tensors: dict = {}
        self.adapter_config = ""
        self.accountant = None
        if config.dp is not None:
            from federated import privacy

            self.accountant = privacy.PrivacyAccountant(
                config.dp, rounds_done=config.dp_rounds_done
            )

    # ---- the run ------------------------------------------------------------------------

    def run(self) -> None:
        first = self._resume()
        if first == 1:
            self.tensors, self.adapter_config = initial_adapter(self.config)
            self.events.write(event="start", config=self.config.to_dict())
            self._save(0)
        status, reason = "completed", None
        for rnd in range(first, self.config.num_rounds + 1):
            if (self.out_dir / "stop").exists():
                status, reason = "stopped", "stop requested"
                break
            for attempt in range(self.config.max_round_retries + 1):
                try:
                    self._round(rnd, attempt)
                    break
                except RoundFailed as e:
                    retry = e.retry and attempt < self.config.max_round_retries
                    self.events.write(event="round_failed", round=rnd, reason=e.reason, retry=retry)
                    if not retry:
                        status = "budget_exhausted" if not e.retry else "failed"
                        reason = e.reason
                        break
            if status != "completed":
                break
        self.events.write(event="end", status=status, reason=reason)

    def _resume(self) -> int:
        """After a restart (of the SuperLink, hence of this app), continue from the last
        round recorded in events.jsonl: its saved adapter, and the privacy spent so far.
        Returns the first round to run (1 for a fresh run)."""
        from federated.client_app import ADAPTER_CONFIG

        path = self.events.path
        done = []
        if path.exists():
            events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
            ends = [e for e in events if e["event"] == "end"]
            if ends and ends[-1]["status"] == "completed":
                raise RuntimeError(f"{path} records a run that already completed")
            # A stopped, failed or timed-out run is resumed: the control plane retries a
            # federation by running it again in the same work_dir.
            (self.out_dir / "stop").unlink(missing_ok=True)
            done = [e for e in events if e["event"] == "round"]
            if not done and not any(e["event"] == "start" for e in events):
                return 1
        else:
            return 1
        from safetensors.torch import load_file

        last = self.out_dir / "rounds" / f"{(done[-1]['round'] if done else 0):04d}"
        self.tensors = load_file(str(last / "adapter_model.safetensors"))
        self.adapter_config = (last / ADAPTER_CONFIG).read_text()
        if self.accountant is not None:
            for _ in done:
                self.accountant.step()
        first = (done[-1]["round"] if done else 0) + 1
        self.events.write(event="resume", round=first)
        return first

    def _exchange(self, messages: list[Message], quorum: int) -> list[Message]:
        """Send ``messages`` and collect the replies until ``round_timeout_s``, or until
        ``straggler_timeout_s`` after ``quorum`` of them replied without an error."""
        cfg = self.config
        grace = {}  # FastPollGrid's extension (the ServerApp's Grid is one)
        if cfg.straggler_timeout_s is not None:
            grace = {"quorum": quorum, "grace_s": cfg.straggler_timeout_s}
        return list(self.grid.send_and_receive(messages, timeout=cfg.round_timeout_s, **grace))

    def _round(self, rnd: int, attempt: int) -> None:
        cfg = self.config
        start = time.perf_counter()
        nodes = self._wait_for_nodes()
        waited_s = time.perf_counter() - start
        epsilon = None
        if self.accountant is not None:
            from federated import privacy

            try:
                epsilon = self.accountant.step(sample_rate=1.0)
            except privacy.BudgetExceeded as e:
                raise RoundFailed(f"privacy budget: {e}", retry=False) from e

        arrays, config = self._packed(self._round_config(rnd, attempt))
        if isinstance(self.strategy, OwnAggregation):
            self.strategy.current = self.tensors
        messages = list(self.strategy.configure_train(rnd, arrays, config, self.grid))
        sent_to = [m.metadata.dst_node_id for m in messages]
        exchange_start = time.perf_counter()
        replies = self._exchange(messages, quorum=cfg.min_train)
        exchange_s = time.perf_counter() - exchange_start
        valid = [m for m in replies if not m.has_error()]
        errors = {m.metadata.src_node_id: m.error.reason for m in replies if m.has_error()}
        if len(valid) < cfg.min_train:
            missing = len(sent_to) - len(replies)
            raise RoundFailed(
                f"{len(valid)} of {len(sent_to)} members replied in time (min_train "
                f"{cfg.min_train}; {missing} timed out, errors: {errors or 'none'})"
            )
        bytes_down = _nbytes(self.tensors) * len(sent_to)
        bytes_up = sum(
            m.content.array_records["arrays"].count_bytes() for m in valid if "arrays" in m.content
        )
        secagg_report: dict = {}
        lora_error: float | None = None  # unknown under secure aggregation: no single update
        if cfg.secure_aggregation:
            mean_delta, secagg_report = self._secure_mean(rnd, attempt, valid)
            bytes_up += secagg_report.pop("bytes_up")
            bytes_down += secagg_report.pop("bytes_down")
            new = {k: (self.tensors[k].double() + v).float() for k, v in mean_delta.items()}
            train_metrics = self.strategy.train_metrics_aggr_fn(
                [m.content for m in valid], "num-examples"
            )
        else:
            lora_error = self._lora_aggregation_error(valid)
            layouts = {m.content.config_records["config"].get(LAYOUT_KEY) for m in valid}
            if len(layouts) != 1:
                raise RoundFailed("members replied with different adapter layouts")
            agg_arrays, train_metrics = self.strategy.aggregate_train(rnd, valid)
            if agg_arrays is None:
                raise RoundFailed("aggregation produced no adapter")
            # Flower's rules average the packed Arrays; OwnAggregation returns tensors.
            layout = layouts.pop() if is_packed(agg_arrays) else None
            new = to_torch(unpack_arrays(agg_arrays, layout))
        # FFA-LoRA replies carry only B; A stays the global one.
        self.tensors = {**self.tensors, **new}
        train_seconds = time.perf_counter() - start
        aggregate_s = train_seconds - waited_s - exchange_s

        eval_replies: list[Message] = []
        if cfg.evaluate_every and rnd % cfg.evaluate_every == 0:
            eval_msgs = list(
                self.strategy.configure_evaluate(
                    rnd, *self._packed(self._round_config(rnd)), self.grid
                )
            )
            bytes_down += _nbytes(self.tensors) * len(eval_msgs)
            eval_replies = [
                m
                # Once every member that trained this round has answered, the rest get the
                # straggler grace too.
                for m in self._exchange(eval_msgs, quorum=min(len(valid), len(eval_msgs)))
                if not m.has_error()
            ]
        per_member: dict[str, dict] = {}
        for m in valid:
            per_member.setdefault(_member(m), {}).update(_train_metrics(m))
        for m in eval_replies:
            m_eval = dict(m.content.metric_records["metrics"])
            m_eval["eval_examples"] = m_eval.pop("num-examples", 0)
            per_member.setdefault(_member(m), {}).update(m_eval)
        metrics = {
            "round": rnd,
            "attempt": attempt,
            "members_sent": len(sent_to),
            "members_replied": len(valid),
            "members_connected": len(nodes),
            "partial": len(valid) < len(sent_to),
            "errors": {str(k): v for k, v in errors.items()},
            "train_loss": _weighted(per_member, "train_loss"),
            "val_loss": _weighted(per_member, "val_loss", "eval_examples"),
            "accuracy": _weighted(per_member, "accuracy", "num-scored"),
            "bytes_up": int(bytes_up),
            "bytes_down": int(bytes_down),
            "adapter_bytes": _nbytes(self.tensors),
            "train_seconds": train_seconds,
            # The train exchange, and what of it was not the slowest member's training:
            # message transport, ClientApp process start, polling (the framework's share).
            "train_exchange_s": exchange_s,
            "train_exchange_overhead_s": exchange_s
            - max((float(m.get("train_seconds") or 0) for m in per_member.values()), default=0),
            "seconds": time.perf_counter() - start,
            "epsilon": epsilon,
            "lora_aggregation_error": lora_error,
            "members": per_member,
            "train_aggregate": dict(train_metrics or {}),
        }
        if isinstance(self.strategy, OwnAggregation):
            metrics["aggregation_report"] = self.strategy.last_report
        if secagg_report:
            metrics["secagg"] = secagg_report
        save_start = time.perf_counter()
        adapter_dir = self._save(rnd)
        # Where the round's seconds went (the deployment overhead is read from these).
        metrics["phases_s"] = {
            "wait_for_nodes": waited_s,
            "train_exchange": exchange_s,
            "aggregate": aggregate_s,
            "evaluate": metrics["seconds"] - train_seconds,
            "save": time.perf_counter() - save_start,
        }
        self.events.write(event="round", round=rnd, metrics=metrics, adapter_dir=str(adapter_dir))

    # ---- secure aggregation -------------------------------------------------------------

    def _secagg_round_id(self, rnd: int, attempt: int) -> str:
        return f"{self.run_id}/{rnd}/{attempt}"

    def _stage(self, stage: str, payloads: dict[int, tuple[dict, dict]]) -> dict[int, Message]:
        """Send query.<stage> to each member (arrays, config) and collect replies in time."""
        messages = []
        for node, (arrays, config) in payloads.items():
            content = RecordDict()
            config = dict(config)
            if arrays:
                content["arrays"], config[LAYOUT_KEY] = pack_arrays(arrays)
            content["config"] = ConfigRecord(config)
            messages.append(
                Message(content, message_type=f"{MessageType.QUERY}.{stage}", dst_node_id=node)
            )
        replies = self.grid.send_and_receive(messages, timeout=self.config.round_timeout_s)
        return {m.metadata.src_node_id: m for m in replies if not m.has_error()}

    def _secure_mean(self, rnd: int, attempt: int, trained: list[Message]) -> tuple[dict, dict]:
        """Four message exchanges (federated.secagg); returns the weighted mean update by
        tensor name, learning nothing about any single member's update. Members that drop
        out are handled by the protocol; below the threshold the round fails (RoundFailed)."""
        import torch

        from federated import secagg

        rid = self._secagg_round_id(rnd, attempt)
        members = [m.metadata.src_node_id for m in trained]
        counts = [float(m.content.metric_records["metrics"]["num-examples"]) for m in trained]
        layout_source = {
            k: v
            for k, v in self.tensors.items()
            if not (self.config.aggregation == "ffa" and "lora_A" in k)
        }
        _, layout = secagg.flatten_params(layout_source)
        vector_len = sum(int(math.prod(shape)) for _, shape in layout) + 1  # + the weight
        threshold = _threshold(len(members))
        fp = secagg.FixedPoint.for_sum(self.config.secagg_clip, len(members))
        server = secagg.SecAggServer(rid, threshold, vector_len, fp)
        base = {
            "round-id": rid,
            "threshold": threshold,
            "clip": self.config.secagg_clip,
            "max-clients": len(members),
        }
        up = down = 0
        try:
            replies = self._stage("secagg_advertise", {n: ({}, base) for n in members})
            for node, m in replies.items():
                keys = dict(m.content.config_records["config"])
                up += sum(len(v) for v in keys.values())
                server.receive_advertisement(node, keys)
            roster = server.close_advertise()
            shared = {f"r/{k}": v for k, v in roster.items()}
            down += sum(len(v) for v in roster.values()) * len(server.u1)
            replies = self._stage("secagg_share", {n: ({}, base | shared) for n in server.u1})
            for node, m in replies.items():
                shares = {k: bytes(v) for k, v in m.content.config_records["config"].items()}
                up += sum(len(v) for v in shares.values())
                server.receive_shares(node, shares)
            inboxes = server.close_share_keys()
            cap = {"weight-cap": max(counts)}
            payloads = {
                n: ({}, base | cap | {f"i/{k}": v for k, v in inbox.items()})
                for n, inbox in inboxes.items()
            }
            down += sum(len(v) for inbox in inboxes.values() for v in inbox.values())
            replies = self._stage("secagg_masked", payloads)
            for node, m in replies.items():
                masked = content_arrays(m.content)["masked"]
                up += masked.nbytes
                server.receive_masked_input(node, masked)
            request = server.close_masked_input()
            survivors = [int(x) for x in request["survivors"]]
            replies = self._stage(
                "secagg_unmask", {n: ({}, base | {"survivors": survivors}) for n in survivors}
            )
            for node, m in replies.items():
                shares = {k: bytes(v) for k, v in m.content.config_records["config"].items()}
                up += sum(len(v) for v in shares.values())
                server.receive_unmask(node, shares)
            total = server.finalize()
        except secagg.SecAggAborted as e:
            raise RoundFailed(f"secure aggregation aborted: {e}") from e
        mean = secagg.weighted_mean(total)
        delta = secagg.unflatten_params(mean, layout)
        report = {
            "survivors": len(survivors),
            "threshold": threshold,
            "rejected": {str(k): v for k, v in server.rejected.items()},
            "bytes_up": up,
            "bytes_down": down,
        }
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in delta.items()}, report

    # ---- helpers ------------------------------------------------------------------------

    def _lora_aggregation_error(self, replies: list[Message]) -> float | None:
        """How far this round's weighted mean of the members' factors is from the weighted
        mean of their products B_i A_i (relative Frobenius, federated.aggregation). FFA
        replies carry only B; their A is the global one, which each member reports it kept
        (``lora_A_change``): the error is then 0 up to float rounding, and the largest
        reported change of A is what could break it."""
        from federated import aggregation

        updates, weights = [], []
        for m in replies:
            if "arrays" not in m.content:
                return None
            tensors = to_torch(content_arrays(m.content))
            updates.append({**self.tensors, **tensors})
            weights.append(float(m.content.metric_records["metrics"]["num-examples"]))
        if not updates or not aggregation.lora_pairs(list(updates[0])):
            return None
        return aggregation.naive_lora_error(updates, weights)["__total__"]

    def _wait_for_nodes(self) -> list[int]:
        deadline = time.monotonic() + self.config.wait_for_nodes_s
        while True:
            nodes = list(self.grid.get_node_ids())
            if len(nodes) >= self.config.min_available:
                return nodes
            if time.monotonic() > deadline:
                raise RoundFailed(
                    f"{len(nodes)} members connected, min_available is {self.config.min_available}"
                )
            time.sleep(0.5)

    def _packed(self, config: ConfigRecord) -> tuple[ArrayRecord, ConfigRecord]:
        """The global adapter packed for the wire (client_app.pack_arrays), and ``config``
        with its layout."""
        arrays, config[LAYOUT_KEY] = pack_arrays(self.tensors)
        return arrays, config

    def _round_config(self, rnd: int, attempt: int = 0) -> ConfigRecord:
        cfg = self.config
        extra: dict[str, Any] = {}
        if cfg.secure_aggregation:
            extra = {"secagg": True, "secagg-round": self._secagg_round_id(rnd, attempt)}
        if cfg.aggregation == "fedprox":
            # Flower's FedProx strategy adds this too; OwnAggregation (robust rules) does not.
            extra["proximal-mu"] = float(cfg.proximal_mu)
        if cfg.dp is not None:
            extra["dp-clip"] = cfg.dp.clip_norm
            extra["dp-noise"] = cfg.dp.noise_multiplier
            if cfg.secure_aggregation:
                # Distributed DP: the sum of >= threshold members' shares carries the full
                # noise; the threshold is a lower bound on the survivors (federated.privacy).
                extra["dp-shares"] = _threshold(cfg.min_train)
        return ConfigRecord(
            {
                **extra,
                "server-round": rnd,
                "model-path": cfg.model_path,
                "adapter-config": self.adapter_config,
                "aggregation": cfg.aggregation,
                "lora-r": cfg.lora_r,
                "lora-alpha": cfg.lora_alpha,
                "targets": list(cfg.targets),
                "learning-rate": round_learning_rate(cfg, rnd),
                "lr-schedule": "constant" if cfg.lr_decay == "rounds" else "cosine",
                "local-steps": cfg.local_steps,
                "batch-size": cfg.batch_size,
                "max-seq-len": cfg.max_seq_len,
                "seed": cfg.seed,
                "eval-generations": cfg.eval_generations,
                "eval-max-new-tokens": cfg.eval_max_new_tokens,
            }
        )

    def _save(self, rnd: int) -> Path:
        from federated.client_app import adapter_files_from

        path = self.out_dir / "rounds" / f"{rnd:04d}"
        path.mkdir(parents=True, exist_ok=True)
        for name, blob in adapter_files_from(self.tensors, self.adapter_config).items():
            (path / name).write_bytes(blob)
        return path


def round_learning_rate(config: FederationConfig, rnd: int) -> float:
    """The members' local learning rate in round ``rnd`` (1-based): with ``lr_decay``
    "rounds", ``learning_rate`` decayed by a cosine over the run's rounds (the first round
    at the full rate, none at zero); with "local", always ``learning_rate`` (each member's
    own cosine then runs within its local steps)."""
    if config.lr_decay != "rounds":
        return config.learning_rate
    progress = (rnd - 1) / config.num_rounds
    return config.learning_rate * 0.5 * (1.0 + math.cos(math.pi * progress))


def _threshold(n_members: int) -> int:
    """Shamir threshold: a strict majority, and never below 2."""
    from federated import secagg

    return max(2, secagg.default_threshold(n_members))


def _member(msg: Message) -> str:
    content = msg.content
    if "config" in content and "participant" in content.config_records["config"]:
        return str(content.config_records["config"]["participant"])
    return f"node-{msg.metadata.src_node_id}"


def _train_metrics(msg: Message) -> dict:
    m = dict(msg.content.metric_records["metrics"])
    return {
        "train_loss": m.get("train_loss"),
        "train_examples": m.get("num-examples"),
        "trained_tokens": m.get("trained_tokens"),
        "train_seconds": m.get("train_seconds"),
        "trainer_pid": m.get("trainer_pid"),
        **{k: m[k] for k in ("dp_clip_factor", "lora_A_change", "proximal_term") if k in m},
    }


def _weighted(
    per_member: dict[str, dict], key: str, weight_key: str = "train_examples"
) -> float | None:
    pairs = [
        (float(m[key]), float(m.get(weight_key) or m.get("num-examples") or 1))
        for m in per_member.values()
        if m.get(key) is not None and not math.isnan(float(m[key]))
    ]
    total = sum(w for _, w in pairs)
    return sum(v * w for v, w in pairs) / total if total else None


class FastPollGrid:
    """The runtime's Grid, collecting replies every ``poll_s`` seconds.

    Why: Flower 1.42's ``HttpGrid.send_and_receive`` (the deployment runtime's Grid) sleeps a
    fixed 3 s between pulls, so every exchange (train, evaluate, each secure-aggregation
    stage) ended on a 3 s tick after its last reply. This pushes the messages and pulls with
    the Grid's own ``pull_messages`` every ``poll_s``; everything else is the wrapped Grid.
    Given ``quorum`` and ``grace_s``, it stops waiting ``grace_s`` (or as long as the quorum
    took, if longer) after the ``quorum``-th reply without an error
    (FederationConfig.straggler_timeout_s).
    """

    def __init__(self, grid: Grid, poll_s: float = 0.1):
        self._grid, self.poll_s = grid, poll_s

    def __getattr__(self, name: str):
        return getattr(self._grid, name)

    def send_and_receive(
        self,
        messages,
        *,
        timeout: float | None = None,
        quorum: int | None = None,
        grace_s: float | None = None,
    ) -> list[Message]:
        pending = set(self._grid.push_messages(messages))
        start = time.monotonic()
        deadline = None if timeout is None else start + timeout
        replies: list[Message] = []
        valid = 0
        while pending:
            got = list(self._grid.pull_messages(pending))
            replies.extend(got)
            pending -= {m.metadata.reply_to_message_id for m in got}
            before, valid = valid, valid + sum(not m.has_error() for m in got)
            if quorum is not None and grace_s is not None and before < quorum <= valid:
                # At least as long again as the quorum took: a round that is slow for
                # everyone (cold starts, a loaded host) does not cut off the slowest.
                now = time.monotonic()
                grace_end = now + max(grace_s, now - start)
                deadline = grace_end if deadline is None else min(deadline, grace_end)
            if not pending or (deadline is not None and time.monotonic() >= deadline):
                break
            time.sleep(self.poll_s)
        return replies


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Flower entry point: run the federation described by the run file."""
    run = read_run_file(str(context.run_config["run-file"]))
    out_dir = Path(run["out-dir"])
    config = FederationConfig.from_dict(run["federation"])
    federation = Federation(FastPollGrid(grid), config, out_dir, run_id=context.run_id)
    try:
        federation.run()
    except Superseded:
        return
    except Exception as e:
        with contextlib.suppress(Superseded):
            federation.events.write(event="end", status="failed", reason=f"{type(e).__name__}: {e}")
        raise


__all__ = ["Federation", "MessageType", "RecordDict", "RoundFailed", "app", "initial_adapter"]
