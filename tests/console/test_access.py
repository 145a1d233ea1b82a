"""Every console URL against every role, anonymous and outsider, and foreign ids.

Django's test client, no browser: login, membership and role checks (403), tenant
isolation (another tenant's id answers 404), CSRF, and the audit record of console writes.
"""

import pytest
from django.test import Client
from django.urls import reverse

from controlplane.audit.models import AuditEvent
from controlplane.files.models import File
from controlplane.serving.models import Batch
from controlplane.tenancy.models import ApiKey, Membership
from controlplane.tuning.models import Adapter, FineTuningJob

pytestmark = pytest.mark.django_db

ROLES = ("admin", "member", "auditor")


def _client(world, who: str) -> Client:
    client = Client()
    client.force_login(world["users"][who])
    return client


def _read_urls(objs) -> list[str]:
    return [
        reverse("console:dashboard"),
        reverse("console:files"),
        reverse("console:file", kwargs={"file_id": objs.file.id}),
        reverse("console:file-content", kwargs={"file_id": objs.file.id}),
        reverse("console:jobs"),
        reverse("console:job", kwargs={"job_id": objs.job.id}),
        reverse("console:job-progress", kwargs={"job_id": objs.job.id}),
        reverse("console:models"),
        reverse("console:playground"),
        reverse("console:batches"),
        reverse("console:batch", args=[objs.batch.id]),
        reverse("console:federations"),
        reverse("console:federation", args=[objs.federation.id]),
        reverse("console:federation-rounds", args=[objs.federation.id]),
        reverse("console:api-keys"),
        reverse("console:members"),
        reverse("console:audit"),
        reverse("console:audit-csv"),
    ]


@pytest.mark.parametrize("role", ROLES)
def test_every_role_reads_every_page(world, role):
    client = _client(world, role)
    for url in _read_urls(world["home"]):
        response = client.get(url)
        assert response.status_code == 200, (url, response.status_code)
        # No inline script and nothing from another origin may run on a console page.
        assert "script-src 'self';" in response["Content-Security-Policy"], url
    assert (
        "frame-ancestors 'none'"
        in Client().get(reverse("console:login"))["Content-Security-Policy"]
    )


def test_anonymous_is_sent_to_login_and_an_outsider_is_refused(world):
    anonymous = Client()
    outsider = _client(world, "outsider")
    for url in [*_read_urls(world["home"]), reverse("console:job-create")]:
        response = anonymous.get(url)
        assert response.status_code == 302, url
        assert response["Location"].startswith(reverse("console:login") + "?next="), url
        assert outsider.get(url).status_code == 403, url


def test_job_create_form_needs_member(world):
    url = reverse("console:job-create")
    assert _client(world, "auditor").get(url).status_code == 403
    assert _client(world, "member").get(url).status_code == 200


def _first_membership(objs) -> Membership:
    return Membership.objects.filter(tenant=objs.tenant).order_by("pk").first()


def _writes(objs) -> list[tuple[str, str, dict]]:
    """(minimum role, url, form data) for every mutating console request."""
    fed = objs.federation.id
    return [
        ("member", reverse("console:files"), {"purpose": "fine-tune"}),
        ("member", reverse("console:file-delete", kwargs={"file_id": objs.file.id}), {}),
        ("member", reverse("console:job-create"), {}),
        ("member", reverse("console:job-action", args=[objs.job.id, "cancel"]), {}),
        ("member", reverse("console:job-action", args=[objs.job.id, "pause"]), {}),
        ("member", reverse("console:job-action", args=[objs.job.id, "resume"]), {}),
        ("member", reverse("console:model-delete"), {"model": objs.adapter.id}),
        ("member", reverse("console:batches"), {"input_file": objs.file.id}),
        ("member", reverse("console:batch-cancel", args=[objs.batch.id]), {}),
        ("admin", reverse("console:api-keys"), {"role": "member", "name": "x"}),
        ("admin", reverse("console:api-key-revoke", kwargs={"key_id": objs.key.id}), {}),
        ("admin", reverse("console:members"), {"username": "outsider", "role": "auditor"}),
        ("admin", reverse("console:member-remove", args=[_first_membership(objs).id]), {}),
        ("admin", reverse("console:federations"), {"name": "x", "base_model": "enclave-test"}),
        ("admin", reverse("console:federation-invite", args=[fed]), {"tenant": "globex"}),
        ("admin", reverse("console:federation-accept", args=[fed]), {"node_name": "n1"}),
        ("admin", reverse("console:federation-decline", args=[fed]), {}),
        ("admin", reverse("console:federation-schedule", args=[fed]), {"status": "paused"}),
        ("member", reverse("console:federation-round-start", args=[fed]), {}),
    ]


