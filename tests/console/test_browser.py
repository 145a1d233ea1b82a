"""The console in a real headless Chromium (Debian's), against a real uvicorn process.

Playwright drives /usr/bin/chromium with background networking off; nothing is
downloaded. A real Celery worker trains the job whose curve the browser watches grow.
Screenshots go to the run's data directory (see SCREENSHOTS).
"""

import os
import re
from pathlib import Path

import pytest
from django.conf import settings
from django.test import Client
from playwright.sync_api import expect

from controlplane.audit.models import AuditEvent
from controlplane.tenancy.models import ApiKey
from controlplane.tuning.models import FineTuningJob

from .conftest import JSONL

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Screenshots go to the run's data directory; ENCLAVE_CONSOLE_SCREENSHOTS=docs/console
# refreshes the README's (a normal run leaves the tracked files alone).
SCREENSHOTS = Path(
    os.environ.get("ENCLAVE_CONSOLE_SCREENSHOTS") or Path(settings.VAR_DIR) / "screenshots"
)
LAPTOP = {"width": 1280, "height": 860}
expect.set_options(timeout=45_000)  # as the pages' default: a busy shared machine
TABLET = {"width": 820, "height": 1180}


@pytest.fixture(scope="module")
def browser(console_url):
    """Playwright's sync API keeps an event loop running in this thread, so Django's
    async-safety check would refuse the tests' own ORM calls: allow them for this module
    only, after the server's environment was taken (the server keeps the check)."""
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    os.environ["DJANGO_ALLOW_ASYNC_UNSAFE"] = "true"
    try:
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True
            )
            yield browser
            browser.close()
    finally:
        os.environ.pop("DJANGO_ALLOW_ASYNC_UNSAFE", None)


@pytest.fixture
def people(django_user_model):
    from controlplane.tenancy.services import membership_set, tenant_create

    home = tenant_create(slug="stmarys", name="St Mary's Hospital", vertical="medical")
    foreign = tenant_create(slug="northbank", name="North Bank", vertical="finance")
    users = {}
    for role in ("admin", "member", "auditor"):
        users[role] = django_user_model.objects.create_user(username=f"{role}-user")
        membership_set(tenant=home, user=users[role], role=role)
    membership_set(tenant=foreign, user=users["admin"], role="member")
    return {"home": home, "foreign": foreign, "users": users}


def _page(browser, url: str, user=None, viewport=LAPTOP, tenant=None):
    """A fresh browser context, logged in as `user` by a session cookie (no password),
    working in `tenant` when given."""
    context = browser.new_context(viewport=viewport, base_url=url, accept_downloads=True)
    context.set_default_timeout(45_000)  # a busy shared machine: generous, never a sleep
    if user is not None:
        client = Client()
        client.force_login(user)
        if tenant is not None:
            session = client.session
            session["console_tenant_id"] = tenant.id
            session.save()
        sid = client.cookies[settings.SESSION_COOKIE_NAME].value
        context.add_cookies([{"name": settings.SESSION_COOKIE_NAME, "value": sid, "url": url}])
    page = context.new_page()
    # Script errors and Content-Security-Policy violations fail the test (see _close).
    page.problems = []
    page.on("pageerror", lambda error: page.problems.append(f"script error: {error}"))
    page.on(
        "console",
        lambda m: page.problems.append(m.text) if "Content Security Policy" in m.text else None,
    )
    return page


def _close(page) -> None:
    problems = page.problems
    page.context.close()
    assert problems == []


def _file(tenant, data: bytes = JSONL, name: str = "train.jsonl"):
    from controlplane.files.services import file_create

    return file_create(
        tenant=tenant, filename=name, purpose="fine-tune", chunks=[data], size=len(data)
    )


