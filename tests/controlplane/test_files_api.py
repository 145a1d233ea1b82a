"""/v1/files through the real `openai` client against a live uvicorn process."""

import io
import json

import httpx
import openai
import pytest
from django.conf import settings

from controlplane.audit.models import AuditEvent
from controlplane.files.models import File

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

MARKER = "patient Zebulon Quxworth, MRN 99-ZQ-4242"


def _chat_jsonl(n: int = 3) -> bytes:
    rows = [
        {
            "messages": [
                {"role": "user", "content": f"Question {i} about {MARKER}?"},
                {"role": "assistant", "content": f"Answer {i}."},
            ]
        }
        for i in range(n)
    ]
    return ("\n".join(json.dumps(r) for r in rows) + "\n").encode()


def _client(url: str, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key=key, max_retries=0, timeout=30)


def test_upload_list_retrieve_content_delete(live_server_url, make_tenant):
    _tenant, key = make_tenant("hospital", role="member")
    client = _client(live_server_url, key)
    data = _chat_jsonl()

    created = client.files.create(file=("train.jsonl", io.BytesIO(data)), purpose="fine-tune")
    assert created.object == "file" and created.id.startswith("file-")
    assert (created.bytes, created.filename, created.purpose) == (
        len(data),
        "train.jsonl",
        "fine-tune",
    )
    assert created.status == "processed" and created.status_details is None

    assert [f.id for f in client.files.list().data] == [created.id]
    assert client.files.retrieve(created.id).bytes == len(data)
    assert client.files.content(created.id).read() == data

    # No plaintext reaches the disk: the marker is nowhere under the data directory.
    needle = MARKER.encode()
    for path in settings.VAR_DIR.rglob("*"):
        if path.is_file():
            assert needle not in path.read_bytes(), path

    deleted = client.files.delete(created.id)
    assert (deleted.id, deleted.deleted) == (created.id, True)
    with pytest.raises(openai.NotFoundError) as raised:
        client.files.retrieve(created.id)
    assert raised.value.body["code"] == "not_found"
    assert File.objects.count() == 0


def test_invalid_lines_are_reported_with_line_numbers(live_server_url, make_tenant):
    _tenant, key = make_tenant("bank")
    client = _client(live_server_url, key)
    bad = _chat_jsonl(1) + b'{"messages": [{"role": "wizard", "content": "hi"}]}\n{not json\n'

    created = client.files.create(file=("bad.jsonl", io.BytesIO(bad)), purpose="fine-tune")

    assert created.status == "error"
    assert "line 2" in created.status_details and "line 3" in created.status_details
    # The file is kept (so its owner can see why), and its content is intact.
    assert client.files.content(created.id).read() == bad


@pytest.mark.parametrize(
    ("payload", "purpose", "status", "fragment"),
    [
        (b"\x00\x01\x02binary\xff" * 10, "fine-tune", 400, "binary"),
        (b"x" * (1024 * 1024 + 10), "fine-tune", 413, "limit"),
        (b'{"a": 1}\n', "training", 400, "purpose"),
    ],
    ids=["binary", "too-large", "bad-purpose"],
)
def test_bad_uploads_get_a_clear_4xx_and_lose_nothing(
    live_server_url, make_tenant, payload, purpose, status, fragment
):
    _tenant, key = make_tenant("bank")
    client = _client(live_server_url, key)
    kept = client.files.create(file=("ok.jsonl", io.BytesIO(_chat_jsonl())), purpose="fine-tune")

    with pytest.raises(openai.APIStatusError) as raised:
        client.files.create(file=("x.jsonl", io.BytesIO(payload)), purpose=purpose)

    assert raised.value.status_code == status
    error = raised.value.body
    assert set(error) == {"message", "type", "param", "code"}
    assert fragment in error["message"]
    assert [f.id for f in client.files.list().data] == [kept.id]
    assert client.files.content(kept.id).read() == _chat_jsonl()