def _snapshot(objs) -> tuple:
    from controlplane.federation.models import Federation, Participant

    federation = Federation.objects.get(pk=objs.federation.pk)
    return (
        Federation.objects.filter(owner=objs.tenant).count(),
        (federation.status, federation.schedule, federation.rounds.count()),
        sorted(
            Participant.objects.filter(federation=federation).values_list("tenant_id", "status")
        ),
        File.objects.filter(tenant=objs.tenant).count(),
        FineTuningJob.objects.get(pk=objs.job.pk).status,
        FineTuningJob.objects.get(pk=objs.job.pk).stop_request,
        Adapter.objects.filter(tenant=objs.tenant).count(),
        ApiKey.objects.filter(tenant=objs.tenant, revoked_at__isnull=True).count(),
        Membership.objects.filter(tenant=objs.tenant).count(),
        sorted(Batch.objects.filter(tenant=objs.tenant).values_list("id", "stop_request")),
    )


@pytest.mark.parametrize("role", ("member", "auditor"))
def test_roles_below_the_needed_one_get_403_and_change_nothing(world, role):
    home = world["home"]
    client = _client(world, role)
    before = _snapshot(home)
    refused = 0
    for needed, url, data in _writes(home):
        if needed == "member" and role == "member":
            continue
        response = client.post(url, data)
        assert response.status_code == 403, (url, response.status_code)
        refused += 1
    response = client.post(
        reverse("console:playground-stream"), "{}", content_type="application/json"
    )
    assert response.status_code == (403 if role == "auditor" else 400)
    assert _snapshot(home) == before
    # Every refusal is in the audit log, under the person's name.
    logged = AuditEvent.objects.filter(
        tenant=home.tenant, actor=f"user:{role}-user", status_code=403
    )
    assert logged.count() == refused + (role == "auditor")


def test_auditor_pages_show_no_mutating_buttons(world):
    client = _client(world, "auditor")
    home = world["home"]
    for url in _read_urls(home):
        if url.endswith((".json", ".csv", "/content")):
            continue
        html = client.get(url).content.decode()
        # The only forms that POST are the tenant switcher (absent: one tenant) and log out.
        assert html.count('method="post"') == 1, url
    assert 'id="chat-send"' not in client.get(reverse("console:playground")).content.decode()


def test_member_sees_job_buttons_but_no_key_or_member_forms(world):
    client = _client(world, "member")
    home = world["home"]
    job_page = client.get(reverse("console:job", kwargs={"job_id": home.job.id})).content.decode()
    assert 'data-action="cancel"' in job_page
    keys_page = client.get(reverse("console:api-keys")).content.decode()
    assert "Create a key" not in keys_page and ">Revoke<" not in keys_page
    members_page = client.get(reverse("console:members")).content.decode()
    assert "Add a member" not in members_page and ">Remove<" not in members_page


