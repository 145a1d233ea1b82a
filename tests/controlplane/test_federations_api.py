"""/v1/federations: create, invite, accept (consent), schedule, rounds; isolation."""

import io
import json

import httpx
import pytest
from django_celery_beat.models import PeriodicTask

from controlplane.federation.models import FederatedRound, Federation, Participant
from tests.controlplane.test_files_api import _chat_jsonl

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


class Api:
    def __init__(self, url: str, key: str):
        self.url, self.headers = url, {"Authorization": f"Bearer {key}"}

    def __call__(self, method: str, path: str, **kwargs) -> httpx.Response:
        return httpx.request(method, f"{self.url}/v1{path}", headers=self.headers, timeout=30,
                             **kwargs)  # fmt: skip

    def upload(self) -> str:
        files = {"file": ("d.jsonl", io.BytesIO(_chat_jsonl()), "application/jsonl")}
        response = self("POST", "/files", files=files, data={"purpose": "fine-tune"})
        assert response.status_code == 200, response.text
        return response.json()["id"]


@pytest.fixture
def consortium(live_server_url, make_tenant, base_model):
    apis = {}
    for slug in ("st-anne", "st-bart", "st-clare"):
        _tenant, key = make_tenant(slug, role="admin", vertical="medical")
        apis[slug] = Api(live_server_url, key)
    return apis


def test_federation_lifecycle_with_consent_and_schedule(consortium, base_model):
    owner, bart, clare = consortium["st-anne"], consortium["st-bart"], consortium["st-clare"]
    created = owner("POST", "/federations", json={
        "name": "Sepsis triage", "base_model": base_model, "schedule": "0 2 * * 1",
        "min_participants": 3, "training_file": owner.upload(),
        "settings": {"aggregation": "ffa", "lora_r": 4, "secure_aggregation": True,
                     "dp": {"clip_norm": 1.0, "noise_multiplier": 1.0, "delta": 1e-5,
                            "max_epsilon": 8.0}},
    })  # fmt: skip
    assert created.status_code == 200, created.text
    fed = created.json()
    assert fed["object"] == "federation" and fed["owner"] == "st-anne" and fed["is_owner"]
    task = PeriodicTask.objects.get(name=f"federation-round:{fed['id']}")
    assert task.task == "federation.start_scheduled_round" and json.loads(task.args) == [fed["id"]]
    assert (task.crontab.minute, task.crontab.hour, task.crontab.day_of_week) == ("0", "2", "1")

    # Not invited yet: the federation does not exist for st-bart.
    assert bart("GET", f"/federations/{fed['id']}").status_code == 404
    for slug in ("st-bart", "st-clare"):
        invited = owner("POST", f"/federations/{fed['id']}/invite", json={"tenant": slug})
        assert invited.json()["status"] == "invited"
    assert bart("GET", f"/federations/{fed['id']}").json()["is_owner"] is False

    # Too few members with data: the round is refused cleanly.
    refused = owner("POST", f"/federations/{fed['id']}/rounds")
    assert refused.status_code == 409 and "needs 3" in refused.json()["error"]["message"]

    no_source = bart("POST", f"/federations/{fed['id']}/accept", json={})
    assert no_source.status_code == 400 and no_source.json()["error"]["param"] == "training_file"
    accepted = bart("POST", f"/federations/{fed['id']}/accept",
                    json={"training_file": bart.upload()})  # fmt: skip
    assert accepted.json()["status"] == "accepted" and accepted.json()["mode"] == "hosted"
    seat = Participant.objects.get(tenant__slug="st-bart")
    assert seat.consent["settings"]["aggregation"] == "ffa" and seat.accepted_by.startswith("key:")
    clare("POST", f"/federations/{fed['id']}/accept", json={"training_file": clare.upload()})

    # Only the owner steers.
    assert bart("POST", f"/federations/{fed['id']}/rounds").status_code == 403
    assert bart("PATCH", f"/federations/{fed['id']}", json={"schedule": ""}).status_code == 403
    assert bart("POST", f"/federations/{fed['id']}/invite",
                json={"tenant": "st-clare"}).status_code == 403  # fmt: skip

    started = owner("POST", f"/federations/{fed['id']}/rounds")
    assert started.status_code == 200, started.text
    assert started.json()["number"] == 1 and started.json()["status"] == "queued"
    busy = owner("POST", f"/federations/{fed['id']}/rounds")
    assert busy.status_code == 409 and "still queued" in busy.json()["error"]["message"]
    rounds = clare("GET", f"/federations/{fed['id']}/rounds").json()["data"]
    assert [r["number"] for r in rounds] == [1]

    paused = owner("PATCH", f"/federations/{fed['id']}", json={"status": "paused"})
    assert paused.json()["status"] == "paused"
    assert not PeriodicTask.objects.filter(name=f"federation-round:{fed['id']}").exists()


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"base_model": "nope"}, "base_model"),
        ({"schedule": "every tuesday"}, "schedule"),
        ({"settings": {"aggregation": "median-of-vibes"}}, "settings"),
        ({"settings": {"learning_rate_of_doom": 1}}, "settings.learning_rate_of_doom"),
        ({"training_file": "file-nope"}, "training_file"),
        ({"min_participants": 0}, "min_participants"),
        ({"settings": {"straggler_timeout_s": -1}}, "settings"),
    ],
    ids=[
        "base-model",
        "cron",
        "aggregation",
        "unknown-setting",
        "file",
        "min-participants",
        "negative-straggler-grace",
    ],
)
def test_bad_federations_are_refused(consortium, base_model, change, param):
    owner = consortium["st-anne"]
    response = owner("POST", "/federations", json={"name": "x", "base_model": base_model,
                                                   **change})  # fmt: skip
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param
    assert Federation.objects.count() == 0


