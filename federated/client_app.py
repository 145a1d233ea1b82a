"""The ClientApp: a member trains the global LoRA adapter on its own data, and evaluates it.

Messages (Flower Message API; ``arrays`` is an ArrayRecord holding the adapter's tensors,
by PEFT name, packed into one flat Array per dtype with the layout under ``array-layout``
in ``config``, a ConfigRecord (see ``pack_arrays``); ``metrics`` a MetricRecord):

    train            in: arrays (global adapter), config (round, SFT settings, adapter config)
                     out: arrays (this member's adapter, or its B half for FFA-LoRA; empty under
                          secure aggregation, where the update travels masked), metrics
                          (num-examples, train_loss, trained_tokens, train_seconds, steps)
    evaluate         in: arrays, config      out: metrics (num-examples, val_loss,
                          val_token_accuracy, and accuracy/num-scored for suite tasks)
    query.secagg_*   the secure-aggregation stages (see federated.secagg and server_app)

Where the work happens: a ``NodeTrainer`` holds the member's data (read once, in memory)
and its warm models. In simulation each Ray actor process keeps one per virtual node (the
registry below). In deployment ``python -m federated node`` runs the NodeTrainer in its own
long-lived process and names its socket in the SuperNode's node config (``trainer-address``);
the ClientApp process that the SuperNode starts for every message then only forwards the
message's tensors to it (``RemoteTrainer``), so the base model and torch are loaded once per
node, not once per message.

Data never leaves the member: the reply holds adapter tensors and metrics only.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import random
import time
from collections.abc import Mapping
from multiprocessing.connection import Client
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


# ---- data ---------------------------------------------------------------------------------


def _read_jsonl(path: str | Path) -> list[dict]:
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{number}: not JSON ({e})") from e
    return rows


def resolve_callable(ref: str):
    """``"package.module:attr"`` -> the object. ValueError when it cannot be found."""
    module, _, attr = ref.partition(":")
    if not module or not attr:
        raise ValueError(f"data provider must look like 'package.module:function', got {ref!r}")
    try:
        obj = importlib.import_module(module)
        for part in attr.split("."):
            obj = getattr(obj, part)
    except (ImportError, AttributeError) as e:
        raise ValueError(f"cannot load data provider {ref!r}: {e}") from e
    return obj


def load_node_data(node_config: Mapping[str, Any]) -> tuple[list[dict], list[dict]]:
    """(train, val) examples for one member, from its node config.

    ``data`` (+ optional ``val-data``): local JSONL files. ``data-provider``: a dotted
    ``module:function`` called with the ``provider.*`` options (prefix removed), returning
    ``{"train": [...], "val": [...]}`` in memory. Without validation rows, ``val-fraction``
    of the training rows are held out (by a fixed seed). ValueError when there is no data.
    """
    if node_config.get("data-provider"):
        options = {k[9:]: v for k, v in node_config.items() if k.startswith("provider.")}
        out = resolve_callable(str(node_config["data-provider"]))(options)
        train, val = list(out["train"]), list(out.get("val") or [])
    elif node_config.get("data"):
        train = _read_jsonl(node_config["data"])
        val = _read_jsonl(node_config["val-data"]) if node_config.get("val-data") else []
    else:
        raise ValueError("node config names no data: set data=FILE or data-provider=MODULE:FN")
    if not train:
        raise ValueError("this member has no training examples")
    if not val:
        fraction = float(node_config.get("val-fraction", 0.2))
        order = list(range(len(train)))
        random.Random(0).shuffle(order)
        n_val = min(max(1, round(len(train) * fraction)), len(train) - 1) if fraction else 0
        held = set(order[:n_val])
        val = [r for i, r in enumerate(train) if i in held]
        train = [r for i, r in enumerate(train) if i not in held]
    return train, val


def _sft_row(row: dict) -> dict:
    """The example without our ``task`` annotation (finetune.data checks the rest)."""
    return {k: v for k, v in row.items() if k != "task"}


# ---- adapters as tensors --------------------------------------------------------------------


# On the wire an adapter travels as one flat Array per dtype (``flat-float32``, ...), with
# its layout (name, dtype, shape per tensor, in order) as JSON under ``LAYOUT_KEY`` in the
# message's ``config`` ConfigRecord. Why: Flower stores every Array of a message as its own
# object, and in deployment each object is one authenticated HTTPS request from the
# SuperNode and several SQL statements in the SuperLink. The 64 tensors of a small LoRA
# adapter were about 130 requests per message and 10 to 15 s of a round on this machine;
# packed, a message is a handful of objects. Element-wise rules (Flower's FedAvg, FedProx,
# FedAdam) aggregate the flat Arrays exactly as they would the tensors one by one.
LAYOUT_KEY = "array-layout"
_FLAT = "flat-"


def _as_numpy(value: Any):
    import numpy as np

    if hasattr(value, "detach"):  # a torch tensor (imported lazily: the server has torch)
        value = value.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(value)


def pack_arrays(arrays: Mapping[str, Any]) -> tuple[ArrayRecord, str]:
    """{name: numpy array or torch tensor} -> (ArrayRecord of flat Arrays, layout JSON).
    Tensors go in name order, so members with the same adapter send the same layout."""
    import numpy as np

    groups: dict[str, list] = {}
    layout = []
    for name, value in sorted(arrays.items()):  # one layout for the same tensors, any order
        a = _as_numpy(value)
        groups.setdefault(a.dtype.str, []).append(a.reshape(-1))
        layout.append([name, a.dtype.str, list(a.shape)])
    record = ArrayRecord({_FLAT + dt: Array(np.concatenate(parts)) for dt, parts in groups.items()})
    return record, json.dumps(layout)


def is_packed(record: ArrayRecord) -> bool:
    """Whether ``record`` holds pack_arrays' flat Arrays (else one Array per tensor)."""
    return any(k.startswith(_FLAT) for k in record)