def test_foreign_ids_are_not_found_for_reads_and_writes(world):
    foreign = world["foreign"]
    client = _client(world, "admin")  # the most powerful role at home
    for url in _read_urls(foreign):
        if any(i in url for i in (foreign.file.id, foreign.job.id, foreign.federation.id,
                                  foreign.batch.id)):  # fmt: skip
            assert client.get(url).status_code == 404, url
    before = _snapshot(foreign)
    checked = 0
    for _needed, url, data in _writes(foreign):
        named = (
            foreign.file.id, foreign.job.id, foreign.federation.id, f"keys/{foreign.key.id}/",
            f"members/{_first_membership(foreign).id}/", foreign.batch.id,
        )  # fmt: skip
        if any(part in url for part in named) or data.get("model") == foreign.adapter.id:
            assert client.post(url, data).status_code == 404, url
            checked += 1
    assert checked == 13  # every write that names an object
    assert _snapshot(foreign) == before
    # Nor does another tenant's file show up in the job form or the lists.
    home_pages = "".join(
        client.get(reverse(name)).content.decode()
        for name in ("console:files", "console:jobs", "console:models", "console:api-keys",
                     "console:job-create", "console:playground", "console:batches")
    )  # fmt: skip
    home_pages += client.get(reverse("console:federations")).content.decode()
    for secret in (
        foreign.file.id, foreign.job.id, foreign.adapter.id, foreign.key.prefix,
        foreign.federation.id, foreign.batch.id,
    ):  # fmt: skip
        assert secret not in home_pages


def test_a_foreign_tenant_cannot_be_switched_to(world, django_user_model):
    client = _client(world, "admin")
    foreign = world["foreign"].tenant
    response = client.post(reverse("console:switch"), {"tenant": foreign.id})
    assert response.status_code == 403
    # A forged session value falls back to the user's own tenant.
    session = client.session
    session["console_tenant_id"] = foreign.id
    session.save()
    assert "Acme Bank" in client.get(reverse("console:dashboard")).content.decode()


def test_switcher_moves_between_the_users_tenants(world):
    from controlplane.tenancy.services import membership_set

    user = world["users"]["auditor"]
    foreign = world["foreign"]
    membership_set(tenant=foreign.tenant, user=user, role="admin")
    client = _client(world, "auditor")
    page = client.get(reverse("console:dashboard")).content.decode()
    assert 'id="tenant-switch"' in page and "Globex Clinic (admin)" in page
    assert client.post(reverse("console:switch"), {"tenant": foreign.tenant.id}).status_code == 302
    # Now an admin in globex: its key is listed, acme's is not, and it may revoke.
    keys_page = client.get(reverse("console:api-keys")).content.decode()
    assert foreign.key.prefix in keys_page and world["home"].key.prefix not in keys_page
    revoke = reverse("console:api-key-revoke", kwargs={"key_id": foreign.key.id})
    assert client.post(revoke).status_code == 302
    assert ApiKey.objects.get(pk=foreign.key.pk).revoked_at is not None


def test_posts_need_a_csrf_token(world):
    client = Client(enforce_csrf_checks=True)
    client.force_login(world["users"]["admin"])
    response = client.post(reverse("console:api-keys"), {"role": "member"})
    assert response.status_code == 403
    assert not ApiKey.objects.filter(tenant=world["home"].tenant, name="").exists()


def test_admin_creates_a_key_shown_once_and_revokes_it(world):
    home = world["home"]
    client = _client(world, "admin")
    response = client.post(reverse("console:api-keys"), {"name": "etl", "role": "auditor"})
    assert response.status_code == 201 and response["Cache-Control"] == "no-store"
    key = ApiKey.objects.get(tenant=home.tenant, name="etl")
    raw = response.context["created"]["raw"]
    assert raw.startswith(key.prefix + "_") and raw in response.content.decode()
    assert raw not in client.get(reverse("console:api-keys")).content.decode()
    response = client.post(reverse("console:api-key-revoke", kwargs={"key_id": key.id}))
    assert response.status_code == 302
    key.refresh_from_db()
    assert key.revoked_at is not None
    event = AuditEvent.objects.filter(object_type="api_key", object_id=key.prefix).first()
    assert event.actor == "user:admin-user" and event.status_code == 302


