"""/healthz answers whatever else is down; /readyz says what is down.

The failure cases run in a real process whose settings point at closed ports."""

import json
import subprocess
import sys

import pytest

from controlplane import launch
from tests.controlplane.test_foundation import REPO, _clean_env


def _get_in_process(path: str, tmp_path, **env) -> tuple[int, dict]:
    code = (
        f'from django.test import Client; r = Client(HTTP_HOST="localhost").get({path!r}); '
        "print(r.status_code, r.content.decode())"
    )
    out = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=REPO,
        env=_clean_env(ENCLAVE_VAR_DIR=str(tmp_path), **env),
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()[-1]
    status, body = out.split(" ", 1)
    return int(status), json.loads(body)


def _closed_port_urls() -> dict[str, str]:
    return {
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:{launch.free_port()}/nothing",
        "CELERY_BROKER_URL": f"redis://127.0.0.1:{launch.free_port()}/0",
    }


def test_healthz_depends_on_nothing(tmp_path):
    status, body = _get_in_process("/healthz", tmp_path, **_closed_port_urls())
    assert (status, body) == (200, {"status": "ok"})


@pytest.mark.django_db
def test_readyz_is_ready_with_database_and_broker(client):
    response = client.get("/readyz")
    assert response.status_code == 200, response.content
    assert response.json() == {"status": "ready"}


def test_readyz_names_an_unreachable_broker(tmp_path, test_database_url):
    urls = _closed_port_urls()
    status, body = _get_in_process(
        "/readyz",
        tmp_path,
        DATABASE_URL=test_database_url,
        CELERY_BROKER_URL=urls["CELERY_BROKER_URL"],
    )
    assert status == 503
    assert body["status"] == "unavailable"
    assert len(body["reasons"]) == 1 and body["reasons"][0].startswith("broker unreachable")


def test_readyz_names_an_unreachable_database(tmp_path):
    urls = _closed_port_urls()
    status, body = _get_in_process("/readyz", tmp_path, DATABASE_URL=urls["DATABASE_URL"])
    assert status == 503
    assert len(body["reasons"]) == 1 and body["reasons"][0].startswith("database unreachable")


def test_readyz_names_both_when_both_are_down(tmp_path):
    status, body = _get_in_process("/readyz", tmp_path, **_closed_port_urls())
    assert status == 503
    assert [r.split(" ")[0] for r in body["reasons"]] == ["database", "broker"]