def test_login_then_upload_shows_progress_and_line_numbered_errors(
    browser, console_url, people, django_user_model
):
    user = people["users"]["member"]
    user.set_password("correct horse battery staple")
    user.save()
    page = _page(browser, console_url)
    page.goto("/console/files/")
    assert "/console/login/" in page.url  # not logged in: sent to the login page
    page.get_by_label("Username").fill("member-user")
    page.get_by_label("Password").fill("wrong")
    page.get_by_role("button", name="Log in").click()
    expect(page.get_by_role("alert")).to_have_count(1)
    assert "/console/login/" in page.url
    page.get_by_label("Password").fill("correct horse battery staple")
    page.get_by_label("Password").press("Enter")  # the keyboard alone submits
    page.wait_for_url("**/console/files/")

    bad = b'{"messages": [{"role": "user", "content": "hi"}]}\n{"messages": [}\n' + JSONL
    page.get_by_label("File (JSONL)").set_input_files(
        {"name": "notes.jsonl", "mimeType": "application/jsonl", "buffer": bad}
    )
    page.get_by_label("Purpose").select_option("fine-tune")
    with page.expect_request("**/console/files/") as upload:
        page.get_by_role("button", name="Upload").click()
    # Sent by the progress bar's script, not a plain form post.
    assert upload.value.headers.get("x-requested-with") == "XMLHttpRequest"
    page.wait_for_url("**/console/files/file-*/")
    assert page.get_by_test_id("file-status").inner_text() == "error"
    assert page.get_by_test_id("n-errors").inner_text().startswith("3 errors")
    assert "failed validation" in page.get_by_role("status").first.inner_text()
    rows = page.locator("table.validation tbody tr")
    lines = [rows.nth(i).locator("td").first.inner_text() for i in range(rows.count())]
    assert set(lines) == {"1", "2"}, lines  # both bad lines, by number; the rest are fine
    assert "invalid JSON" in rows.nth(lines.index("2")).inner_text()
    page.screenshot(path=str(SCREENSHOTS / "file-validation.png"), full_page=True)
    # The upload is in the audit log, by name.
    event = AuditEvent.objects.get(object_type="file")
    assert event.actor == "user:member-user" and event.status_code == 201
    _close(page)


def test_job_curve_gains_points_while_it_runs_then_cancel(
    browser, console_url, people, base_model, celery_worker
):
    home = people["home"]
    training = _file(home)
    page = _page(browser, console_url, people["users"]["member"])
    page.goto("/console/jobs/new/")
    page.get_by_label("Base model").select_option(base_model)
    page.get_by_label("Training file").select_option(training.id)
    page.get_by_label("Epochs").fill("100")
    page.get_by_label("Batch size").fill("2")
    page.get_by_label("Learning-rate multiplier").fill("25")  # a curve that visibly falls
    page.get_by_label("Max steps").fill("400")
    page.get_by_label("Max sequence length").fill("96")
    page.get_by_label("Checkpoint every (steps)").fill("0")
    page.get_by_label("Model name suffix").fill("triage")
    page.get_by_role("button", name="Create job").click()
    page.wait_for_url("**/console/jobs/ftjob-*/")
    job = FineTuningJob.objects.get(tenant=home)

    # The chart grows while the job runs, without reloading the page.
    points = page.get_by_test_id("chart-points")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=chart-points]').dataset.count >= 3",
        timeout=120_000,
    )
    first = int(points.get_attribute("data-count"))
    page.wait_for_function(
        f"() => document.querySelector('[data-testid=chart-points]').dataset.count > {first}",
        timeout=60_000,
    )
    assert page.get_by_test_id("job-status").inner_text() == "running"
    assert page.locator("#chart-loss canvas").count() == 1
    assert page.locator("#events li").count() >= 2
    page.screenshot(path=str(SCREENSHOTS / "job-progress.png"), full_page=True)

    page.get_by_role("button", name="Cancel job").click()
    page.wait_for_url(f"**/console/jobs/{job.id}/")
    page.wait_for_function(
        "() => document.getElementById('job-status').textContent === 'cancelled'",
        timeout=60_000,
    )
    job.refresh_from_db()
    assert job.status == "cancelled"
    expect(page.get_by_role("button", name="Cancel job")).to_be_disabled()
    _close(page)