def unpack_arrays(record: ArrayRecord, layout: str | None) -> dict[str, Any]:
    """The inverse of pack_arrays. With no layout the record holds one Array per tensor
    (a server-side aggregate, or a sender that does not pack). ValueError when the flat
    Arrays do not hold exactly what the layout says (a malformed or tampered message)."""
    import numpy as np

    if layout is None:
        return {k: v.numpy() for k, v in record.items()}
    try:
        entries = [(str(n), np.dtype(dt), tuple(int(d) for d in shape))
                   for n, dt, shape in json.loads(layout)]  # fmt: skip
    except (ValueError, TypeError) as e:
        raise ValueError(f"bad {LAYOUT_KEY}: {e}") from e
    flats = {k[len(_FLAT) :]: v.numpy().reshape(-1) for k, v in record.items()}
    offsets = dict.fromkeys(flats, 0)
    out = {}
    for name, dtype, shape in entries:
        key = dtype.str
        if key not in flats:
            raise ValueError(f"{LAYOUT_KEY} names {name!r} as {key} but no {_FLAT}{key} array")
        n = math.prod(shape)
        start = offsets[key]
        if start + n > flats[key].size:
            raise ValueError(f"{_FLAT}{key} is too short for {name!r} {shape}")
        out[name] = flats[key][start : start + n].astype(dtype, copy=False).reshape(shape)
        offsets[key] = start + n
    for key, used in offsets.items():
        if used != flats[key].size:
            raise ValueError(f"{_FLAT}{key} holds {flats[key].size} values, the layout {used}")
    return out


def content_arrays(content: RecordDict) -> dict[str, Any]:
    """The tensors of a message's content ({} when it carries none), unpacked."""
    if "arrays" not in content:
        return {}
    config = content.config_records.get("config")
    layout = config.get(LAYOUT_KEY) if config is not None else None
    return unpack_arrays(content.array_records["arrays"], layout)


def to_torch(arrays: Mapping[str, Any]) -> dict:
    import torch

    return {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}


def _to_numpy(tensors: Mapping[str, Any]) -> dict:
    return {k: v.detach().cpu().contiguous().numpy() for k, v in tensors.items()}