def test_admin_sets_roles(world):
    client = _client(world, "admin")
    response = client.post(reverse("console:members"), {"username": "outsider", "role": "auditor"})
    assert response.status_code == 302
    assert Membership.objects.get(user=world["users"]["outsider"]).role == "auditor"
    response = client.post(reverse("console:members"), {"username": "nobody", "role": "member"})
    assert response.status_code == 400 and "No user named" in response.content.decode()


def test_member_queues_a_batch_follows_it_and_downloads_files(world):
    from controlplane.files.services import file_create

    from .conftest import JSONL

    home = world["home"]
    client = _client(world, "member")
    line = (
        b'{"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions", "body": '
        b'{"model": "enclave-test", "messages": [{"role": "user", "content": "hi"}]}}\n'
    )
    batch_file = file_create(
        tenant=home.tenant, filename="requests.jsonl", purpose="batch", chunks=[line],
        size=len(line),
    )  # fmt: skip
    page = client.get(reverse("console:batches")).content.decode()
    # Only validated batch files are offered (not the fine-tune file).
    assert batch_file.id in page and f'value="{home.file.id}"' not in page
    response = client.post(reverse("console:batches"), {"input_file": home.file.id})
    assert response.status_code == 400  # a fine-tune file is not a choice
    response = client.post(
        reverse("console:batches"),
        {"input_file": batch_file.id, "endpoint": "/v1/chat/completions",
         "completion_window": "24h"},
    )  # fmt: skip
    assert response.status_code == 302
    batch = Batch.objects.get(input_file=batch_file)
    assert response["Location"] == reverse("console:batch", args=[batch.id])
    detail = client.get(response["Location"]).content.decode()
    assert "validating" in detail and "Cancel batch" in detail
    assert client.post(reverse("console:batch-cancel", args=[batch.id])).status_code == 302
    batch.refresh_from_db()
    assert batch.status == "cancelled" or batch.stop_request == "cancel"
    assert AuditEvent.objects.filter(object_type="batch", object_id=batch.id).count() == 2
    # Any role can download a file's decrypted content; another tenant's is not found.
    download = _client(world, "auditor").get(
        reverse("console:file-content", kwargs={"file_id": home.file.id})
    )
    assert download.status_code == 200 and b"".join(download.streaming_content) == JSONL
    assert download["Content-Disposition"] == 'attachment; filename="train.jsonl"'
    foreign = reverse("console:file-content", kwargs={"file_id": world["foreign"].file.id})
    assert client.get(foreign).status_code == 404


def test_admin_removes_a_member_but_never_the_last_admin(world):
    home = world["home"].tenant
    users = world["users"]
    client = _client(world, "admin")
    page = client.get(reverse("console:members")).content.decode()
    # Each row has a remove button that asks first (confirm.js reads data-confirm).
    assert page.count('aria-label="Remove ') == 3 and page.count("data-confirm=") == 3
    mine = Membership.objects.get(tenant=home, user=users["admin"])
    member = Membership.objects.get(tenant=home, user=users["member"])

    response = client.post(reverse("console:member-remove", args=[member.id]))
    assert response.status_code == 302
    assert not Membership.objects.filter(pk=member.pk).exists()
    removed = AuditEvent.objects.get(object_type="membership", object_id="member-user")
    assert removed.actor == "user:admin-user" and removed.status_code == 302
    assert "/remove/" in removed.action
    # The removed person is out: the console refuses them.
    assert _client(world, "member").get(reverse("console:dashboard")).status_code == 403

    # The last admin can neither be removed nor demoted; both are refused and logged.
    response = client.post(reverse("console:member-remove", args=[mine.id]))
    assert response.status_code == 409
    assert "last admin" in response.content.decode()
    response = client.post(reverse("console:members"), {"username": "admin-user", "role": "member"})
    assert response.status_code == 409 and "last admin" in response.content.decode()
    mine.refresh_from_db()
    assert mine.role == "admin"
    refused = AuditEvent.objects.filter(object_id="admin-user", status_code=409)
    assert refused.count() == 2

    # With a second admin, the first may step down.
    assert (
        client.post(
            reverse("console:members"), {"username": "auditor-user", "role": "admin"}
        ).status_code
        == 302
    )
    response = client.post(reverse("console:members"), {"username": "admin-user", "role": "member"})
    assert response.status_code == 302
    mine.refresh_from_db()
    assert mine.role == "member"