def test_playground_streams_an_answer_and_shows_token_usage(
    browser, console_url, people, base_model
):
    page = _page(browser, console_url, people["users"]["member"])
    page.goto(f"/console/playground/?model={base_model}")
    assert page.get_by_label("Model").input_value() == base_model
    # Count how many times the answer grows: a streamed answer arrives in pieces.
    page.evaluate(
        """() => {
          window.answerUpdates = 0;
          new MutationObserver((records) => { window.answerUpdates += records.length; }).observe(
            document.getElementById('transcript'),
            {subtree: true, childList: true, characterData: true});
        }"""
    )
    page.get_by_label("Max tokens").fill("24")
    page.get_by_label("Temperature").fill("1")
    page.get_by_label("Seed").fill("7")  # the same answer every run, so the count is stable
    page.get_by_label("Message").fill("Summarise the discharge note.")
    # The first answer loads the model into the web process: allow for a busy machine.
    with page.expect_response("**/console/playground/stream", timeout=120_000) as streamed:
        page.get_by_role("button", name="Send").click()
    assert streamed.value.headers["content-type"] == "text/event-stream"
    usage = page.get_by_test_id("chat-usage")
    page.wait_for_function(
        "() => document.querySelector('[data-testid=chat-usage]').textContent"
        ".startsWith('Tokens:')",
        timeout=90_000,
    )
    assert "completion" in usage.inner_text()
    assert page.get_by_role("button", name="Stop").is_hidden()
    total = int(usage.get_attribute("data-total"))
    assert total > 0
    assert page.locator("#transcript li.user").inner_text() == "Summarise the discharge note."
    # The answer was re-rendered once per streamed delta, as each arrived.
    deltas = int(page.locator("#transcript li.assistant").get_attribute("data-deltas"))
    assert deltas >= 3
    assert page.evaluate("window.answerUpdates") >= 2 + deltas  # two bubbles, then deltas
    page.screenshot(path=str(SCREENSHOTS / "playground.png"), full_page=True)
    from controlplane.tenancy.models import DailyUsage

    row = DailyUsage.objects.get(tenant=people["home"])
    assert row.prompt_tokens + row.completion_tokens == total
    _close(page)


def test_api_key_shown_once_revoked_and_audit_exported(browser, console_url, people, tmp_path):
    page = _page(browser, console_url, people["users"]["admin"], tenant=people["home"])
    page.goto("/console/keys/")
    page.get_by_label("Name").fill("lab-integration")
    page.get_by_label("Role").select_option("member")
    page.get_by_role("button", name="Create key").click()
    raw = page.get_by_test_id("raw-key").input_value()
    key = ApiKey.objects.get(name="lab-integration")
    assert raw.startswith(key.prefix + "_")
    page.goto("/console/keys/")
    assert raw not in page.content()  # shown once
    page.get_by_role("button", name=f"Revoke {key.prefix}").click()
    expect(page.locator(f"tr[data-prefix='{key.prefix}']")).to_contain_text("revoked")
    key.refresh_from_db()
    assert key.revoked_at is not None

    page.goto("/console/audit/")
    page.get_by_label("Action").fill("keys")
    page.get_by_role("button", name="Filter").click()
    table = page.locator("#audit-table tbody")
    expect(table.locator("tr")).to_have_count(2)  # the create and the revoke
    assert "/revoke/" in table.inner_text()
    with page.expect_download() as download:
        page.get_by_role("link", name="Export CSV").click()
    path = tmp_path / "audit.csv"
    download.value.save_as(path)
    lines = path.read_text().strip().splitlines()
    assert lines[0].startswith("created_at,actor,action") and len(lines) == 3
    assert all("user:admin-user" in line and key.prefix in line for line in lines[1:])
    _close(page)


def test_a_member_is_removed_only_after_confirming(browser, console_url, people):
    from controlplane.tenancy.models import Membership

    page = _page(browser, console_url, people["users"]["admin"], tenant=people["home"])
    page.goto("/console/members/")
    remove = page.get_by_role("button", name="Remove member-user")
    questions = []

    def answer(dialog, accept: bool) -> None:
        questions.append(dialog.message)
        dialog.accept() if accept else dialog.dismiss()

    page.once("dialog", lambda d: answer(d, accept=False))
    remove.click()
    expect(page.locator("#members-table tbody tr")).to_have_count(3)
    assert Membership.objects.filter(user=people["users"]["member"]).exists()
    page.once("dialog", lambda d: answer(d, accept=True))
    remove.click()
    expect(page.get_by_role("status")).to_contain_text("Removed member-user")
    expect(page.locator("#members-table tbody tr")).to_have_count(2)
    assert questions == ["Remove member-user from St Mary's Hospital? They lose access to "
                         "everything in this tenant."] * 2  # fmt: skip
    assert not Membership.objects.filter(
        tenant=people["home"], user=people["users"]["member"]
    ).exists()
    # The last admin's own button is refused with a message, and nothing changes.
    page.once("dialog", lambda d: answer(d, accept=True))
    page.get_by_role("button", name="Remove admin-user").click()
    expect(page.get_by_role("alert")).to_contain_text("last admin")
    assert Membership.objects.get(tenant=people["home"], user=people["users"]["admin"])
    _close(page)


