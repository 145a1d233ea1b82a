"""Jobs under faults, with real processes: a worker killed with SIGKILL mid fine-tune,
Redis killed and restarted mid-job, and the worker's PostgreSQL connection cut."""

import io
import shutil
import signal
import subprocess
import sys
import time

import psutil
import pytest
from django.db import connection

from controlplane import launch
from controlplane.jobs import services as jobs
from controlplane.jobs.models import DiagnosticJob, LeasedJob
from controlplane.tuning.models import Adapter, FineTuningEvent, FineTuningJob
from tests.conftest import wait_for
from tests.controlplane.test_files_api import _chat_jsonl, _client
from tests.controlplane.test_fine_tuning_api import _method

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]


def test_a_fine_tune_survives_its_worker_killed_and_succeeds_exactly_once(
    live_server_url, make_tenant, base_model, start_worker
):
    _tenant, key = make_tenant("bank")
    client = _client(live_server_url, key)
    file_id = client.files.create(
        file=("t.jsonl", io.BytesIO(_chat_jsonl(8))), purpose="fine-tune"
    ).id
    first = start_worker("train")
    job = client.fine_tuning.jobs.create(
        model=base_model, training_file=file_id,
        method=_method(max_steps=14, checkpoint_every=2, batch_size=1),
    )  # fmt: skip
    wait_for(lambda: FineTuningJob.objects.get(pk=job.id).resume_blob_id, timeout=180,
             what="a first checkpoint")  # fmt: skip
    first.kill(signal.SIGKILL)
    first.proc.wait(timeout=10)
    second = start_worker("train")
    wait_for(lambda: jobs.job_reap_expired() == 1, timeout=30, what="the lease to expire")
    done = wait_for(
        lambda: (j := FineTuningJob.objects.get(pk=job.id)).status in LeasedJob.TERMINAL and j,
        timeout=240, what="the second worker to finish",
    )  # fmt: skip

    assert done.status == "succeeded", (done.error, second.log_text()[-2000:])
    assert done.attempts == 2
    assert Adapter.objects.filter(job_id=job.id).count() == 1
    events = FineTuningEvent.objects.filter(job_id=job.id)
    assert events.filter(message="Resuming from the last checkpoint").count() == 1
    steps = sorted({e.data["step"] for e in events.filter(type="metrics")})
    assert steps == list(range(1, 15))  # continuous: no step missing across the crash
    assert events.filter(message__startswith="New fine-tuned model").count() == 1


def _manage(code: str, env: dict) -> str:
    out = subprocess.run(
        [sys.executable, "manage.py", "shell", "-c", code],
        cwd=launch.settings.REPO_DIR, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


def test_redis_killed_and_restarted_mid_job_loses_nothing(process_env, tmp_path):
    redis_server = shutil.which("redis-server") or "/usr/bin/redis-server"
    port = launch.free_port()
    argv = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no"]  # fmt: skip
    redis = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
    env = {**process_env, "CELERY_BROKER_URL": f"redis://127.0.0.1:{port}/0",
           "ENCLAVE_REQUEUE_AFTER_SECONDS": "1"}  # fmt: skip
    worker = launch.ManagedProcess(
        "redis-chaos-worker", launch.worker_command(name="redis-chaos"),
        log_path=tmp_path / "worker.log", env=env,
    )  # fmt: skip
    try:
        worker.wait_for_log("ready.", timeout=60)
        create = ("from controlplane.jobs.services import diagnostic_job_create as c; "
                  "print(c(steps={steps}, step_seconds=0.2).pk)")  # fmt: skip
        running = int(_manage(create.format(steps=25), env))
        wait_for(lambda: DiagnosticJob.objects.get(pk=running).progress >= 2, timeout=60,
                 what="progress")  # fmt: skip

        redis.kill()
        redis.wait(timeout=10)
        # Created while the broker is down: its message cannot be sent.
        orphan = int(_manage(create.format(steps=2), env))
        time.sleep(2)
        redis = subprocess.Popen(argv, stdout=subprocess.DEVNULL, start_new_session=True)
        wait_for(lambda: DiagnosticJob.objects.get(pk=running).status == "succeeded",
                 timeout=90, what="the running job to finish")  # fmt: skip
        assert DiagnosticJob.objects.get(pk=orphan).status == "queued"
        # The reaper rings again for a job queued too long; the reconnected worker runs it.
        _manage("from controlplane.jobs.services import job_reap_expired as r; print(r())", env)
        wait_for(lambda: DiagnosticJob.objects.get(pk=orphan).status == "succeeded",
                 timeout=90, what="the orphaned job")  # fmt: skip
        assert DiagnosticJob.objects.get(pk=running).attempts == 1
    finally:
        worker.stop()
        redis.kill()
        redis.wait(timeout=10)


def test_a_dropped_database_connection_is_replaced(celery_worker):
    from controlplane.jobs.services import diagnostic_job_create

    job = diagnostic_job_create(steps=20, step_seconds=0.2)
    wait_for(lambda: DiagnosticJob.objects.get(pk=job.pk).progress >= 2, timeout=60,
             what="progress")  # fmt: skip
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        assert cursor.fetchone()[0] >= 1  # the worker's connection, at least
    done = wait_for(
        lambda: (j := DiagnosticJob.objects.get(pk=job.pk)).status in LeasedJob.TERMINAL and j,
        timeout=60, what="the job to finish",
    )  # fmt: skip
    assert done.status == "succeeded", done.error
    assert done.attempts == 1 and done.progress == 20
    assert "database connection lost; reconnecting" in celery_worker.log_text()
    assert psutil.pid_exists(celery_worker.pid)
