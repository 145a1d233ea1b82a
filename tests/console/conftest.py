"""Console fixtures: two tenants with one object of each kind, and people in every role."""

import json
from dataclasses import dataclass

import pytest

JSONL = (
    "\n".join(
        json.dumps(
            {
                "messages": [
                    {"role": "user", "content": f"Question {i}?"},
                    {"role": "assistant", "content": f"Answer {i}."},
                ]
            }
        )
        for i in range(6)
    )
    + "\n"
).encode()


@dataclass
class TenantObjects:
    tenant: object
    file: object
    job: object
    adapter: object
    key: object
    federation: object
    batch: object


def make_objects(tenant) -> TenantObjects:
    """A validated file, a job on it, an adapter, an API key, a federation the tenant
    owns and a queued batch, made directly (no worker, no base model needed)."""
    from controlplane.federation.models import Federation, Participant
    from controlplane.files.services import file_create
    from controlplane.serving.models import Batch
    from controlplane.tenancy.services import api_key_create
    from controlplane.tuning.models import Adapter, FineTuningJob

    file = file_create(
        tenant=tenant, filename="train.jsonl", purpose="fine-tune", chunks=[JSONL], size=len(JSONL)
    )
    job = FineTuningJob.objects.create(tenant=tenant, model="enclave-test", training_file=file)
    adapter = Adapter.objects.create(
        id=f"ft:enclave-test:{tenant.slug}::{job.id}", tenant=tenant, base_model="enclave-test"
    )
    key, _raw = api_key_create(tenant=tenant, role="member", name="ci")
    federation = Federation.objects.create(
        owner=tenant, name=f"{tenant.slug} consortium", base_model="enclave-test"
    )
    Participant.objects.create(
        federation=federation, tenant=tenant, status="accepted", training_file=file
    )
    batch = Batch.objects.create(tenant=tenant, input_file=file)
    return TenantObjects(tenant, file, job, adapter, key, federation, batch)


@pytest.fixture
def world(db, django_user_model):
    """Tenant `acme` (home) and `globex` (foreign), each with objects; users by role."""
    from controlplane.tenancy.services import membership_set, tenant_create

    home = tenant_create(slug="acme", name="Acme Bank", vertical="finance")
    foreign = tenant_create(slug="globex", name="Globex Clinic", vertical="medical")
    users = {}
    for role in ("admin", "member", "auditor"):
        users[role] = django_user_model.objects.create_user(username=f"{role}-user")
        membership_set(tenant=home, user=users[role], role=role)
    users["outsider"] = django_user_model.objects.create_user(username="outsider")
    users["foreign-admin"] = django_user_model.objects.create_user(username="foreign-admin")
    membership_set(tenant=foreign, user=users["foreign-admin"], role="admin")
    return {"home": make_objects(home), "foreign": make_objects(foreign), "users": users}


@pytest.fixture(scope="session")
def console_url(process_env, tmp_path_factory):
    """A uvicorn process for the browser tests, started after `collectstatic` so its
    static files (the console's scripts and the vendored chart library) are served
    exactly as in a deployment (WhiteNoise from STATIC_ROOT)."""
    from django.core.management import call_command

    from controlplane import launch

    call_command("collectstatic", "--noinput", verbosity=0)
    port = launch.free_port()
    web = launch.ManagedProcess(
        "console-web",
        launch.web_command(port=port),
        log_path=tmp_path_factory.mktemp("console-web") / "web.log",
        env=dict(process_env),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        launch.wait_until_ready(url, timeout=60, process=web)
        yield url
    finally:
        web.stop()