def test_roles_in_the_browser(browser, console_url, people):
    home, foreign = people["home"], people["foreign"]
    mine = _file(home)
    theirs = _file(foreign, name="ledger.jsonl")
    page = _page(browser, console_url, people["users"]["auditor"], viewport=TABLET)
    page.goto(f"/console/files/{mine.id}/")
    assert page.get_by_role("button", name="Delete file").count() == 0
    for path in ("/console/files/", "/console/keys/", "/console/members/", "/console/models/"):
        page.goto(path)
        assert page.locator("main form[method=post]").count() == 0, path
    # Usable on a tablet: nothing is wider than the screen.
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")
    # A hand-made POST with a valid CSRF token is still refused.
    status = page.evaluate(
        """async (url) => {
          const token = document.querySelector('input[name=csrfmiddlewaretoken]').value;
          const r = await fetch(url, {method: 'POST', headers: {'X-CSRFToken': token}});
          return r.status;
        }""",
        f"/console/files/{mine.id}/delete/",
    )
    assert status == 403
    # Another tenant's file is not found, even by its exact id.
    assert page.goto(f"/console/files/{theirs.id}/").status == 404
    assert AuditEvent.objects.filter(actor="user:auditor-user", status_code=403).count() == 1
    _close(page)

    # The tenant switcher: the admin is a member in North Bank.
    page = _page(browser, console_url, people["users"]["admin"], tenant=home)
    page.goto("/console/")
    assert page.get_by_role("heading", level=1).inner_text() == "St Mary's Hospital"
    page.get_by_label("Tenant").select_option(label="North Bank (member)")
    page.get_by_role("button", name="Switch").click()
    expect(page.get_by_role("heading", level=1)).to_have_text("North Bank")
    page.goto("/console/files/")
    assert "ledger.jsonl" in page.content() and mine.id not in page.content()
    _close(page)


