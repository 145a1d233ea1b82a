from celery import shared_task

from . import batches


@shared_task(name="serving.run_batch")
def run_batch(batch_id: str) -> bool:
    return batches.batch_run(batch_id=batch_id)
