"""/v1/chat/completions and /v1/models through the real `openai` client, against a live
uvicorn process hosting the engine on a tiny random model."""

import json

import httpx
import openai
import pytest

from controlplane.tenancy.models import DailyUsage
from controlplane.tuning import services as tuning_services
from controlplane.tuning.models import Adapter
from controlplane.vault import services as vault_services
from tests.controlplane.test_files_api import _client

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

HELLO = [{"role": "user", "content": "hello world"}]


def _add_adapter(tenant, base_model: str, tmp_path, seed: int = 1) -> str:
    """An encrypted adapter for `tenant`, as a finished fine-tune would leave it."""
    from django.conf import settings

    from tests.inference.test_lora_serving import make_adapter

    directory, _ = make_adapter(
        settings.ENCLAVE_MODELS_DIR / base_model, tmp_path / f"adapter{seed}", ("mla",), seed
    )
    files = {p.name: p.read_bytes() for p in directory.iterdir()}
    blob = vault_services.blob_put(
        tenant=tenant, kind="adapter", source=[tuning_services.adapter_pack(files)]
    )
    model_id = f"ft:{base_model}:{tenant.slug}:test:ftjob-{seed}"
    Adapter.objects.create(id=model_id, tenant=tenant, base_model=base_model, blob=blob)
    return model_id


def test_chat_non_streaming_and_streaming_agree(live_server_url, make_tenant, base_model):
    tenant, key = make_tenant("bank", role="member")
    client = _client(live_server_url, key)

    plain = client.chat.completions.create(
        model=base_model, messages=HELLO, max_tokens=8, temperature=0
    )
    text = plain.choices[0].message.content
    assert plain.object == "chat.completion" and plain.model == base_model
    assert plain.choices[0].finish_reason in ("stop", "length")
    assert plain.usage.prompt_tokens > 0 and 0 < plain.usage.completion_tokens <= 8
    assert plain.usage.total_tokens == plain.usage.prompt_tokens + plain.usage.completion_tokens

    chunks = list(
        client.chat.completions.create(
            model=base_model, messages=HELLO, max_tokens=8, temperature=0, stream=True,
            stream_options={"include_usage": True},
        )
    )  # fmt: skip
    assert chunks[0].choices[0].delta.role == "assistant"
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert streamed == text
    finish = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finish == [plain.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == (
        plain.usage.completion_tokens
    )

    usage = DailyUsage.objects.get(tenant=tenant)
    assert usage.requests == 2
    assert usage.prompt_tokens == 2 * plain.usage.prompt_tokens
    assert usage.completion_tokens == 2 * plain.usage.completion_tokens


def test_sse_wire_format_ends_with_done(live_server_url, make_tenant, base_model):
    _tenant, key = make_tenant("bank")
    with httpx.stream(
        "POST",
        f"{live_server_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json={"model": base_model, "messages": HELLO, "max_tokens": 3, "stream": True},
        timeout=60,
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[0][6:])["object"] == "chat.completion.chunk"


def test_seeded_sampling_is_reproducible(live_server_url, make_tenant, base_model):
    _tenant, key = make_tenant("bank")
    client = _client(live_server_url, key)
    runs = [
        client.chat.completions.create(
            model=base_model, messages=HELLO, max_tokens=10, temperature=1.0, seed=7
        )
        .choices[0]
        .message.content
        for _ in range(2)
    ]
    assert runs[0] == runs[1]


def test_a_tenant_chats_with_its_adapter_and_nobody_else_can(
    live_server_url, make_tenant, base_model, tmp_path
):
    owner, key = make_tenant("hospital")
    _other, other_key = make_tenant("other-hospital")
    model_id = _add_adapter(owner, base_model, tmp_path)
    client = _client(live_server_url, key)

    tuned = client.chat.completions.create(
        model=model_id, messages=HELLO, max_tokens=6, temperature=0
    )
    base = client.chat.completions.create(
        model=base_model, messages=HELLO, max_tokens=6, temperature=0
    )
    assert tuned.model == model_id
    assert tuned.choices[0].message.content != base.choices[0].message.content  # random LoRA

    assert model_id in {m.id for m in client.models.list().data}
    assert base_model in {m.id for m in client.models.list().data}
    other = _client(live_server_url, other_key)
    assert model_id not in {m.id for m in other.models.list().data}
    with pytest.raises(openai.NotFoundError) as raised:
        other.chat.completions.create(model=model_id, messages=HELLO, max_tokens=2)
    assert raised.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        other.models.delete(model_id)

    assert client.models.delete(model_id).deleted is True
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=2)
    assert not Adapter.objects.filter(pk=model_id).exists()


@pytest.mark.parametrize(
    ("overrides", "status", "param"),
    [
        ({"model": "no-such-model"}, 404, "model"),
        ({"max_tokens": -1}, 400, "max_tokens"),
        ({"temperature": 50}, 400, "temperature"),
        ({"top_p": 0}, 400, "top_p"),
        ({"n": 2}, 400, "n"),
        ({"messages": []}, 400, "messages"),
        ({"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
        ({"messages": [{"role": "user", "content": "x"}] * 10_000}, 400, "messages"),
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, 400, "messages"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    ],
    ids=["unknown-model", "negative-max-tokens", "absurd-temperature", "zero-top-p", "n-2",
         "no-messages", "bad-role", "10000-messages", "over-context", "five-stops"],
)  # fmt: skip
def test_bad_chat_requests_get_a_clear_4xx(
    live_server_url, make_tenant, base_model, overrides, status, param
):
    _tenant, key = make_tenant("bank")
    body = {"model": base_model, "messages": HELLO, "max_tokens": 4, **overrides}
    response = httpx.post(
        f"{live_server_url}/v1/chat/completions",
        headers={"Authorization": f"Bearer {key}"},
        json=body,
        timeout=60,
    )
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["message"]
    assert "x-request-id" in response.headers


def test_chat_auth_roles_and_bad_json(live_server_url, make_tenant, base_model):
    _t, auditor = make_tenant("audit-co", role="auditor")
    url = f"{live_server_url}/v1/chat/completions"
    body = {"model": base_model, "messages": HELLO, "max_tokens": 2}

    assert httpx.post(url, json=body).status_code == 401
    assert httpx.post(url, json=body, headers={"Authorization": "Bearer nope"}).status_code == 401
    denied = httpx.post(url, json=body, headers={"Authorization": f"Bearer {auditor}"})
    assert denied.status_code == 403 and denied.json()["error"]["type"] == "permission_error"
    _t2, member = make_tenant("member-co", role="member")
    garbage = httpx.post(url, content=b"{not json", headers={"Authorization": f"Bearer {member}"})
    assert garbage.status_code == 400 and garbage.json()["error"]["code"] == "invalid_json"


def test_usage_endpoint_reports_todays_tokens(live_server_url, make_tenant, base_model):
    _tenant, key = make_tenant("bank")
    client = _client(live_server_url, key)
    done = client.chat.completions.create(model=base_model, messages=HELLO, max_tokens=3)
    usage = httpx.get(
        f"{live_server_url}/v1/usage", headers={"Authorization": f"Bearer {key}"}
    ).json()
    assert usage["tenant"] == "bank" and usage["quotas"]["requests_per_minute"] > 0
    assert usage["data"][0]["prompt_tokens"] == done.usage.prompt_tokens
    assert usage["data"][0]["completion_tokens"] == done.usage.completion_tokens
    bad = httpx.get(
        f"{live_server_url}/v1/usage?days=0", headers={"Authorization": f"Bearer {key}"}
    )
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "days"
