"""Celery tasks of the job pattern: thin, they take ids and call one service."""

from celery import shared_task

from . import services


@shared_task(name="jobs.run_diagnostic")
def run_diagnostic(job_id: int) -> bool:
    return services.diagnostic_job_run(job_id=job_id)


@shared_task(name="jobs.reap_expired_leases")
def reap_expired_leases() -> int:
    return services.job_reap_expired()
