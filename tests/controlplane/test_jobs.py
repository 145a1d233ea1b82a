"""The job pattern with real parts: Redis, a real `celery worker` process, PostgreSQL."""

import os
import platform
import signal
from datetime import timedelta

import psutil
import pytest
from django.utils import timezone

from controlplane.celery import app as celery_app
from controlplane.jobs import services
from controlplane.jobs.models import DiagnosticJob, LeasedJob
from tests.conftest import wait_for

S = LeasedJob.Status


def _reload(job: DiagnosticJob) -> DiagnosticJob:
    return DiagnosticJob.objects.get(pk=job.pk)


def _finished(job: DiagnosticJob):
    fresh = _reload(job)
    return fresh if fresh.status in LeasedJob.TERMINAL else None


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_real_worker_process_runs_a_job_sent_through_redis(celery_worker):
    job = services.diagnostic_job_create(steps=3)

    done = wait_for(lambda: _finished(job), timeout=60, what="the worker to finish the job")

    assert done.status == S.SUCCEEDED, done.error
    assert (done.attempts, done.progress) == (1, 3)
    # Written by a pool process of the worker we started, not by this test process.
    pool = {child.pid for child in psutil.Process(celery_worker.pid).children(recursive=True)}
    assert done.result["worker_pid"] != os.getpid()
    assert done.result["worker_pid"] in pool
    assert done.result["system"] == platform.system()
    assert done.lease_owner == "" and done.lease_expires_at is None


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_duplicate_delivery_does_nothing(celery_worker):
    job = services.diagnostic_job_create(steps=1)
    done = wait_for(lambda: _finished(job), timeout=60, what="the first delivery")

    for _ in range(2):  # a broker redelivering the same message, twice
        celery_app.send_task(DiagnosticJob.run_task, args=[job.pk], queue="default")
    wait_for(
        lambda: celery_worker.log_text().count("nothing to claim") >= 2,
        timeout=30,
        what="the worker to handle both duplicates",
    )

    again = _reload(job)
    assert again.status == S.SUCCEEDED
    assert again.attempts == 1
    assert again.finished_at == done.finished_at
    assert again.result == done.result


@pytest.mark.django_db
def test_second_claim_of_the_same_job_gets_nothing():
    job = DiagnosticJob.objects.create(steps=1)

    first = services.job_claim(model=DiagnosticJob, job_id=job.pk, owner="a")
    second = services.job_claim(model=DiagnosticJob, job_id=job.pk, owner="b")

    assert first is not None and first.lease_owner == "a" and first.status == S.RUNNING
    assert second is None
    assert _reload(job).lease_owner == "a"


@pytest.mark.django_db
def test_a_worker_that_lost_its_lease_cannot_write():
    job = DiagnosticJob.objects.create(steps=2)
    mine = services.job_claim(model=DiagnosticJob, job_id=job.pk, owner="slow-worker")
    # The reaper took it back, and another worker claimed it.
    DiagnosticJob.objects.filter(pk=job.pk).update(lease_expires_at=timezone.now())
    assert services.job_reap_expired(now=timezone.now() + timedelta(seconds=1)) == 1
    services.job_claim(model=DiagnosticJob, job_id=job.pk, owner="other-worker")

    with pytest.raises(services.LeaseLost):
        services.job_renew_lease(job=mine, progress=1)
    assert services.job_complete(job=mine, status=S.SUCCEEDED) is False

    row = _reload(job)
    assert (row.lease_owner, row.progress, row.status) == ("other-worker", 0, S.RUNNING)