def adapter_files_from(tensors: Mapping[str, Any], adapter_config: str | bytes) -> dict[str, bytes]:
    """PEFT files from adapter tensors (by PEFT name) and the adapter_config.json text."""
    from safetensors.torch import save

    cfg = adapter_config.encode() if isinstance(adapter_config, str) else adapter_config
    contiguous = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    return {ADAPTER_CONFIG: cfg, ADAPTER_WEIGHTS: save(contiguous)}


# ---- the member's trainer -------------------------------------------------------------------


class NodeTrainer:
    """One member's training and evaluation, with its data and models kept warm.

    ``node_config``: data location (see ``load_node_data``), optional ``model-path`` (where
    this member keeps the base model; else the path in the round config) and
    ``participant`` (a name, mixed into the seed). Not thread-safe: one message at a time.
    """

    def __init__(self, node_config: Mapping[str, Any]):
        self.node_config = dict(node_config)
        self.name = str(node_config.get("participant", ""))
        self._data: tuple[list[dict], list[dict]] | None = None
        self._eval_models: dict[tuple, tuple[Any, Any]] = {}
        self._bases: dict[str, tuple[Any, Any]] = {}  # model path -> (base model, tokenizer)
        self.secagg_clients: dict[str, Any] = {}  # round id -> SecAggClient (this round only)
        self.pending: dict[str, Any] = {}  # round id -> weighted payload awaiting masking

    @property
    def data(self) -> tuple[list[dict], list[dict]]:
        if self._data is None:
            self._data = load_node_data(self.node_config)
        return self._data

    def _model_path(self, config: Mapping[str, Any]) -> str:
        return str(self.node_config.get("model-path") or config["model-path"])

    def base(self, path: str) -> tuple[Any, Any]:
        """(base model, tokenizer) of ``path``, loaded once: train_sft copies the model for
        each round instead of reading the checkpoint again."""
        if path not in self._bases:
            import inference
            from finetune.tokenizer import load_tokenizer

            self._bases[path] = (inference.load_model(path), load_tokenizer(path))
        return self._bases[path]

    def train(self, tensors: dict, config: Mapping[str, Any]) -> tuple[dict, dict]:
        """Train from the global adapter; returns (adapter tensors, metrics).

        ``aggregation`` "ffa": A is frozen (``SFTConfig.freeze``) and only B is sent back.
        ``proximal-mu`` > 0 (FedProx): the loss gets (mu/2) ||w - w_global||^2 over the
        adapter, so the update stays near the round's global adapter.
        """
        from finetune import lora
        from finetune.sft import SFTConfig, train_sft

        train_rows, _ = self.data
        name = str(self.node_config.get("participant", ""))
        seed = int(config["seed"]) * 1000 + int(config["server-round"]) + _stable_hash(name)
        ffa = config.get("aggregation") == "ffa"
        sft_config = SFTConfig(
            model_path=self._model_path(config),
            lora_r=int(config["lora-r"]),
            lora_alpha=int(config["lora-alpha"]),
            targets=tuple(config["targets"]),
            learning_rate=float(config["learning-rate"]),
            lr_schedule=str(config.get("lr-schedule", "cosine")),
            max_steps=int(config["local-steps"]),
            batch_size=int(config["batch-size"]),
            max_seq_len=int(config["max-seq-len"]),
            seed=seed,
            freeze=("lora_A",) if ffa else (),
        )
        mu = float(config.get("proximal-mu", 0.0) or 0.0)
        base_model, tokenizer = self.base(sft_config.model_path)
        start = time.perf_counter()
        result = train_sft(
            sft_config,
            train_examples=[_sft_row(r) for r in train_rows],
            initial_adapter=adapter_files_from(tensors, config["adapter-config"]),
            extra_loss=proximal_term(tensors, mu) if mu > 0 else None,
            base_model=base_model,
            tokenizer=tokenizer,
        )
        seconds = time.perf_counter() - start
        _, trained = lora.read_adapter_files(result.adapter_files)
        metrics = {
            "num-examples": len(train_rows),
            "train_loss": float(result.metrics.get("loss", float("nan"))),
            "trained_tokens": int(result.trained_tokens),
            "train_seconds": seconds,
            "steps": int(result.steps),
            "trainer_pid": os.getpid(),  # the same across rounds: the trainer stays warm
        }
        if mu > 0:
            metrics["proximal_term"] = float(result.metrics.get("extra_loss", float("nan")))
        if ffa:
            # FFA-LoRA: A never left the shared init (frozen), so only B travels and the
            # average of the members' products B_i A is exact. The change of A is reported
            # so the server's log shows that (0.0 exactly when frozen).
            metrics["lora_A_change"] = max(
                (float((trained[k] - tensors[k]).abs().max()) for k in trained if "lora_A" in k),
                default=0.0,
            )
            trained = {k: v for k, v in trained.items() if "lora_A" not in k}
        if config.get("dp-clip") is None and not config.get("secagg"):
            return trained, metrics
        return self._private_update(tensors, trained, config, metrics)

    def _private_update(self, start: dict, trained: dict, config, metrics: dict):
        """DP: clip the update (trained - global) and add this member's share of the noise.
        Secure aggregation: keep the (weighted) update for the masking stages and send
        nothing in clear now. Returns (tensors to send, metrics)."""
        import numpy as np
        import torch

        delta = {k: (trained[k].double() - start[k].double()).numpy() for k in trained}
        if config.get("dp-clip") is not None:
            from federated import privacy

            dp = privacy.DPConfig(
                clip_norm=float(config["dp-clip"]),
                noise_multiplier=float(config["dp-noise"]),
            )
            delta, factor = privacy.clip_and_noise(
                delta, dp, privacy.new_noise_rng(), noise_shares=int(config.get("dp-shares", 1))
            )
            metrics["dp_clip_factor"] = factor
        if not config.get("secagg"):
            return {
                k: torch.from_numpy(start[k].double().numpy() + d).float() for k, d in delta.items()
            }, metrics
        from federated import secagg

        vector, _ = secagg.flatten_params(delta)
        dp_on = config.get("dp-clip") is not None
        self.pending = {str(config["secagg-round"]): (np.asarray(vector), len(self.data[0]), dp_on)}
        return {}, metrics

    def secagg_stage(self, kind: str, arrays: dict, config: Mapping[str, Any]) -> tuple[dict, dict]:
        """One secure-aggregation stage (federated.secagg): (arrays, payload) out."""
        from federated import secagg

        rid = str(config["round-id"])
        if kind == "secagg_advertise":
            fp = secagg.FixedPoint.for_sum(float(config["clip"]), int(config["max-clients"]))
            client = secagg.SecAggClient(int(config["node-id"]), rid, int(config["threshold"]), fp)
            self.secagg_clients = {rid: client}
            return {}, client.advertise_keys()
        client = self.secagg_clients.get(rid)
        if client is None:
            raise secagg.SecAggAborted(f"no secure-aggregation state for round {rid}")
        if kind == "secagg_share":
            roster = {k[2:]: bytes(v) for k, v in config.items() if k.startswith("r/")}
            return {}, client.share_keys(roster)
        if kind == "secagg_masked":
            inbox = {k[2:]: bytes(v) for k, v in config.items() if k.startswith("i/")}
            pending = self.pending.pop(rid, None)
            if pending is None:
                raise secagg.SecAggAborted(f"no trained update for round {rid}")
            vector, n_examples, dp_on = pending
            # Under DP every member counts the same (the accountant's sum of clipped
            # updates); otherwise by examples, scaled into [0, 1] by the largest member's
            # count so w * x stays inside the fixed-point clip.
            weight = 1.0 if dp_on else min(n_examples / float(config["weight-cap"]), 1.0)
            payload = secagg.weighted_payload(vector, weight)
            return {"masked": client.masked_input(payload, inbox)}, {}
        if kind == "secagg_unmask":
            out = client.unmask({"survivors": [int(x) for x in config["survivors"]]})
            self.secagg_clients.pop(rid, None)
            return {}, out
        raise ValueError(f"unknown secure-aggregation stage {kind!r}")

    def evaluate(self, tensors: dict, config: Mapping[str, Any]) -> dict:
        """Loss and token accuracy on the member's validation rows; for rows that carry a
        suite task, the reward of greedy completions (at most ``eval-generations``)."""
        import torch

        from finetune import data as fdata
        from finetune.sft import token_loss

        _, val_rows = self.data
        model, tokenizer = self._eval_model(tensors, config)
        loss_sum, hits, count = 0.0, 0, 0
        max_len = int(config["max-seq-len"])
        with torch.no_grad():
            for row in val_rows:
                messages = _sft_row(row)
                if "messages" not in messages:
                    continue
                ids, labels = fdata.encode_chat(tokenizer, messages["messages"])
                ids, labels = ids[:max_len], labels[:max_len]
                logits = model(torch.tensor([ids]))
                loss, h, c = token_loss(logits, torch.tensor([labels]))
                loss_sum, hits, count = loss_sum + float(loss), hits + int(h), count + c
        metrics = {
            "num-examples": len(val_rows),
            "val_loss": loss_sum / max(count, 1),
            "val_token_accuracy": hits / max(count, 1),
        }
        tasks = [r["task"] for r in val_rows if isinstance(r.get("task"), dict)]
        n_gen = min(len(tasks), int(config.get("eval-generations", 0)))
        if n_gen:
            from finetune.domains import TaskItem, reward

            correct = 0.0
            for task in tasks[:n_gen]:
                item = TaskItem.from_dict(task)
                text = greedy_completion(
                    model, tokenizer, item.prompt, int(config.get("eval-max-new-tokens", 48))
                )
                correct += float(reward(text, item) >= 1.0)
            metrics["accuracy"] = correct / n_gen
            metrics["num-scored"] = n_gen
        return metrics

    def _eval_model(self, tensors: dict, config: Mapping[str, Any]):
        """The base model with this adapter, loaded once per (model, adapter shape)."""
        import copy

        from finetune import lora

        path = self._model_path(config)
        key = (path, config["adapter-config"])
        if key not in self._eval_models:
            files = adapter_files_from(tensors, config["adapter-config"])
            base, tokenizer = self.base(path)
            model = lora.load_adapter(copy.deepcopy(base), files)
            model.eval()
            self._eval_models[key] = (model, tokenizer)
        else:
            from peft import set_peft_model_state_dict

            model = self._eval_models[key][0]
            with lora.without_moe_target_rewrite(model):
                set_peft_model_state_dict(model, tensors, adapter_name=lora.ADAPTER_NAME)
        return self._eval_models[key]

    def handle(self, kind: str, arrays: dict, config: Mapping[str, Any]) -> tuple[dict, dict]:
        """One request: numpy arrays and config in, (numpy arrays, metrics) out."""
        if kind == "train":
            trained, metrics = self.train(to_torch(arrays), config)
            return _to_numpy(trained), metrics
        if kind == "evaluate":
            return {}, self.evaluate(to_torch(arrays), config)
        if kind.startswith("secagg"):
            return self.secagg_stage(kind, arrays, config)
        raise ValueError(f"unknown request {kind!r}")