def test_members_and_auditors_cannot_manage_federations(live_server_url, make_tenant, base_model):
    _t, member_key = make_tenant("clinic", role="member")
    member = Api(live_server_url, member_key)
    response = member("POST", "/federations", json={"name": "x", "base_model": base_model})
    assert response.status_code == 403
    assert member("GET", "/federations").json()["data"] == []


def test_a_scheduled_round_skips_a_busy_or_paused_federation(consortium, base_model):
    from controlplane.federation import services

    owner = consortium["st-anne"]
    fed = owner("POST", "/federations", json={"name": "x", "base_model": base_model,
                                              "min_participants": 1,
                                              "training_file": owner.upload()}).json()  # fmt: skip
    first = services.round_start_scheduled(federation_id=fed["id"])
    assert first is not None and first.number == 1
    assert services.round_start_scheduled(federation_id=fed["id"]) is None  # still queued
    Federation.objects.filter(pk=fed["id"]).update(status="paused")
    FederatedRound.objects.filter(pk=first.pk).update(status="succeeded")
    assert services.round_start_scheduled(federation_id=fed["id"]) is None
    assert services.round_start_scheduled(federation_id="fed-missing") is None


def test_a_federated_round_runs_end_to_end_and_members_chat_with_the_result(
    live_server_url, make_tenant, base_model, celery_worker
):
    """Two hospitals, hosted data decrypted only inside their Flower clients (simulation
    runtime), the round run by a real train-queue worker."""
    import time

    apis = {}
    for slug in ("st-anne", "st-bart", "outsider"):
        _tenant, key = make_tenant(slug, role="admin", vertical="medical")
        apis[slug] = Api(live_server_url, key)
    owner, bart, outsider = apis["st-anne"], apis["st-bart"], apis["outsider"]
    fed = owner("POST", "/federations", json={
        "name": "tiny", "base_model": base_model, "min_participants": 2,
        "training_file": owner.upload(),
        "settings": {"aggregation": "fedavg", "lora_r": 2, "lora_alpha": 4, "local_steps": 2,
                     "batch_size": 2, "max_seq_len": 64, "eval_generations": 0,
                     "min_available": 2, "min_train": 2, "round_timeout_s": 240,
                     "straggler_timeout_s": 120},
    }).json()  # fmt: skip
    owner("POST", f"/federations/{fed['id']}/invite", json={"tenant": "st-bart"})
    bart("POST", f"/federations/{fed['id']}/accept", json={"training_file": bart.upload()})

    started = owner("POST", f"/federations/{fed['id']}/rounds").json()
    deadline = time.monotonic() + 420
    while True:
        current = owner("GET", f"/federations/{fed['id']}/rounds/{started['id']}").json()
        if current["status"] in ("succeeded", "failed", "cancelled"):
            break
        assert time.monotonic() < deadline, current
        time.sleep(1)

    assert current["status"] == "succeeded", (current["error"], celery_worker.log_text()[-3000:])
    assert current["global_model"] == f"fed:{base_model}:{fed['id']}:r1"
    assert sorted(current["members"]) == ["st-anne", "st-bart"]
    assert current["metrics"]["train_loss"] > 0
    from controlplane.tenancy.models import DailyUsage

    assert DailyUsage.objects.get(tenant__slug="st-bart").training_tokens > 0  # metered
    model_ids = {m["id"] for m in bart("GET", "/models").json()["data"]}
    assert current["global_model"] in model_ids
    reply = bart("POST", "/chat/completions", json={
        "model": current["global_model"], "max_tokens": 3,
        "messages": [{"role": "user", "content": "hello"}]})  # fmt: skip
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["completion_tokens"] > 0
    denied = outsider("POST", "/chat/completions", json={
        "model": current["global_model"], "max_tokens": 3,
        "messages": [{"role": "user", "content": "hello"}]})  # fmt: skip
    assert denied.status_code == 404
    assert current["global_model"] not in {
        m["id"] for m in outsider("GET", "/models").json()["data"]
    }


def test_a_round_past_the_privacy_budget_is_refused(consortium, base_model):
    owner = consortium["st-anne"]
    fed = owner("POST", "/federations", json={
        "name": "tight budget", "base_model": base_model, "min_participants": 1,
        "training_file": owner.upload(),
        "settings": {"dp": {"clip_norm": 1.0, "noise_multiplier": 0.3, "delta": 1e-5,
                            "max_epsilon": 1.0}},
    }).json()  # fmt: skip
    refused = owner("POST", f"/federations/{fed['id']}/rounds")
    assert refused.status_code == 409
    assert "privacy budget" in refused.json()["error"]["message"]
    assert FederatedRound.objects.count() == 0