def test_federation_created_joined_and_a_real_round_charted(
    browser, console_url, people, base_model, django_user_model, celery_worker
):
    """Create, invite and accept in the browser; then "Start the next round now" runs a
    real round: a real Celery worker runs Flower's simulation runtime with both hosted
    members (tiny base model, two local steps, local DP), and the open page shows the
    round succeed with its chart point, its epsilon and the members' nodes online."""
    from controlplane.federation import services as fed_services
    from controlplane.federation.models import FederatedRound, Participant
    from controlplane.tenancy.services import membership_set, tenant_create

    home, foreign = people["home"], people["foreign"]
    _file(home, name="wards.jsonl")
    _file(foreign, name="branches.jsonl")
    guest_admin = django_user_model.objects.create_user(username="northbank-admin")
    membership_set(tenant=foreign, user=guest_admin, role="admin")

    owner = _page(browser, console_url, people["users"]["admin"], tenant=home)
    owner.goto("/console/federations/")
    owner.get_by_label("Name").fill("Sepsis early warning")
    owner.get_by_label("Base model").select_option(base_model)
    owner.get_by_label("Our training file").select_option(index=1)
    owner.get_by_label("Schedule (cron)").fill("0 2 * * *")
    # The smallest real round: two local steps of rank-2 LoRA on short sequences.
    owner.get_by_label("Local steps per round").fill("2")
    owner.get_by_label("LoRA rank").fill("2")
    owner.get_by_label("LoRA alpha").fill("4")
    owner.get_by_label("Batch size").fill("2")
    owner.get_by_label("Max sequence length").fill("64")
    owner.get_by_label("Scored answers per member and round").fill("0")
    owner.get_by_label("Round timeout (seconds)").fill("240")
    owner.get_by_label("DP noise multiplier").fill("1.0")
    owner.get_by_label("DP clip norm").fill("1.0")
    owner.get_by_label("DP budget (ε)").fill("10")
    owner.get_by_role("button", name="Create federation").click()
    owner.wait_for_url("**/console/federations/fed-*/")
    detail = owner.url
    federation_id = detail.rstrip("/").rsplit("/", 1)[-1]
    assert "0 2 * * *" in owner.get_by_test_id("schedule").inner_text()
    owner.get_by_label("Tenant to invite (slug)").fill("northbank")
    owner.get_by_role("button", name="Invite").click()
    expect(owner.locator("#members-table")).to_contain_text("invited")

    guest = _page(browser, console_url, guest_admin)
    guest.goto(detail)
    assert guest.get_by_role("heading", name="You are invited").is_visible()
    guest.get_by_label("Our training file (hosted)").select_option(index=1)
    guest.get_by_role("button", name="Accept").click()
    expect(guest.locator("#members-table .status-accepted")).to_have_count(2)
    expect(guest.locator("#members-table")).to_contain_text("North Bank")
    assert guest.get_by_role("button", name="Start the next round now").count() == 0
    _close(guest)

    # A third member trains on its own premises; its node never connects, so it never
    # replies and must stay offline.
    lakeside = tenant_create(slug="lakeside", name="Lakeside Clinic", vertical="medical")
    fed_services.federation_invite(
        tenant=home, federation_id=federation_id, invitee_slug="lakeside"
    )
    fed_services.participant_accept(
        tenant=lakeside, federation_id=federation_id, node_name="lakeside-node"
    )

    owner.reload()
    for slug in ("stmarys", "northbank", "lakeside"):
        expect(owner.get_by_test_id(f"node-{slug}")).to_contain_text("offline")
    owner.get_by_role("button", name="Start the next round now").click()
    rounds = owner.locator("#rounds-table tbody tr")
    expect(rounds).to_have_count(1)
    expect(rounds.first).to_contain_text(re.compile("queued|running"))  # the worker is quick
    assert FederatedRound.objects.get().number == 1

    # The page polls while the round runs and reloads itself when it ends.
    owner.wait_for_function(
        "() => document.getElementById('federation').dataset.rounds === '1'", timeout=300_000
    )
    fed_round = FederatedRound.objects.get()
    assert fed_round.status == "succeeded", (fed_round.error, celery_worker.log_text()[-3000:])
    expect(rounds.first).to_contain_text("succeeded")
    expect(rounds.first).to_contain_text("northbank, stmarys")
    assert fed_round.metrics["train_loss"] > 0 and 0 < fed_round.epsilon < 10
    expect(rounds.first).to_contain_text(f"{fed_round.metrics['train_loss']:.4f}")
    expect(rounds.first).to_contain_text(f"{fed_round.epsilon:.3f}")
    expect(owner.locator("#epsilon-spent")).to_contain_text(f"{fed_round.epsilon:.3f} of 10")
    # One point in each chart: the round's losses and its cumulative epsilon.
    points = owner.evaluate(
        """async () => {
          const r = await fetch(document.getElementById('federation').dataset.roundsUrl);
          const data = await r.json();
          return data.rounds.filter((x) => x.status === 'succeeded').map((x) =>
            [x.number, x.train_loss, x.epsilon]);
        }"""
    )
    assert points == [[1, fed_round.metrics["train_loss"], fed_round.epsilon]]
    assert owner.locator("#chart-rounds canvas").count() == 1
    assert owner.locator("#chart-epsilon canvas").count() == 1

    # The members whose nodes replied are online; the one that did not is not.
    for slug in ("stmarys", "northbank"):
        expect(owner.get_by_test_id(f"node-{slug}")).to_contain_text("online")
    expect(owner.get_by_test_id("node-lakeside")).to_contain_text("offline")
    seen = dict(
        Participant.objects.filter(federation_id=federation_id).values_list(
            "tenant__slug", "last_seen_at"
        )
    )
    assert seen["stmarys"] and seen["northbank"] and seen["lakeside"] is None
    owner.screenshot(path=str(SCREENSHOTS / "federation.png"), full_page=True)
    _close(owner)