def proximal_term(global_tensors: Mapping[str, Any], mu: float):
    """FedProx's extra loss for ``train_sft``: model -> (mu/2) ||w - w_global||^2 over the
    trainable LoRA weights, named as in PEFT files (the in-memory ``.default`` dropped)."""
    from federated.aggregation import fedprox_penalty
    from finetune.lora import ADAPTER_NAME

    reference = {k: v.detach().clone() for k, v in global_tensors.items()}

    def term(model):
        params = {
            n.replace(f".{ADAPTER_NAME}.", "."): p
            for n, p in model.named_parameters()
            if p.requires_grad
        }
        return fedprox_penalty(params, reference, mu)

    return term


def greedy_completion(model, tokenizer, prompt: list[dict], max_new_tokens: int) -> str:
    """Greedy decoding without a cache (evaluation at toy scale; the engine serves)."""
    import torch

    from finetune import data as fdata

    ids = fdata.encode_prompt(tokenizer, prompt)
    end = tokenizer.convert_tokens_to_ids("<|end|>")
    stop = {t for t in (end, tokenizer.eos_token_id) if t is not None}
    out: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            logits = model(torch.tensor([ids + out]))
            token = int(logits[0, -1].argmax())
            if token in stop:
                break
            out.append(token)
    return tokenizer.decode(out, skip_special_tokens=True)


