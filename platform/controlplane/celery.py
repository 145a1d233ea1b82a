"""The Celery app: two queues, JSON only, late acks, and the database as the truth.

`default` takes short tasks. `train` takes long jobs: a worker process holds one at a
time (prefetch 1) and acknowledges it only when it ends (acks late), so a message whose
worker died is redelivered; the job row's claim turns a redelivery into a no-op.
"""

import os

from celery import Celery
from kombu import Exchange, Queue

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "controlplane.settings")

app = Celery("controlplane")
app.config_from_object("django.conf:settings", namespace="CELERY")

_default = Exchange("default", type="direct")
_train = Exchange("train", type="direct")
app.conf.update(
    task_queues=(
        Queue("default", _default, routing_key="default"),
        Queue("train", _train, routing_key="train"),
    ),
    task_default_queue="default",
    task_default_exchange="default",
    task_default_routing_key="default",
    task_serializer="json",
    result_serializer="json",
    accept_content=["json"],
    task_ignore_result=True,  # results live in job rows, not in a result backend
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    worker_prefetch_multiplier=1,
    task_time_limit=6 * 3600,
    task_soft_time_limit=6 * 3600 - 60,
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    beat_scheduler="django_celery_beat.schedulers:DatabaseScheduler",
)
app.autodiscover_tasks()
