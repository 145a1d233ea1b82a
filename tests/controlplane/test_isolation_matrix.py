"""The tenant-isolation matrix: every /v1 URL pattern, every object type.

Tenant A owns one of everything. Tenant B, with an admin key, tries every read and write
on A's ids, in URLs and inside request bodies, and must get exactly what it gets for an
id that does not exist (404, or the same 400 for an id in a body). Afterwards A's objects
are all still there. A meta-test fails when a URL pattern is added without a row here.
"""

import io
from pathlib import Path

import httpx
import pytest
from django.urls import URLPattern, URLResolver, get_resolver

from controlplane.federation.models import Federation
from controlplane.files.models import File
from controlplane.serving.models import Batch
from controlplane.tuning.models import Adapter, FineTuningJob
from tests.controlplane.test_files_api import _chat_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

MISSING = {"file": "file-000000000000000000000000", "job": "ftjob-000000000000000000000000",
           "model": "ft:enclave-test:nobody:x:ftjob-0", "batch": "batch_000000000000000000000000",
           "federation": "fed-0000000000000000", "round": "fedround-0000000000000000"}  # fmt: skip

# (method, route pattern, path template, body template or None)
MATRIX = [
    ("GET", "v1/files/<str:file_id>", "/v1/files/{file}", None),
    ("DELETE", "v1/files/<str:file_id>", "/v1/files/{file}", None),
    ("GET", "v1/files/<str:file_id>/content", "/v1/files/{file}/content", None),
    ("GET", "v1/fine_tuning/jobs/<str:job_id>", "/v1/fine_tuning/jobs/{job}", None),
    ("POST", "v1/fine_tuning/jobs/<str:job_id>/cancel", "/v1/fine_tuning/jobs/{job}/cancel", None),
    ("POST", "v1/fine_tuning/jobs/<str:job_id>/pause", "/v1/fine_tuning/jobs/{job}/pause", None),
    ("POST", "v1/fine_tuning/jobs/<str:job_id>/resume", "/v1/fine_tuning/jobs/{job}/resume", None),
    ("GET", "v1/fine_tuning/jobs/<str:job_id>/events", "/v1/fine_tuning/jobs/{job}/events", None),
    ("GET", "v1/fine_tuning/jobs/<str:job_id>/checkpoints",
     "/v1/fine_tuning/jobs/{job}/checkpoints", None),
    ("GET", "v1/models/<path:model_id>", "/v1/models/{model}", None),
    ("DELETE", "v1/models/<path:model_id>", "/v1/models/{model}", None),
    ("GET", "v1/batches/<str:batch_id>", "/v1/batches/{batch}", None),
    ("POST", "v1/batches/<str:batch_id>/cancel", "/v1/batches/{batch}/cancel", None),
    ("GET", "v1/federations/<str:federation_id>", "/v1/federations/{federation}", None),
    ("PATCH", "v1/federations/<str:federation_id>", "/v1/federations/{federation}",
     {"schedule": ""}),
    ("POST", "v1/federations/<str:federation_id>/invite", "/v1/federations/{federation}/invite",
     {"tenant": "bank-b"}),
    ("POST", "v1/federations/<str:federation_id>/accept", "/v1/federations/{federation}/accept",
     {"node_name": "b-node"}),
    ("POST", "v1/federations/<str:federation_id>/decline",
     "/v1/federations/{federation}/decline", None),
    ("GET", "v1/federations/<str:federation_id>/rounds", "/v1/federations/{federation}/rounds",
     None),
    ("POST", "v1/federations/<str:federation_id>/rounds", "/v1/federations/{federation}/rounds",
     None),
    ("GET", "v1/federations/<str:federation_id>/rounds/<str:round_id>",
     "/v1/federations/{federation}/rounds/{round}", None),
    # ids inside request bodies
    ("POST", "v1/fine_tuning/jobs", "/v1/fine_tuning/jobs",
     {"model": "enclave-test", "training_file": "{file}"}),
    ("POST", "v1/chat/completions", "/v1/chat/completions",
     {"model": "{model}", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}),
    ("POST", "v1/batches", "/v1/batches",
     {"input_file_id": "{file}", "endpoint": "/v1/chat/completions", "completion_window": "24h"}),
    ("POST", "v1/federations", "/v1/federations",
     {"name": "steal", "base_model": "enclave-test", "training_file": "{file}"}),
]  # fmt: skip
# Patterns that hold no other tenant's ids: lists and creations scoped to the caller.
OWN_SCOPE = {"v1/files", "v1/fine_tuning/jobs", "v1/models", "v1/batches", "v1/federations",
             "v1/usage"}  # fmt: skip
# Patterns outside tenant data, with the reason.
EXEMPT = {
    "healthz": "liveness, no data",
    "readyz": "readiness, no data",
    "api/schema/": "the public OpenAPI document",
    "api/docs/": "the public docs page",
}

CONSOLE_EXEMPT = {"logout": "ends the caller's own session, no tenant data"}


def _fill(template, ids: dict):
    if isinstance(template, str):
        return template.format(**ids) if "{" in template else template
    if isinstance(template, dict):
        return {k: _fill(v, ids) for k, v in template.items()}
    if isinstance(template, list):
        return [_fill(v, ids) for v in template]
    return template


