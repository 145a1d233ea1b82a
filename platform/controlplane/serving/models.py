import secrets

from django.db import models

from controlplane.jobs.models import LeasedJob


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


class Batch(LeasedJob):
    """An OpenAI Batch: a JSONL file of chat requests run on the engine by a worker.

    The row's LeasedJob status is the truth; the API maps it onto OpenAI's batch statuses.
    Results are written in parts (vault blobs, one per chunk of requests) so a batch
    re-queued after a worker died resumes after its last finished part.
    """

    run_task = "serving.run_batch"
    run_queue = "train"

    id = models.CharField(primary_key=True, max_length=40, default=new_batch_id, editable=False)
    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="+")
    endpoint = models.CharField(max_length=64, default="/v1/chat/completions")
    completion_window = models.CharField(max_length=8, default="24h")
    input_file = models.ForeignKey("files.File", on_delete=models.PROTECT, related_name="+")
    output_file = models.ForeignKey(
        "files.File", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    error_file = models.ForeignKey(
        "files.File", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    metadata = models.JSONField(null=True, blank=True)
    total = models.PositiveIntegerField(default=0)
    completed = models.PositiveIntegerField(default=0)
    failed = models.PositiveIntegerField(default=0)
    #: finished parts: [{"lines": n, "output": blob id, "errors": blob id}]
    parts = models.JSONField(default=list)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"
