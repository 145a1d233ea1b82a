"""Writes for the job pattern: enqueue, claim, renew, complete, reap.

Every state change is a single conditional UPDATE, so two workers (or a worker and the
reaper) racing on one row cannot both win.
"""

import logging
import os
import socket
import uuid
from collections.abc import Callable
from datetime import timedelta

from django.apps import apps
from django.conf import settings
from django.db import InterfaceError, OperationalError, connection, transaction
from django.db.models import F
from django.utils import timezone

from controlplane.celery import app as celery_app

from .models import DiagnosticJob, LeasedJob

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """The job is no longer ours: cancelled, or re-queued after our lease expired."""


def _with_reconnect(query):
    """Run a database query; if the connection was dropped (PostgreSQL restarted, a proxy
    cut it), close it and run the query once more on a fresh one."""
    try:
        return query()
    except (OperationalError, InterfaceError):
        if connection.in_atomic_block:
            raise  # inside a transaction the caller must start over
        log.warning("database connection lost; reconnecting")
        connection.close()
        return query()


def worker_identity() -> str:
    """A lease owner name unique to this process and this claim."""
    return f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"


def _ring(model: type[LeasedJob], job_id) -> None:
    """Send the job's message. A broker that is down is not an error here: the row is
    queued, and the reaper rings again once the broker is back."""
    model.objects.filter(pk=job_id).update(bell_rung_at=timezone.now())
    try:
        celery_app.send_task(model.run_task, args=[job_id], queue=model.run_queue, retry=False)
    except Exception:
        log.warning("%s %s: broker unreachable; the reaper will re-send", model.__name__, job_id)


def job_enqueue(*, job: LeasedJob) -> None:
    """Ring the bell for `job` once the surrounding transaction commits."""
    model, job_id = type(job), job.pk
    transaction.on_commit(lambda: _ring(model, job_id))


def job_claim(
    *, model: type[LeasedJob], job_id: int, owner: str, lease_seconds: int | None = None
) -> LeasedJob | None:
    """Take `queued -> running` for `owner`; None when there is nothing to claim.

    None means a duplicate delivery, a finished job, or a job another worker holds.
    """
    lease = timedelta(seconds=lease_seconds or settings.ENCLAVE_JOB_LEASE_SECONDS)
    now = timezone.now()
    claimed = model.objects.filter(pk=job_id, status=LeasedJob.Status.QUEUED).update(
        status=LeasedJob.Status.RUNNING,
        lease_owner=owner,
        lease_expires_at=now + lease,
        attempts=F("attempts") + 1,
        started_at=now,
    )
    return model.objects.get(pk=job_id) if claimed else None


def job_renew_lease(*, job: LeasedJob, lease_seconds: int | None = None, **progress) -> str:
    """Extend our lease and save `progress` fields in the same update.

    Returns the job's stop request ("", "cancel" or "pause"), which the worker honours at
    its next safe point. Raises LeaseLost when the row is no longer running under our
    name (reaped and claimed by another worker): the caller must stop without writing.
    """
    lease = timedelta(seconds=lease_seconds or settings.ENCLAVE_JOB_LEASE_SECONDS)
    expires = timezone.now() + lease
    mine = type(job).objects.filter(
        pk=job.pk, status=LeasedJob.Status.RUNNING, lease_owner=job.lease_owner
    )
    updated = _with_reconnect(lambda: mine.update(lease_expires_at=expires, **progress))
    if not updated:
        raise LeaseLost(f"{type(job).__name__} {job.pk} is no longer held by {job.lease_owner}")
    job.lease_expires_at = expires
    for name, value in progress.items():
        setattr(job, name, value)
    job.stop_request = (
        type(job).objects.filter(pk=job.pk).values_list("stop_request", flat=True).first() or ""
    )
    return job.stop_request


def job_complete(*, job: LeasedJob, status: str, error: str = "", **fields) -> bool:
    """Close a job we hold with a terminal `status` (or `paused`, which keeps it resumable);
    False if it was no longer ours."""
    if status not in LeasedJob.TERMINAL | {LeasedJob.Status.PAUSED}:
        raise ValueError(f"{status!r} is not a terminal job status")
    mine = type(job).objects.filter(
        pk=job.pk, status=LeasedJob.Status.RUNNING, lease_owner=job.lease_owner
    )
    return bool(
        _with_reconnect(
            lambda: mine.update(
                status=status,
                error=error,
                finished_at=timezone.now(),
                lease_owner="",
                lease_expires_at=None,
                stop_request=LeasedJob.StopRequest.NONE,
                **fields,
            )
        )
    )


def job_request_stop(*, job: LeasedJob, what: str) -> LeasedJob:
    """Cancel or pause a job.

    A queued (or paused, for cancel) job stops at once; a running one is asked to stop and
    its worker does so between steps. A finished job cannot be stopped: ValueError.
    """
    if what not in (LeasedJob.StopRequest.CANCEL, LeasedJob.StopRequest.PAUSE):
        raise ValueError(f"unknown stop request {what!r}")
    model = type(job)
    S = LeasedJob.Status
    at_once = S.CANCELLED if what == LeasedJob.StopRequest.CANCEL else S.PAUSED
    idle = [S.QUEUED, S.PAUSED] if what == LeasedJob.StopRequest.CANCEL else [S.QUEUED]
    now = timezone.now()
    if model.objects.filter(pk=job.pk, status__in=idle).update(
        status=at_once, finished_at=now if at_once == S.CANCELLED else None
    ):
        return model.objects.get(pk=job.pk)
    if model.objects.filter(pk=job.pk, status=S.RUNNING).update(stop_request=what):
        return model.objects.get(pk=job.pk)
    current = model.objects.get(pk=job.pk)
    if what == LeasedJob.StopRequest.PAUSE and current.status == S.PAUSED:
        return current
    raise ValueError(f"cannot {what} a job that is {current.status}")


