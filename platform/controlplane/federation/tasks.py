from celery import shared_task

from . import services


@shared_task(name="federation.run_round")
def run_round(round_id: str) -> bool:
    return services.round_run(round_id=round_id)


@shared_task(name="federation.start_scheduled_round")
def start_scheduled_round(federation_id: str) -> str | None:
    started = services.round_start_scheduled(federation_id=federation_id)
    return started.id if started else None
