"""Hand-written bad inputs (issue 9): each gets a clear 4xx in the OpenAI envelope, with a
message naming the problem, and loses nothing already stored.

Covered elsewhere and not repeated: a binary upload (test_files_api), and the parameter of
each bad chat field (test_chat_api). Here: a 10 MB line, invalid UTF-8 (upload and request
body), a line over the per-line limit, a prompt over the context length, absurd sampling
parameters, a negative max_tokens and 10,000 messages, each followed by a check that the
tenant's stored file is still listed and byte-identical.
"""

import io

import httpx
import pytest

from controlplane.files.models import File
from tests.controlplane.test_files_api import _chat_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

HELLO = [{"role": "user", "content": "hello"}]


@pytest.fixture
def tenant_with_a_file(live_server_url, make_tenant, base_model):
    """A tenant with one stored fine-tune file; returns (url, auth headers, file id)."""
    _tenant, key = make_tenant("careful-bank")
    auth = {"Authorization": f"Bearer {key}"}
    kept = httpx.post(
        f"{live_server_url}/v1/files", headers=auth, data={"purpose": "fine-tune"},
        files={"file": ("kept.jsonl", io.BytesIO(_chat_jsonl()))}, timeout=30,
    )  # fmt: skip
    assert kept.status_code == 200, kept.text
    return live_server_url, auth, kept.json()["id"]