def test_membership_remove_service_rules(world):
    from django.core.exceptions import PermissionDenied, ValidationError
    from django.http import Http404

    from controlplane.tenancy.services import membership_remove

    home, foreign = world["home"].tenant, world["foreign"].tenant
    member = Membership.objects.get(tenant=home, user=world["users"]["member"])
    theirs = Membership.objects.get(tenant=foreign)
    for role in ("member", "auditor"):
        with pytest.raises(PermissionDenied):
            membership_remove(tenant=home, membership_id=member.id, by_role=role)
    with pytest.raises(Http404):  # another tenant's membership is not found, not refused
        membership_remove(tenant=home, membership_id=theirs.id, by_role="admin")
    with pytest.raises(ValidationError, match="last admin"):
        membership_remove(tenant=foreign, membership_id=theirs.id, by_role="admin")
    assert Membership.objects.filter(pk__in=[member.pk, theirs.pk]).count() == 2
    removed = membership_remove(tenant=home, membership_id=member.id, by_role="admin")
    assert removed.user == world["users"]["member"]
    assert not Membership.objects.filter(pk=member.pk).exists()


def test_upload_shows_validation_errors_with_line_numbers(world):
    from django.core.files.uploadedfile import SimpleUploadedFile

    client = _client(world, "member")
    bad = b'{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n'
    upload = SimpleUploadedFile("bad.jsonl", bad, content_type="application/jsonl")
    response = client.post(reverse("console:files"), {"file": upload, "purpose": "fine-tune"})
    assert response.status_code == 302
    page = client.get(response["Location"]).content.decode()
    assert "error" in page and '<td class="num">2</td>' in page
    assert File.objects.get(filename="bad.jsonl").status == "error"


def test_audit_filter_and_csv(world):
    from controlplane.audit.services import audit_event_record

    home = world["home"]
    audit_event_record(tenant=home.tenant, actor="key:enc_a", action="POST /v1/files")
    audit_event_record(tenant=home.tenant, actor="user:admin-user", action="POST /console/keys/")
    audit_event_record(tenant=world["foreign"].tenant, actor="key:enc_z", action="POST /v1/x")
    client = _client(world, "auditor")
    response = client.get(reverse("console:audit"), {"actor": "key:"})
    assert [e.action for e in response.context["events"]] == ["POST /v1/files"]
    assert "<code>POST /v1/files</code>" in response.content.decode()
    response = client.get(reverse("console:audit-csv"), {"action": "console"})
    body = b"".join(response.streaming_content).decode()
    lines = body.strip().splitlines()
    assert lines[0].startswith("created_at,actor,action")
    assert len(lines) == 2 and "user:admin-user" in lines[1]
    assert "attachment" in response["Content-Disposition"]
    # A value a spreadsheet would run as a formula is exported as text.
    audit_event_record(tenant=home.tenant, actor="user:x", action="POST", object_id="=HYPERLINK(1)")
    response = client.get(reverse("console:audit-csv"), {"actor": "user:x"})
    body = b"".join(response.streaming_content).decode()
    assert ",'=HYPERLINK(1)," in body and ",=HYPERLINK" not in body


