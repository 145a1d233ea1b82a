"""Property-based fuzzing of every /v1 operation against the served OpenAPI schema.

schemathesis reads /api/schema/ from a live uvicorn process and generates requests for each
operation; every response must be no 5xx, carry a documented status code and content type,
and match the documented body schema. Tenant A (admin) owns one of everything, and the
generated ids are sometimes A's real ones, so the fuzzing reaches past the 404s.
"""

import io
import json

import httpx
import hypothesis
import pytest
import schemathesis
from hypothesis import strategies as st
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_schema_conformance,
    status_code_conformance,
)

from tests.controlplane.test_files_api import _chat_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


@schemathesis.check
def json_body_is_documented(ctx, response, case):
    """A JSON body the schema says nothing about passes response_schema_conformance
    vacuously (fieldless serializers did this): every JSON answer must have a schema."""
    if not response.headers.get("content-type", [""])[0].startswith("application/json"):
        return None
    documented = case.operation.definition.raw["responses"].get(str(response.status_code))
    if documented is None or case.method.upper() != case.operation.method.upper():
        return None  # status_code_conformance's (and unsupported-method probes') business
    assert "application/json" in documented.get("content", {}), (
        f"{case.operation.label} answered {response.status_code} with JSON; no schema for it"
    )
    return True


CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
    json_body_is_documented,
]
# Filled per test by the `owned` fixture: tenant A's real ids by path-parameter name.
OWNED: dict[str, str] = {}


def _served_schema() -> dict:
    """The document /api/schema/ serves, generated the same way in this process (the
    pytest plugin needs the operations at collection, before the live server runs;
    test_the_fuzzed_schema_is_the_served_one checks they are the same)."""
    from drf_spectacular.generators import SchemaGenerator
    from drf_spectacular.renderers import OpenApiJsonRenderer

    raw = SchemaGenerator().get_schema(request=None, public=True)
    return json.loads(OpenApiJsonRenderer().render(raw, renderer_context={}))


RAW_SCHEMA = _served_schema()
schema = schemathesis.openapi.from_dict(RAW_SCHEMA).include(path_regex="^/v1/")


def test_the_fuzzed_schema_is_the_served_one(live_server_url):
    served = httpx.get(f"{live_server_url}/api/schema/?format=json", timeout=30)
    assert served.status_code == 200
    assert served.json() == RAW_SCHEMA


@pytest.fixture
def owned(live_server_url, make_tenant, base_model, tmp_path):
    """Tenant A with a file, a batch file, a job, an adapter, a batch, a federation and a
    round; returns A's key. Quotas are raised so generated calls are not rate-limited."""
    from controlplane.federation import services as federation_services
    from controlplane.tuning import services as tuning_services
    from tests.controlplane.test_chat_api import _add_adapter

    tenant, key = make_tenant("fuzz-a", role="admin")
    tenant.requests_per_minute, tenant.tokens_per_minute = 100_000, 10_000_000
    tenant.save()
    auth = {"Authorization": f"Bearer {key}"}
    upload = httpx.post(
        f"{live_server_url}/v1/files", headers=auth, data={"purpose": "fine-tune"},
        files={"file": ("a.jsonl", io.BytesIO(_chat_jsonl()))},
    ).json()  # fmt: skip
    batch_file = httpx.post(
        f"{live_server_url}/v1/files", headers=auth, data={"purpose": "batch"},
        files={"file": ("b.jsonl", io.BytesIO(b'{"custom_id": "1", "body": {}}\n'))},
    ).json()  # fmt: skip
    batch = httpx.post(
        f"{live_server_url}/v1/batches", headers=auth,
        json={"input_file_id": batch_file["id"], "endpoint": "/v1/chat/completions"},
    ).json()  # fmt: skip
    job, _ = tuning_services.fine_tuning_job_create(
        tenant=tenant, model=base_model, training_file=upload["id"]
    )
    federation = federation_services.federation_create(
        owner=tenant, name="fuzz", base_model=base_model, min_participants=1,
        training_file=upload["id"],
    )  # fmt: skip
    fed_round = federation_services.round_start(federation=federation)
    OWNED.clear()
    OWNED.update(
        file_id=upload["id"], job_id=job.id, model_id=_add_adapter(tenant, base_model, tmp_path),
        federation_id=federation.id, round_id=fed_round.id, batch_id=batch["id"],
        base_model=base_model,
    )  # fmt: skip
    yield {"url": live_server_url, "auth": auth}
    OWNED.clear()