def _assert_clear_error(response: httpx.Response, status: int, *fragments: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    for fragment in fragments:
        assert fragment in error["message"], (fragment, error["message"])
    return error


def _assert_nothing_lost(url: str, auth: dict, file_id: str) -> None:
    listed = httpx.get(f"{url}/v1/files", headers=auth, timeout=30).json()["data"]
    assert [f["id"] for f in listed] == [file_id]
    content = httpx.get(f"{url}/v1/files/{file_id}/content", headers=auth, timeout=30)
    assert content.status_code == 200 and content.content == _chat_jsonl()


def _upload(url: str, auth: dict, data: bytes) -> httpx.Response:
    return httpx.post(
        f"{url}/v1/files", headers=auth, data={"purpose": "fine-tune"},
        files={"file": ("bad.jsonl", io.BytesIO(data))}, timeout=60,
    )  # fmt: skip


def test_a_10_mb_line_is_refused_and_nothing_is_lost(tenant_with_a_file):
    url, auth, kept = tenant_with_a_file
    line = b'{"messages": [{"role": "user", "content": "' + b"a" * (10 * 1024 * 1024) + b'"}]}\n'

    error = _assert_clear_error(_upload(url, auth, line), 413, "limit")

    assert error["param"] == "file" and error["code"] == "file_too_large"
    _assert_nothing_lost(url, auth, kept)


def test_invalid_utf8_upload_is_refused_with_its_line_and_nothing_is_lost(tenant_with_a_file):
    url, auth, kept = tenant_with_a_file
    data = _chat_jsonl(2) + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n'

    error = _assert_clear_error(_upload(url, auth, data), 400, "not valid UTF-8", "line 3")

    assert error["param"] == "file"
    assert File.objects.count() == 1
    _assert_nothing_lost(url, auth, kept)


def test_invalid_utf8_request_body_is_refused_and_nothing_is_lost(tenant_with_a_file):
    url, auth, kept = tenant_with_a_file
    body = b'{"model": "enclave-test", "messages": [{"role": "user", "content": "\xff\xfe"}]}'
    response = httpx.post(
        f"{url}/v1/chat/completions", content=body, timeout=30,
        headers={**auth, "Content-Type": "application/json"},
    )  # fmt: skip

    error = _assert_clear_error(response, 400, "not valid UTF-8")

    assert error["code"] == "invalid_json"
    _assert_nothing_lost(url, auth, kept)


def test_a_line_over_the_line_limit_is_refused_before_anything_is_stored(make_tenant, settings):
    """In process, with an upload limit above the 1 MiB line limit (the test server's upload
    limit is 1 MiB, so over HTTP the 413 above answers first)."""
    from django.core.exceptions import ValidationError

    from controlplane.files import services
    from finetune.data import DEFAULT_MAX_LINE_BYTES

    settings.ENCLAVE_FILE_MAX_BYTES = 4 * DEFAULT_MAX_LINE_BYTES
    tenant, _key = make_tenant("line-bank")
    kept = services.file_create(
        tenant=tenant, filename="kept.jsonl", purpose="fine-tune", chunks=[_chat_jsonl()],
        size=len(_chat_jsonl()),
    )  # fmt: skip
    data = _chat_jsonl(1) + b'{"messages": "' + b"a" * (2 * DEFAULT_MAX_LINE_BYTES) + b'"}\n'

    with pytest.raises(ValidationError) as raised:
        services.file_create(
            tenant=tenant, filename="long.jsonl", purpose="fine-tune", chunks=[data],
            size=len(data),
        )  # fmt: skip

    message = raised.value.message_dict["file"][0]
    assert "line 2" in message and f"at most {DEFAULT_MAX_LINE_BYTES} bytes" in message
    assert list(File.objects.values_list("id", flat=True)) == [kept.id]


@pytest.mark.parametrize(
    ("overrides", "param", "fragments"),
    [
        ({"messages": [{"role": "user", "content": "word " * 3000}]}, "messages", ("context",)),
        ({"temperature": 1e300}, "temperature", ("temperature", "between")),
        ({"top_p": 7.5}, "top_p", ("top_p", "between")),
        ({"presence_penalty": -1e9}, "presence_penalty", ("presence_penalty", "between")),
        ({"top_logprobs": 10**12}, "top_logprobs", ("top_logprobs",)),
        ({"seed": "tomorrow"}, "seed", ("seed", "integer")),
        ({"max_tokens": -5}, "max_tokens", ("max_tokens", "positive")),
        ({"messages": HELLO * 10_000}, "messages", ("too many messages", "10000")),
    ],
    ids=["over-context", "temperature-1e300", "top-p-7.5",
         "presence-penalty-minus-1e9", "top-logprobs-huge", "seed-string", "negative-max-tokens",
         "10000-messages"],
)  # fmt: skip
def test_bad_chat_requests_name_the_problem_and_lose_nothing(
    tenant_with_a_file, base_model, overrides, param, fragments
):
    url, auth, kept = tenant_with_a_file
    body = {"model": base_model, "messages": HELLO, "max_tokens": 2, **overrides}
    response = httpx.post(f"{url}/v1/chat/completions", headers=auth, json=body, timeout=120)

    error = _assert_clear_error(response, 400, *fragments)

    assert error["param"] == param
    assert "x-request-id" in response.headers
    _assert_nothing_lost(url, auth, kept)


def test_a_10_mb_message_is_refused_and_nothing_is_lost(tenant_with_a_file, base_model):
    """Over the request-size limit: was Django's bare HTML 400, now the envelope."""
    url, auth, kept = tenant_with_a_file
    body = {"model": base_model, "messages": [{"role": "user", "content": "a" * 10_000_000}]}
    response = httpx.post(f"{url}/v1/chat/completions", headers=auth, json=body, timeout=120)

    error = _assert_clear_error(response, 413, "over the limit")

    assert error["code"] == "request_too_large"
    _assert_nothing_lost(url, auth, kept)


def test_a_tiny_but_valid_temperature_is_answered(tenant_with_a_file, base_model):
    """1e-300 is inside [0, 2]: a completion, not a 500 (the sampler divided by it in
    float32, where it is 0; schemathesis found this)."""
    url, auth, kept = tenant_with_a_file
    body = {"model": base_model, "messages": HELLO, "max_tokens": 3, "temperature": 1e-300}
    response = httpx.post(f"{url}/v1/chat/completions", headers=auth, json=body, timeout=120)

    assert response.status_code == 200, response.text
    assert response.json()["choices"][0]["finish_reason"] in ("stop", "length")
    _assert_nothing_lost(url, auth, kept)


def test_deleting_a_file_a_job_uses_is_a_409_and_loses_nothing(tenant_with_a_file, base_model):
    """Was a 500 (ProtectedError) with the blob's shredding rolled back; schemathesis found it."""
    from controlplane.tuning import services as tuning_services
    from controlplane.tuning.models import FineTuningJob

    url, auth, kept = tenant_with_a_file
    file = File.objects.get(pk=kept)
    tuning_services.fine_tuning_job_create(tenant=file.tenant, model=base_model, training_file=kept)

    response = httpx.delete(f"{url}/v1/files/{kept}", headers=auth, timeout=30)

    error = _assert_clear_error(response, 409, kept, "fine-tuning job")
    assert error["code"] == "file_in_use"
    assert FineTuningJob.objects.get().training_file_id == kept
    _assert_nothing_lost(url, auth, kept)