def _stable_hash(text: str) -> int:
    # Python's hash() is salted per process; the seed must be the same on every run.
    return sum((i + 1) * b for i, b in enumerate(text.encode())) % 997


class RemoteTrainer:
    """The NodeTrainer of a warm node process (``python -m federated node``), over a local
    socket authenticated by the key in ``authkey_file``. ConnectionError when it is gone."""

    def __init__(self, address: str, authkey_file: str, name: str = ""):
        self.address, self.name = address, name
        self.authkey = Path(authkey_file).read_bytes()

    def handle(self, kind: str, arrays: dict, config: Mapping[str, Any]) -> tuple[dict, dict]:
        with Client(self.address, family="AF_UNIX", authkey=self.authkey) as conn:
            conn.send((kind, arrays, dict(config)))
            status, a, b = conn.recv()
        if status != "ok":
            raise RuntimeError(f"node trainer failed: {a}")
        return a, b


# In-process trainers, one per virtual node, for the simulation runtime: a Ray actor process
# serves many messages, so its trainers (data, warm models) live as long as it does. This is
# the one piece of module state in the package, and it is per process by design.
_LOCAL_TRAINERS: dict[tuple, NodeTrainer] = {}


def trainer_for(context: Context):
    """The trainer that serves this node: the warm node process when the node config names
    one, else an in-process NodeTrainer (simulation: the participant comes from the run
    file by ``partition-id``)."""
    node_config = dict(context.node_config)
    if node_config.get("trainer-address"):
        return RemoteTrainer(
            str(node_config["trainer-address"]),
            str(node_config["trainer-key"]),
            str(node_config.get("participant", "")),
        )
    if "partition-id" in node_config and not node_config.get("data"):
        from federated.config import ParticipantSpec, read_run_file

        run = read_run_file(str(context.run_config["run-file"]))
        spec = ParticipantSpec(**run["participants"][int(node_config["partition-id"])])
        node_config = {**node_config, **spec.node_config()}
    key = (str(context.run_config.get("run-file", "")), json.dumps(node_config, sort_keys=True))
    if key not in _LOCAL_TRAINERS:
        _LOCAL_TRAINERS[key] = NodeTrainer(node_config)
    return _LOCAL_TRAINERS[key]


