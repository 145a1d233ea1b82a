"""/v1/batches end to end with the openai client, a live server and a real worker."""

import io
import json
import time

import openai
import pytest

from controlplane.serving.models import Batch
from tests.controlplane.test_files_api import _client

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def _batch_file(base_model: str, n: int, bad: bool = True) -> bytes:
    lines = [
        {"custom_id": f"req-{i}", "method": "POST", "url": "/v1/chat/completions",
         "body": {"model": base_model, "max_tokens": 3, "temperature": 0,
                  "messages": [{"role": "user", "content": f"hello {i}"}]}}
        for i in range(n)
    ]  # fmt: skip
    if bad:
        lines.append(
            {
                "custom_id": "bad-model",
                "url": "/v1/chat/completions",
                "body": {"model": "nope", "messages": [{"role": "user", "content": "x"}]},
            }
        )
        lines.append(
            {
                "custom_id": "bad-role",
                "url": "/v1/chat/completions",
                "body": {"model": base_model, "messages": [{"role": "x", "content": "x"}]},
            }
        )
    return "\n".join(json.dumps(x) for x in lines).encode() + b"\n"


def test_batch_runs_on_the_engine_and_writes_output_and_error_files(
    live_server_url, make_tenant, base_model, celery_worker
):
    _tenant, key = make_tenant("bank")
    client = _client(live_server_url, key)
    data = _batch_file(base_model, n=20)  # two chunks of work
    input_file = client.files.create(file=("in.jsonl", io.BytesIO(data)), purpose="batch")

    batch = client.batches.create(
        input_file_id=input_file.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    assert batch.object == "batch" and batch.status == "validating"
    deadline = time.monotonic() + 180
    while (batch := client.batches.retrieve(batch.id)).status not in ("completed", "failed"):
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.5)

    assert batch.status == "completed", batch.errors
    assert (batch.request_counts.total, batch.request_counts.completed,
            batch.request_counts.failed) == (22, 20, 2)  # fmt: skip
    out = [json.loads(x) for x in client.files.content(batch.output_file_id).read().splitlines()]
    assert sorted(o["custom_id"] for o in out) == sorted(f"req-{i}" for i in range(20))
    body = out[0]["response"]["body"]
    assert body["object"] == "chat.completion" and body["usage"]["completion_tokens"] > 0
    errors = [json.loads(x) for x in client.files.content(batch.error_file_id).read().splitlines()]
    assert {e["custom_id"]: e["error"]["code"] for e in errors} == {
        "bad-model": "model_not_found",
        "bad-role": "invalid_value",
    }
    assert client.files.retrieve(batch.output_file_id).purpose == "batch_output"
    assert [b.id for b in client.batches.list().data] == [batch.id]


def test_bad_batches_are_refused(live_server_url, make_tenant, base_model):
    _a, key = make_tenant("bank")
    _b, other_key = make_tenant("other")
    client = _client(live_server_url, key)
    good = client.files.create(
        file=("in.jsonl", io.BytesIO(_batch_file(base_model, 1))), purpose="batch"
    )
    tune = client.files.create(
        file=("t.jsonl", io.BytesIO(b'{"messages": [{"role": "user", "content": "q"}, '
                                    b'{"role": "assistant", "content": "a"}]}\n')),
        purpose="fine-tune",
    )  # fmt: skip
    cases = [
        ({"input_file_id": good.id, "endpoint": "/v1/embeddings"}, "endpoint"),
        ({"input_file_id": tune.id, "endpoint": "/v1/chat/completions"}, "input_file_id"),
        ({"input_file_id": "file-nope", "endpoint": "/v1/chat/completions"}, "input_file_id"),
    ]
    for body, param in cases:
        with pytest.raises(openai.BadRequestError) as raised:
            client.batches.create(completion_window="24h", **body)
        assert raised.value.body["param"] == param
    with pytest.raises(openai.BadRequestError):
        _client(live_server_url, other_key).batches.create(
            input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    assert Batch.objects.count() == 0

    queued = client.batches.create(
        input_file_id=good.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    with pytest.raises(openai.NotFoundError):
        _client(live_server_url, other_key).batches.retrieve(queued.id)
    assert client.batches.cancel(queued.id).status == "cancelled"