@schemathesis.hook
def flatmap_path_parameters(context, path_parameters):
    """Half the time, the path names one of tenant A's real objects."""
    real = {name: OWNED[name] for name in path_parameters or () if name in OWNED}
    if not real:
        return st.just(path_parameters)
    return st.sampled_from([path_parameters, {**path_parameters, **real}])


@schemathesis.hook
def map_body(context, body):
    """Chat completions run on the tiny model with at most 4 new tokens, so the run stays
    short; the rest of the body is as generated."""
    if context.operation.path == "/v1/chat/completions" and isinstance(body, dict):
        body = {**body, "model": OWNED.get("base_model", body.get("model"))}
        tokens = body.get("max_tokens", 4)
        # An invalid value (negative, a string) stays, for the server to refuse.
        body["max_tokens"] = min(tokens, 4) if isinstance(tokens, int) else tokens
        body.pop("max_completion_tokens", None)
    return body


@schema.parametrize()
@hypothesis.settings(
    max_examples=5,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_every_v1_operation_conforms_to_its_schema(case, owned):
    case.call_and_validate(base_url=owned["url"], headers=owned["auth"], checks=CHECKS, timeout=60)


# --- Object-level authorization, driven by the schema ------------------------------------
# schemathesis 4's own `object_level_authorization` check replays only GETs, and only with
# several identities from a WFC auth document; this one probes every operation, writes and
# ids in bodies included, and a new operation is covered without a new line here.

MISSING = {"file_id": "file-000000000000000000000000", "job_id": "ftjob-000000000000000000000000",
           "model_id": "ft:enclave-test:nobody:x:ftjob-0", "batch_id": "batch_000000000000000000000000",
           "federation_id": "fed-0000000000000000", "round_id": "fedround-0000000000000000"}  # fmt: skip
# Valid values for body fields that are not ids, so a probe gets as far as the id.
BODY_VALUES = {"endpoint": "/v1/chat/completions", "completion_window": "24h", "name": "probe",
               "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1,
               "base_model": "enclave-test", "model": "enclave-test"}  # fmt: skip


def _id_kind(name: str) -> str | None:
    """Which of A's ids a path parameter or body field carries, by the API's naming:
    `<kind>_id` parameters, `*_file`/`*_file_id` fields, and `model`."""
    if name in MISSING:
        return name
    if name == "model":
        return "model_id"
    if name.endswith(("_file", "_file_id")):
        return "file_id"
    return None


def _deref(node: dict) -> dict:
    if "$ref" in node:
        target = RAW_SCHEMA
        for part in node["$ref"].lstrip("#/").split("/"):
            target = target[part]
        return target
    return node


def _body_for(operation: dict, ids: dict) -> tuple[dict | None, list[str]]:
    """A JSON body with every id field set from `ids` and every other required field
    valid; returns (body, the id fields). None when the operation takes no JSON body."""
    content = operation.get("requestBody", {}).get("content", {})
    if "application/json" not in content:
        return None, []
    schema = _deref(content["application/json"]["schema"])
    body, id_fields = {}, []
    properties = schema.get("properties", {})
    # `model` names a base model where another field carries the id (a job's training
    # file), and an adapter where it is the only one (a chat completion).
    kinds = {name: _id_kind(name) for name in properties}
    if sum(k is not None for k in kinds.values()) > 1:
        kinds["model"] = None
    for name, prop in properties.items():
        prop = _deref(prop)
        kind = kinds[name]
        if kind is not None and prop.get("type") == "string":
            body[name] = ids[kind]
            id_fields.append(name)
        elif name in schema.get("required", []) or name in BODY_VALUES:
            if name in BODY_VALUES:
                body[name] = BODY_VALUES[name]
            elif "default" in prop:
                body[name] = prop["default"]
            elif "enum" in prop:
                body[name] = prop["enum"][0]
            else:
                body[name] = {"string": "x", "integer": 1, "number": 1, "boolean": False,
                              "array": [], "object": {}}[prop.get("type", "string")]  # fmt: skip
    return body, id_fields


def _v1_operations():
    for path, methods in RAW_SCHEMA["paths"].items():
        if path.startswith("/v1/"):
            for method, operation in methods.items():
                yield method.upper(), path, operation


def _request(url: str, key: str, method: str, path: str, operation: dict, ids: dict):
    params = {
        p["name"]: ids[p["name"]] for p in operation.get("parameters", []) if p["in"] == "path"
    }
    body, _ = _body_for(operation, ids)
    return httpx.request(
        method, url + path.format(**params), headers={"Authorization": f"Bearer {key}"},
        json=body, timeout=60,
    )  # fmt: skip


def _shape(response: httpx.Response, ids: dict) -> tuple[int, str]:
    text = response.text
    for value in ids.values():
        text = text.replace(value, "<id>")
    return response.status_code, text


def test_every_operation_answers_tenant_b_as_if_tenant_a_objects_did_not_exist(
    owned, make_tenant, base_model
):
    """Tenant B (admin) sends every /v1 operation with tenant A's ids, in the path and in
    the body, and gets exactly what it gets for ids that do not exist (a 4xx); operations
    without ids never show A's objects to B; afterwards A still has all of them."""
    from controlplane.federation.models import Federation
    from controlplane.files.models import File
    from controlplane.serving.models import Batch
    from controlplane.tuning.models import Adapter, FineTuningJob

    url = owned["url"]
    ids = {k: v for k, v in OWNED.items() if k in MISSING}
    _b, key_b = make_tenant("fuzz-b", role="admin")
    counts = lambda: [m.objects.count() for m in (File, FineTuningJob, Adapter, Batch, Federation)]  # noqa: E731
    before = counts()
    probed = []

    for method, path, operation in _v1_operations():
        names = [p["name"] for p in operation.get("parameters", []) if p["in"] == "path"]
        assert all(n in MISSING for n in names), f"{method} {path}: give tenant A a {names} object"
        _body, id_fields = _body_for(operation, ids)
        if not names and not id_fields:
            if method == "GET":  # the caller's own scope: A's ids must not appear
                listed = _request(url, key_b, method, path, operation, ids)
                assert listed.status_code == 200, (path, listed.text)
                assert not any(v in listed.text for v in ids.values()), (path, listed.text)
                probed.append(f"{method} {path} (scope)")
            continue
        foreign = _request(url, key_b, method, path, operation, ids)
        missing = _request(url, key_b, method, path, operation, MISSING)
        assert 400 <= foreign.status_code < 500, (method, path, foreign.status_code, foreign.text)
        assert _shape(foreign, ids) == _shape(missing, MISSING), (method, path)
        assert set(foreign.json()["error"]) == {"message", "type", "param", "code"}
        probed.append(f"{method} {path}")

    assert counts() == before
    for plural, name in (("files", "file_id"), ("fine_tuning/jobs", "job_id"),
                         ("batches", "batch_id"), ("federations", "federation_id")):  # fmt: skip
        mine = httpx.get(f"{url}/v1/{plural}/{ids[name]}", headers=owned["auth"], timeout=30)
        assert mine.status_code == 200, (name, mine.text)
    assert len(probed) > 20, probed