# ---- the Flower ClientApp -------------------------------------------------------------------

app = ClientApp()


def _unpack(msg: Message) -> tuple[dict, dict]:
    content = msg.content
    tensors = content_arrays(content)
    config = dict(content.config_records["config"]) if "config" in content else {}
    config.pop(LAYOUT_KEY, None)
    return tensors, config


def _reply(msg: Message, tensors: dict, metrics: dict, config: dict | None = None) -> Message:
    record = RecordDict({"metrics": MetricRecord(metrics)})
    config = dict(config or {})
    if tensors:
        record["arrays"], config[LAYOUT_KEY] = pack_arrays(tensors)
    if config:
        record["config"] = ConfigRecord(config)
    return Message(record, reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    tensors, config = _unpack(msg)
    trainer = trainer_for(context)
    out, metrics = trainer.handle("train", tensors, config)
    return _reply(msg, out, metrics, {"participant": trainer.name})


def _secagg(stage: str):
    def handler(msg: Message, context: Context) -> Message:
        tensors, config = _unpack(msg)
        config["node-id"] = context.node_id
        arrays, payload = trainer_for(context).handle(stage, tensors, config)
        return _reply(msg, arrays, {}, payload)

    handler.__name__ = stage
    return handler


# Secure aggregation: four query messages per round (see federated.server_app).
for _stage in ("secagg_advertise", "secagg_share", "secagg_masked", "secagg_unmask"):
    app.query(_stage)(_secagg(_stage))


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    tensors, config = _unpack(msg)
    trainer = trainer_for(context)
    _, metrics = trainer.handle("evaluate", tensors, config)
    return _reply(msg, {}, metrics, {"participant": trainer.name})