def test_another_tenants_file_is_not_found(live_server_url, make_tenant):
    _a, key_a = make_tenant("bank-a")
    _b, key_b = make_tenant("bank-b")
    mine = _client(live_server_url, key_a).files.create(
        file=("a.jsonl", io.BytesIO(_chat_jsonl())), purpose="fine-tune"
    )
    other = _client(live_server_url, key_b)

    for call in (
        lambda: other.files.retrieve(mine.id),
        lambda: other.files.content(mine.id),
        lambda: other.files.delete(mine.id),
    ):
        with pytest.raises(openai.NotFoundError):
            call()
    assert other.files.list().data == []
    assert File.objects.filter(pk=mine.id).exists()


def test_roles_keys_and_envelopes(live_server_url, make_tenant):
    tenant, auditor_key = make_tenant("clinic", role="auditor")
    auditor = _client(live_server_url, auditor_key)
    assert auditor.files.list().data == []
    with pytest.raises(openai.PermissionDeniedError) as raised:
        auditor.files.create(file=("a.jsonl", io.BytesIO(_chat_jsonl())), purpose="fine-tune")
    assert raised.value.body["type"] == "permission_error"

    with pytest.raises(openai.AuthenticationError) as raised:
        _client(live_server_url, "enc_00000000_wrong").files.list()
    assert raised.value.body["code"] == "invalid_api_key"

    response = httpx.get(f"{live_server_url}/v1/files")
    assert response.status_code == 401 and "error" in response.json()
    response = httpx.get(f"{live_server_url}/v1/no-such-thing", headers={"X-Request-Id": "abc-1"})
    assert response.status_code == 404
    assert response.json()["error"]["code"] == "unknown_url"
    assert response.headers["x-request-id"] == "abc-1"


def test_mutations_are_audited_with_request_ids(live_server_url, make_tenant):
    tenant, key = make_tenant("bank")
    client = _client(live_server_url, key)
    raw = client.files.with_raw_response.create(
        file=("a.jsonl", io.BytesIO(_chat_jsonl())), purpose="fine-tune"
    )
    created = raw.parse()
    client.files.delete(created.id)

    events = list(AuditEvent.objects.filter(tenant=tenant).order_by("id"))
    assert [(e.action, e.object_id, e.status_code) for e in events] == [
        ("POST v1/files", created.id, 200),
        ("DELETE v1/files/<str:file_id>", created.id, 200),
    ]
    assert events[0].request_id == raw.headers["x-request-id"]
    assert events[0].actor.startswith("key:enc_")


def test_openapi_schema_describes_the_files_api(live_server_url):
    schema = httpx.get(f"{live_server_url}/api/schema/?format=json").json()
    assert "/v1/files" in schema["paths"]
    assert "post" in schema["paths"]["/v1/files"]
    assert httpx.get(f"{live_server_url}/api/docs/").status_code == 200


def test_request_rate_quota_answers_429_with_retry_after(live_server_url, make_tenant):
    tenant, key = make_tenant("busy-bank")
    tenant.requests_per_minute = 2
    tenant.save(update_fields=["requests_per_minute"])
    client = _client(live_server_url, key)
    client.files.list()
    client.files.list()
    with pytest.raises(openai.RateLimitError) as raised:
        client.files.list()
    assert raised.value.body["type"] == "rate_limit_error"
    assert 1 <= int(raised.value.response.headers["retry-after"]) <= 60


def test_storage_quota_answers_403_and_keeps_what_is_stored(live_server_url, make_tenant):
    tenant, key = make_tenant("small-clinic")
    tenant.storage_bytes = len(_chat_jsonl()) + 10
    tenant.save(update_fields=["storage_bytes"])
    client = _client(live_server_url, key)
    kept = client.files.create(file=("a.jsonl", io.BytesIO(_chat_jsonl())), purpose="fine-tune")

    with pytest.raises(openai.PermissionDeniedError) as raised:
        client.files.create(file=("b.jsonl", io.BytesIO(_chat_jsonl())), purpose="fine-tune")

    assert raised.value.body["type"] == "insufficient_quota"
    assert [f.id for f in client.files.list().data] == [kept.id]
