"""Every secure-aggregation message survives Flower's records and their protobuf form."""

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict
from flwr.common import serde

from federated.secagg import (
    FixedPoint,
    SecAggClient,
    SecAggServer,
    flatten_params,
    unflatten_params,
    weighted_mean,
    weighted_payload,
)


def _wire(config=None, arrays=None):
    # What a Message carries: a RecordDict, serialised to protobuf and back.
    records = {}
    if config is not None:
        records["secagg"] = ConfigRecord(config)
    if arrays is not None:
        records["masked"] = ArrayRecord([arrays])
    back = serde.recorddict_from_proto(serde.recorddict_to_proto(RecordDict(records)))
    if arrays is not None:
        return back["masked"].to_numpy_ndarrays()[0]
    return dict(back["secagg"])


def test_weighted_adapter_average_through_flower_records():
    rng = np.random.default_rng(0)
    node_ids = [2**63 + 11, 5, 987654321]  # Flower node ids are uint64
    adapters = {
        c: {
            "q.lora_A.weight": torch.randn(2, 3, generator=torch.Generator().manual_seed(i)),
            "q.lora_B.weight": torch.from_numpy(rng.normal(0, 0.1, (4, 2))).float(),
        }
        for i, c in enumerate(node_ids)
    }
    weights = {node_ids[0]: 0.2, node_ids[1]: 1.0, node_ids[2]: 0.6}
    vectors = {}
    for c in node_ids:
        flat, layout = flatten_params(adapters[c])
        vectors[c] = weighted_payload(flat / 4, weights[c])  # scaled into the clip range
    fp = FixedPoint.for_sum(1.0, len(node_ids))
    round_id = "federation-7/run-3/round-2"
    server = SecAggServer(round_id, 2, len(vectors[node_ids[0]]), fp)
    clients = {c: SecAggClient(c, round_id, 2, fp) for c in node_ids}

    for c in node_ids:
        server.receive_advertisement(c, _wire(clients[c].advertise_keys()))
    roster = _wire(server.close_advertise())
    for c in node_ids:
        server.receive_shares(c, _wire(clients[c].share_keys(roster)))
    inboxes = server.close_share_keys()
    for c in node_ids:
        masked = clients[c].masked_input(vectors[c], _wire(inboxes[c]))
        server.receive_masked_input(c, _wire(arrays=masked))
    request = _wire(server.close_masked_input())
    for c in request["survivors"]:
        server.receive_unmask(c, _wire(clients[c].unmask(request)))
    mean = unflatten_params(weighted_mean(server.finalize()) * 4, layout)

    assert not server.rejected
    total_w = sum(weights.values())
    for name in mean:
        expected = sum(weights[c] * adapters[c][name].double().numpy() for c in node_ids) / total_w
        assert mean[name].shape == expected.shape
        assert np.max(np.abs(mean[name] - expected)) < 1e-6
