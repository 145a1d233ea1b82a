"""An adapter on the wire: packed into one flat Array per dtype with its layout, through
Flower's records and their protobuf form, and back; Flower's FedAvg over packed replies
equals the per-tensor weighted mean; malformed layouts are refused by name."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common import serde
from flwr.serverapp.strategy import FedAvg

from federated.client_app import LAYOUT_KEY, content_arrays, pack_arrays, unpack_arrays
from tests.federated.test_apps import _task_identity

__all__ = ["_task_identity"]  # the autouse fixture (a Message needs a run identity)


def _adapter(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "base_model.model.layers.0.q_proj.lora_A.weight": torch.randn(4, 32, generator=g),
        "base_model.model.layers.0.q_proj.lora_B.weight": torch.randn(48, 4, generator=g),
        "base_model.model.layers.1.o_proj.lora_A.weight": torch.randn(4, 16, generator=g),
        "base_model.model.layers.1.o_proj.lora_B.weight": torch.randn(32, 4, generator=g),
    }


def _through_protobuf(content: RecordDict) -> RecordDict:
    return serde.recorddict_from_proto(serde.recorddict_to_proto(content))


def test_packed_adapter_is_one_array_and_round_trips_exactly_through_flower_records():
    tensors = _adapter(0) | {"counts": np.arange(5, dtype=np.int64)}
    record, layout = pack_arrays(tensors)
    assert sorted(record) == ["flat-<f4", "flat-<i8"]  # one Array per dtype, not per tensor
    content = _through_protobuf(
        RecordDict({"arrays": record, "config": ConfigRecord({LAYOUT_KEY: layout})})
    )
    back = content_arrays(content)
    assert list(back) == sorted(tensors)  # name order: the same layout from every member
    for name, value in tensors.items():
        expected = value.numpy() if hasattr(value, "numpy") else value
        assert back[name].dtype == expected.dtype and back[name].shape == expected.shape
        np.testing.assert_array_equal(back[name], expected)
    assert content_arrays(RecordDict({"config": ConfigRecord({"x": 1})})) == {}


def test_flower_fedavg_over_packed_replies_is_the_per_tensor_weighted_mean():
    adapters = [_adapter(i) for i in range(3)]
    weights = [10, 30, 20]
    replies = []
    for adapter, n in zip(adapters, weights, strict=True):
        record, layout = pack_arrays(adapter)
        content = RecordDict(
            {
                "arrays": record,
                "metrics": MetricRecord({"num-examples": n}),
                "config": ConfigRecord({LAYOUT_KEY: layout}),
            }
        )
        reply = Message(content, dst_node_id=1, message_type="train")
        replies.append(reply)
    aggregated, _ = FedAvg().aggregate_train(1, replies)
    got = unpack_arrays(aggregated, layout)
    total = sum(weights)
    for name in adapters[0]:
        expected = sum(a[name].double() * n for a, n in zip(adapters, weights, strict=True))
        np.testing.assert_allclose(got[name], (expected / total).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        ("not json", "bad array-layout"),
        (json.dumps([["a", "<f4", [3, 4]]]), "holds 20 values, the layout 12"),
        (json.dumps([["a", "<f4", [5, 5]]]), "too short for 'a'"),
        (json.dumps([["a", "<i8", [20]]]), "no flat-<i8 array"),
    ],
)
def test_a_layout_that_disagrees_with_the_arrays_is_refused_by_name(layout, message):
    record, _ = pack_arrays({"a": np.zeros((4, 5), dtype=np.float32)})
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        unpack_arrays(record, layout)
