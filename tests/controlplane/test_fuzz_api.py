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

CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_schema_conformance,
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
        federation_id=federation.id, round_id=fed_round.id, base_model=base_model,
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
    max_examples=8,
    deadline=None,
    derandomize=True,
    suppress_health_check=list(hypothesis.HealthCheck),
)
def test_every_v1_operation_conforms_to_its_schema(case, owned):
    case.call_and_validate(base_url=owned["url"], headers=owned["auth"], checks=CHECKS, timeout=60)