def job_resume(*, job: LeasedJob) -> LeasedJob:
    """Re-queue a paused job; it continues from its last saved state. ValueError otherwise."""
    model = type(job)
    with transaction.atomic():
        if not model.objects.filter(pk=job.pk, status=LeasedJob.Status.PAUSED).update(
            status=LeasedJob.Status.QUEUED, stop_request=LeasedJob.StopRequest.NONE
        ):
            current = model.objects.get(pk=job.pk)
            raise ValueError(f"cannot resume a job that is {current.status}")
        job_enqueue(job=job)
    return model.objects.get(pk=job.pk)


def job_run(*, model: type[LeasedJob], job_id: int, work: Callable[[LeasedJob], dict]) -> bool:
    """Claim job `job_id`, run `work(job)`, and close the row; False if nothing was claimed.

    `work` renews the lease between its steps (job_renew_lease), honours the stop request
    that returns, and returns the fields to store, with "status" when it ends otherwise
    than succeeded (cancelled, paused). An exception fails the job with its message;
    LeaseLost just stops.
    """
    job = job_claim(model=model, job_id=job_id, owner=worker_identity())
    if job is None:
        log.info("%s %s: nothing to claim (duplicate delivery or finished)", model.__name__, job_id)
        return False
    try:
        fields = work(job) or {}
    except LeaseLost:
        log.warning("%s %s: lease lost, stopping", model.__name__, job_id)
        return False
    except Exception as exc:
        log.exception("%s %s failed", model.__name__, job_id)
        job_complete(job=job, status=LeasedJob.Status.FAILED, error=f"{type(exc).__name__}: {exc}")
        raise
    status = fields.pop("status", LeasedJob.Status.SUCCEEDED)
    return job_complete(job=job, status=status, **fields)


def leased_job_models() -> list[type[LeasedJob]]:
    """Every concrete job type installed, so the reaper needs no list of its own."""
    return [m for m in apps.get_models() if issubclass(m, LeasedJob) and m.run_task]


def job_reap_expired(*, now=None) -> int:
    """Re-queue running jobs whose lease expired, or fail those out of attempts.

    Returns how many jobs were re-queued. Each re-queue is a compare-and-set on the
    expired lease, so a worker that renews at the last moment keeps its job.
    """
    now = now or timezone.now()
    requeued = 0
    stale = now - timedelta(seconds=settings.ENCLAVE_REQUEUE_AFTER_SECONDS)
    for model in leased_job_models():
        # Queued for long with no taker: the message may be lost (a broker restart).
        # Ringing again is safe: a duplicate delivery claims nothing.
        for job_id in model.objects.filter(
            status=LeasedJob.Status.QUEUED, bell_rung_at__lt=stale
        ).values_list("pk", flat=True):
            _ring(model, job_id)
        expired = model.objects.filter(status=LeasedJob.Status.RUNNING, lease_expires_at__lt=now)
        for job in expired.only("pk", "attempts", "lease_owner", "lease_expires_at"):
            still_expired = model.objects.filter(
                pk=job.pk,
                status=LeasedJob.Status.RUNNING,
                lease_owner=job.lease_owner,
                lease_expires_at__lt=now,
            )
            if job.attempts >= settings.ENCLAVE_JOB_MAX_ATTEMPTS:
                still_expired.update(
                    status=LeasedJob.Status.FAILED,
                    error=f"lease expired after {job.attempts} attempts",
                    finished_at=now,
                    lease_owner="",
                    lease_expires_at=None,
                )
                continue
            with transaction.atomic():
                if still_expired.update(
                    status=LeasedJob.Status.QUEUED, lease_owner="", lease_expires_at=None
                ):
                    log.warning("%s %s: lease expired, re-queued", model.__name__, job.pk)
                    job_enqueue(job=job)
                    requeued += 1
    return requeued


def diagnostic_job_create(*, steps: int = 3, step_seconds: float = 0.0) -> DiagnosticJob:
    """Create a diagnostic job and ring the bell for it."""
    if steps < 1 or step_seconds < 0:
        raise ValueError("a diagnostic job needs steps >= 1 and step_seconds >= 0")
    with transaction.atomic():
        job = DiagnosticJob.objects.create(steps=steps, step_seconds=step_seconds)
        job_enqueue(job=job)
    return job


def diagnostic_job_run(*, job_id: int) -> bool:
    """Run a diagnostic job from its saved progress; see DiagnosticJob."""
    import platform
    import time

    def work(job: DiagnosticJob) -> dict:
        if job.progress:
            log.info("diagnostic job %s resumed at step %s", job.pk, job.progress)
        for step in range(job.progress, job.steps):
            time.sleep(job.step_seconds)
            stop = job_renew_lease(job=job, progress=step + 1)
            if stop == LeasedJob.StopRequest.CANCEL:
                return {"status": LeasedJob.Status.CANCELLED}
            if stop == LeasedJob.StopRequest.PAUSE and step + 1 < job.steps:
                return {"status": LeasedJob.Status.PAUSED}
        return {
            "result": {
                "steps": job.steps,
                "worker_pid": os.getpid(),
                "worker_host": socket.gethostname(),
                # The stdlib module, not the platform/ folder: proves the path is right.
                "system": platform.system(),
            }
        }

    return job_run(model=DiagnosticJob, job_id=job_id, work=work)