def test_progress_json_returns_metric_points_after_a_cursor(world):
    from controlplane.tuning.models import FineTuningEvent

    job = world["home"].job
    for step in (1, 2, 3):
        FineTuningEvent.objects.create(
            job=job, type="metrics", message=f"step {step}",
            data={"step": step, "loss": 3.0 / step, "token_accuracy": 0.1 * step},
        )  # fmt: skip
    client = _client(world, "auditor")
    url = reverse("console:job-progress", kwargs={"job_id": job.id})
    data = client.get(url).json()
    assert [p["step"] for p in data["points"]] == [1, 2, 3]
    assert data["points"][2]["loss"] == pytest.approx(1.0)
    after = data["points"][1]["id"]
    assert [p["step"] for p in client.get(url, {"after": after}).json()["points"]] == [3]


def test_federation_create_invite_accept_start_round(world, base_model):
    from controlplane.federation.models import FederatedRound, Federation, Participant

    home, foreign = world["home"], world["foreign"]
    owner = _client(world, "admin")
    response = owner.post(
        reverse("console:federations"),
        {
            "name": "Sepsis early warning", "base_model": base_model,
            "training_file": home.file.id, "min_participants": 2, "schedule": "0 2 * * *",
            "aggregation": "fedavg", "local_steps": 2, "lora_r": 4,
        },
    )  # fmt: skip
    assert response.status_code == 302, response.content.decode()[-2000:]
    federation = Federation.objects.get(name="Sepsis early warning")
    assert federation.owner == home.tenant and federation.schedule == "0 2 * * *"
    detail = reverse("console:federation", args=[federation.id])
    assert response["Location"] == detail

    # Too few members with data: the round is refused with a message, nothing is queued.
    start = reverse("console:federation-round-start", args=[federation.id])
    page = owner.post(start, follow=True).content.decode()
    assert "needs 2" in page and not federation.rounds.exists()

    invite = reverse("console:federation-invite", args=[federation.id])
    assert owner.post(invite, {"tenant": "globex"}).status_code == 302
    guest = _client(world, "foreign-admin")
    page = guest.get(detail).content.decode()
    assert "You are invited" in page and "Sepsis early warning" in page
    # The guest is not the owner: it may not invite (the service's rule, shown as 403).
    assert guest.post(invite, {"tenant": "acme"}).status_code == 403
    accept = reverse("console:federation-accept", args=[federation.id])
    assert guest.post(accept, {"training_file": foreign.file.id}).status_code == 302
    seat = Participant.objects.get(federation=federation, tenant=foreign.tenant)
    assert seat.status == "accepted" and seat.accepted_by == "user:foreign-admin"
    assert seat.training_file_id == foreign.file.id
    # The guest cannot start the owner's rounds.
    assert guest.post(start).status_code == 403

    assert owner.post(start).status_code == 302
    fed_round = FederatedRound.objects.get(federation=federation)
    assert fed_round.number == 1 and fed_round.status == "queued"
    page = owner.get(detail).content.decode()
    assert 'id="rounds-table"' in page and "Globex Clinic" in page
    rounds = owner.get(reverse("console:federation-rounds", args=[federation.id])).json()
    assert [r["number"] for r in rounds["rounds"]] == [1] and rounds["busy"] is True
    actions = set(
        AuditEvent.objects.filter(object_type__startswith="federation").values_list(
            "actor", "status_code"
        )
    )
    assert ("user:foreign-admin", 403) in actions and ("user:admin-user", 302) in actions


def test_member_pauses_resumes_and_cancels_a_job(world):
    job = world["home"].job
    client = _client(world, "member")

    def act(action: str) -> str:
        response = client.post(reverse("console:job-action", args=[job.id, action]), follow=True)
        assert response.status_code == 200
        job.refresh_from_db()
        return response.content.decode()

    act("pause")
    assert job.status == "paused"
    act("resume")
    assert job.status == "queued"
    act("cancel")
    assert job.status == "cancelled"
    page = act("resume")  # a finished job cannot: a message, not an error page
    assert job.status == "cancelled" and "Cannot resume" in page
    logged = AuditEvent.objects.filter(object_type="fine_tuning.job", object_id=job.id)
    assert logged.count() == 4 and {e.actor for e in logged} == {"user:member-user"}