def _shape(response: httpx.Response, ids: dict) -> tuple:
    """Status and error body with the id replaced, so a foreign id and a missing id compare."""
    text = response.text
    for value in ids.values():
        text = text.replace(value, "<id>")
    return response.status_code, text


@pytest.fixture
def world(live_server_url, make_tenant, base_model, tmp_path):
    from controlplane.federation import services as federation_services
    from controlplane.tuning import services as tuning_services
    from tests.controlplane.test_chat_api import _add_adapter

    tenant_a, key_a = make_tenant("bank-a", role="admin")
    _tenant_b, key_b = make_tenant("bank-b", role="admin")
    auth_a = {"Authorization": f"Bearer {key_a}"}
    upload = httpx.post(
        f"{live_server_url}/v1/files", headers=auth_a, data={"purpose": "fine-tune"},
        files={"file": ("a.jsonl", io.BytesIO(_chat_jsonl()))},
    ).json()  # fmt: skip
    batch_file = httpx.post(
        f"{live_server_url}/v1/files", headers=auth_a, data={"purpose": "batch"},
        files={"file": ("b.jsonl", io.BytesIO(b'{"custom_id": "1", "body": {}}\n'))},
    ).json()  # fmt: skip
    job, _ = tuning_services.fine_tuning_job_create(
        tenant=tenant_a, model=base_model, training_file=upload["id"]
    )
    batch = httpx.post(
        f"{live_server_url}/v1/batches", headers=auth_a,
        json={"input_file_id": batch_file["id"], "endpoint": "/v1/chat/completions",
              "completion_window": "24h"},
    ).json()  # fmt: skip
    federation = federation_services.federation_create(
        owner=tenant_a, name="a-only", base_model=base_model, min_participants=1,
        training_file=upload["id"],
    )  # fmt: skip
    fed_round = federation_services.round_start(federation=federation)
    ids = {
        "file": upload["id"], "job": job.id, "model": _add_adapter(tenant_a, base_model, tmp_path),
        "batch": batch["id"], "federation": federation.id, "round": fed_round.id,
    }  # fmt: skip
    return {"url": live_server_url, "ids": ids, "key_b": key_b}


def test_tenant_b_cannot_tell_tenant_a_objects_from_missing_ones(world):
    url, ids = world["url"], world["ids"]
    auth_b = {"Authorization": f"Bearer {world['key_b']}"}
    before = {
        "files": File.objects.count(), "jobs": FineTuningJob.objects.count(),
        "adapters": Adapter.objects.count(), "batches": Batch.objects.count(),
        "federations": Federation.objects.count(),
    }  # fmt: skip
    job_status = FineTuningJob.objects.get(pk=ids["job"]).status

    for method, _route, path, body in MATRIX:
        foreign = httpx.request(method, url + _fill(path, ids), headers=auth_b,
                                json=_fill(body, ids), timeout=60)  # fmt: skip
        missing = httpx.request(method, url + _fill(path, MISSING), headers=auth_b,
                                json=_fill(body, MISSING), timeout=60)  # fmt: skip
        assert foreign.status_code in (400, 404), (method, path, foreign.status_code, foreign.text)
        assert _shape(foreign, ids) == _shape(missing, MISSING), (method, path)
        assert "error" in foreign.json()

    after = {
        "files": File.objects.count(), "jobs": FineTuningJob.objects.count(),
        "adapters": Adapter.objects.count(), "batches": Batch.objects.count(),
        "federations": Federation.objects.count(),
    }  # fmt: skip
    assert after == before
    assert FineTuningJob.objects.get(pk=ids["job"]).status == job_status
    assert Federation.objects.get(pk=ids["federation"]).schedule == ""


def _routes(resolver=None, prefix="") -> list[str]:
    out = []
    for entry in (resolver or get_resolver()).url_patterns:
        route = prefix + str(entry.pattern)
        if isinstance(entry, URLResolver):
            out += _routes(entry, route)
        elif isinstance(entry, URLPattern):
            out.append(route)
    return out


def test_every_url_pattern_is_covered_by_an_isolation_test():
    """/v1 patterns need a MATRIX row (or are the caller's own scope); console patterns
    must appear in the console's role and 404 matrix; the rest are exempt by name."""
    matrix = {route for _m, route, _p, _b in MATRIX}
    uncovered = [
        route
        for route in _routes()
        if (route.startswith("v1/") and route not in matrix | OWN_SCOPE)
        or not route.startswith(("v1/", "console/", "admin/"))
        and route not in EXEMPT
    ]
    console_tests = (Path(__file__).parents[1] / "console" / "test_access.py").read_text()
    console = next(
        p for p in get_resolver().url_patterns
        if isinstance(p, URLResolver) and str(p.pattern) == "console/"
    )  # fmt: skip
    uncovered += [
        f"console:{p.name}"
        for p in console.url_patterns
        if f'"console:{p.name}"' not in console_tests and p.name not in CONSOLE_EXEMPT
    ]
    assert uncovered == [], "add these URL patterns to an isolation test"
