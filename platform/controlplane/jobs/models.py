from typing import ClassVar

from django.db import models


class LeasedJob(models.Model):
    """A unit of long work whose row is the truth about it.

    A worker claims the row with a compare-and-set update (`queued -> running`, with its
    name as lease owner and a lease expiry), renews the lease between steps, and closes
    the row when it ends. The reaper puts rows with an expired lease back to `queued`.
    Concrete job types subclass this and name the Celery task that runs them.
    """

    class Status(models.TextChoices):
        QUEUED = "queued"
        RUNNING = "running"
        SUCCEEDED = "succeeded"
        FAILED = "failed"
        CANCELLED = "cancelled"
        PAUSED = "paused"  # stopped on request with its state saved; resume re-queues it

    class StopRequest(models.TextChoices):
        NONE = ""
        CANCEL = "cancel"
        PAUSE = "pause"

    TERMINAL: ClassVar[frozenset[str]] = frozenset(
        {Status.SUCCEEDED, Status.FAILED, Status.CANCELLED}
    )
    #: the Celery task (by name) that runs one job of this type, given its primary key
    run_task: ClassVar[str] = ""
    #: the queue that task goes to
    run_queue: ClassVar[str] = "default"

    status = models.CharField(
        max_length=16, choices=Status.choices, default=Status.QUEUED, db_index=True
    )
    lease_owner = models.CharField(max_length=200, blank=True, default="")
    lease_expires_at = models.DateTimeField(null=True, blank=True, db_index=True)
    attempts = models.PositiveIntegerField(default=0)
    #: asked of the worker, which sees it between steps (job_renew_lease returns it)
    stop_request = models.CharField(
        max_length=8, choices=StopRequest.choices, blank=True, default=StopRequest.NONE
    )
    error = models.TextField(blank=True, default="")
    #: when a message for this job was last sent; the reaper re-sends for a job left
    #: queued much longer (a broker that lost its messages loses no job)
    bell_rung_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        abstract = True


class DiagnosticJob(LeasedJob):
    """A small job that proves the pipeline end to end: web -> broker -> worker -> database.

    It counts `steps` steps of `step_seconds` each, saving its progress after every step
    (its checkpoint), so a job re-queued after a worker died resumes where it stopped.
    """

    run_task = "jobs.run_diagnostic"
    run_queue = "default"

    steps = models.PositiveIntegerField(default=3)
    step_seconds = models.FloatField(default=0.0)
    progress = models.PositiveIntegerField(default=0)
    result = models.JSONField(null=True, blank=True)

    def __str__(self) -> str:
        return f"diagnostic job {self.pk} ({self.status})"
