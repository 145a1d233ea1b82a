from celery import shared_task

from . import services


@shared_task(name="tuning.run_fine_tuning_job")
def run_fine_tuning_job(job_id: str) -> bool:
    return services.fine_tuning_job_run(job_id=job_id)