@pytest.mark.django_db
def test_reaper_leaves_live_leases_alone_and_fails_jobs_out_of_attempts(settings):
    settings.ENCLAVE_JOB_MAX_ATTEMPTS = 2
    live = DiagnosticJob.objects.create(steps=1)
    services.job_claim(model=DiagnosticJob, job_id=live.pk, owner="alive")
    worn = DiagnosticJob.objects.create(
        steps=1,
        status=S.RUNNING,
        attempts=2,
        lease_owner="dead",
        lease_expires_at=timezone.now() - timedelta(seconds=5),
    )

    assert services.job_reap_expired() == 0

    assert _reload(live).status == S.RUNNING
    worn = _reload(worn)
    assert worn.status == S.FAILED
    assert "lease expired after 2 attempts" in worn.error


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_expired_lease_is_requeued_and_resumes_from_its_checkpoint(celery_worker):
    # A job whose worker died after two of four steps: running, lease long expired.
    job = DiagnosticJob.objects.create(
        steps=4,
        progress=2,
        status=S.RUNNING,
        attempts=1,
        lease_owner="dead-host:1:deadbeef",
        lease_expires_at=timezone.now() - timedelta(seconds=30),
    )

    assert services.job_reap_expired() == 1
    done = wait_for(lambda: _finished(job), timeout=60, what="the re-queued job")

    assert done.status == S.SUCCEEDED, done.error
    assert (done.attempts, done.progress) == (2, 4)
    assert "resumed at step 2" in celery_worker.log_text()


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_job_survives_its_worker_being_killed(start_worker):
    first = start_worker()
    job = services.diagnostic_job_create(steps=12, step_seconds=0.25)
    wait_for(lambda: _reload(job).progress >= 2, timeout=60, what="the job to make progress")

    first.kill(signal.SIGKILL)
    first.proc.wait(timeout=10)
    stopped_at = _reload(job).progress
    second = start_worker()
    # The lease (3 s in the workers) must expire before the reaper may take the job back.
    wait_for(lambda: services.job_reap_expired() == 1, timeout=30, what="the lease to expire")
    done = wait_for(lambda: _finished(job), timeout=60, what="the second worker")

    assert done.status == S.SUCCEEDED, done.error
    assert done.attempts == 2
    assert done.progress == 12
    assert f"resumed at step {stopped_at}" in second.log_text()
    assert done.result["worker_pid"] in {c.pid for c in psutil.Process(second.pid).children()}


def test_train_queue_is_one_at_a_time_late_ack_json_only():
    conf = celery_app.conf
    assert {q.name for q in conf.task_queues} == {"default", "train"}
    assert conf.worker_prefetch_multiplier == 1
    assert conf.task_acks_late and conf.task_reject_on_worker_lost
    assert conf.accept_content == ["json"] and conf.task_serializer == "json"
    assert conf.task_time_limit and conf.task_soft_time_limit < conf.task_time_limit
    assert conf.beat_schedule["reap-expired-job-leases"]["task"] == "jobs.reap_expired_leases"
    celery_app.loader.import_default_modules()  # what a worker does at start: autodiscovery
    assert {"jobs.reap_expired_leases", "jobs.run_diagnostic"} <= set(celery_app.tasks)


@pytest.mark.slow
@pytest.mark.django_db(transaction=True)
def test_pause_resume_and_cancel_a_running_job(celery_worker):
    job = services.diagnostic_job_create(steps=40, step_seconds=0.1)
    wait_for(lambda: _reload(job).progress >= 2, timeout=60, what="progress")

    services.job_request_stop(job=_reload(job), what="pause")
    paused = wait_for(
        lambda: (j := _reload(job)).status == S.PAUSED and j, timeout=30, what="the pause"
    )
    assert 2 <= paused.progress < 40 and paused.stop_request == ""
    services.job_resume(job=paused)
    wait_for(lambda: _reload(job).progress > paused.progress, timeout=30, what="resumed work")
    assert f"resumed at step {paused.progress}" in celery_worker.log_text()

    services.job_request_stop(job=_reload(job), what="cancel")
    done = wait_for(lambda: _finished(job), timeout=30, what="the cancel")
    assert done.status == S.CANCELLED and done.progress < 40

    with pytest.raises(ValueError, match="cannot cancel a job that is cancelled"):
        services.job_request_stop(job=done, what="cancel")
    with pytest.raises(ValueError, match="cannot resume a job that is cancelled"):
        services.job_resume(job=done)


@pytest.mark.django_db
def test_queued_jobs_stop_at_once():
    queued = DiagnosticJob.objects.create(steps=1)
    assert services.job_request_stop(job=queued, what="pause").status == S.PAUSED
    assert services.job_request_stop(job=queued, what="cancel").status == S.CANCELLED
    with pytest.raises(ValueError, match="unknown stop request"):
        services.job_request_stop(job=queued, what="explode")