def test_playground_and_models_list_federated_models_of_own_federations_only(world):
    from controlplane.federation.models import FederatedRound, GlobalAdapter

    ids = {}
    for side in ("home", "foreign"):
        federation = world[side].federation
        fed_round = FederatedRound.objects.create(
            federation=federation, number=1, status="succeeded"
        )
        ids[side] = f"fed:enclave-test:{federation.id}:r1"
        GlobalAdapter.objects.create(id=ids[side], federation=federation, round=fed_round)
    client = _client(world, "member")
    playground = client.get(reverse("console:playground")).context["model_names"]
    assert ids["home"] in playground and world["home"].adapter.id in playground
    assert ids["foreign"] not in playground and world["foreign"].adapter.id not in playground
    models_page = client.get(reverse("console:models")).content.decode()
    assert ids["home"] in models_page and ids["foreign"] not in models_page


def test_federation_with_differential_privacy_shows_its_budget(world, base_model):
    from controlplane.federation.models import Federation

    owner = _client(world, "admin")
    form = {
        "name": "Private", "base_model": base_model, "training_file": world["home"].file.id,
        "min_participants": 1, "aggregation": "fedavg", "local_steps": 1, "lora_r": 2,
        "dp_noise_multiplier": 1.1,
    }  # fmt: skip
    response = owner.post(reverse("console:federations"), form)
    assert response.status_code == 400 and "needs a clip norm" in response.content.decode()
    response = owner.post(
        reverse("console:federations"), {**form, "dp_clip_norm": 1.0, "dp_max_epsilon": 8}
    )
    assert response.status_code == 302, response.content.decode()[-1500:]
    federation = Federation.objects.get(name="Private")
    assert federation.settings["dp"] == {
        "noise_multiplier": 1.1,
        "clip_norm": 1.0,
        "max_epsilon": 8,
    }
    page = owner.get(response["Location"]).content.decode()
    assert "0.000 of 8" in page


def test_console_login_is_rate_limited(db, settings):
    from django.contrib.auth import get_user_model

    settings.ENCLAVE_LOGIN_FAILURES_ALLOWED = 3
    get_user_model().objects.create_user("nurse-rl", password="correct horse battery")
    client = Client(REMOTE_ADDR="10.0.0.7")  # not 127.0.0.1: other tests log in from there
    url = reverse("console:login")
    for _ in range(3):
        wrong = client.post(url, {"username": "nurse-rl", "password": "wrong"})
        assert wrong.status_code == 200  # the form again, with an error
    blocked = client.post(url, {"username": "nurse-rl", "password": "correct horse battery"})
    assert blocked.status_code == 429 and int(blocked["Retry-After"]) > 0
    other = Client(REMOTE_ADDR="10.0.0.9").post(url, {"username": "someone-else", "password": "x"})
    assert other.status_code == 200  # another user from another address is not blocked


def test_deleting_a_file_a_job_uses_says_why_and_keeps_it(world):
    objs = world["home"]
    client = _client(world, "member")
    url = reverse("console:file-delete", kwargs={"file_id": objs.file.id})
    response = client.post(url, follow=True)
    assert response.status_code == 200
    page = response.content.decode()
    assert "used by a fine-tuning job" in page and objs.file.id in page
    assert File.objects.filter(pk=objs.file.pk).exists()


def test_upload_of_invalid_utf8_is_refused_naming_the_line_and_stores_nothing(world):
    from django.core.files.uploadedfile import SimpleUploadedFile

    client = _client(world, "member")
    before = File.objects.count()
    bad = b'{"messages": [{"role": "user", "content": "hi"}]}\n{"x": "\xff\xfe"}\n'
    upload = SimpleUploadedFile("latin.jsonl", bad, content_type="application/jsonl")
    response = client.post(reverse("console:files"), {"file": upload, "purpose": "fine-tune"})
    assert response.status_code == 400
    assert "UTF-8" in response.content.decode() and "line 2" in response.content.decode()
    assert File.objects.count() == before
