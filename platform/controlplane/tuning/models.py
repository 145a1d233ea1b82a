import secrets

from django.db import models

from controlplane.jobs.models import LeasedJob


def new_job_id() -> str:
    return f"ftjob-{secrets.token_hex(12)}"


def new_checkpoint_id() -> str:
    return f"ftckpt-{secrets.token_hex(12)}"


class FineTuningJob(LeasedJob):
    """A tenant's LoRA fine-tune of a base model on one of its files (OpenAI's shape).

    Runs on the `train` queue under the claim/lease/reaper pattern. Its checkpoints and
    its result adapter are vault blobs; its metrics are events.
    """

    class Method(models.TextChoices):
        SUPERVISED = "supervised"
        REINFORCEMENT = "reinforcement"

    run_task = "tuning.run_fine_tuning_job"
    run_queue = "train"

    id = models.CharField(primary_key=True, max_length=40, default=new_job_id, editable=False)
    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="+")
    model = models.CharField(max_length=200)  # the base model's name
    training_file = models.ForeignKey("files.File", on_delete=models.PROTECT, related_name="+")
    validation_file = models.ForeignKey(
        "files.File", null=True, blank=True, on_delete=models.PROTECT, related_name="+"
    )
    method = models.CharField(max_length=16, choices=Method.choices, default=Method.SUPERVISED)
    #: the resolved hyperparameters (defaults filled in), as the API shows them
    hyperparameters = models.JSONField(default=dict)
    #: for reinforcement: which domain suite grades the completions
    grader = models.CharField(max_length=32, blank=True, default="")
    suffix = models.CharField(max_length=40, blank=True, default="")
    seed = models.BigIntegerField(default=0)
    metadata = models.JSONField(null=True, blank=True)
    fine_tuned_model = models.CharField(max_length=300, null=True, blank=True)  # noqa: DJ001
    trained_tokens = models.PositiveBigIntegerField(null=True, blank=True)
    #: the latest training state (vault blob), from which a re-queued job resumes
    resume_blob = models.ForeignKey(
        "vault.Blob", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    idempotency_key = models.CharField(max_length=200, null=True, blank=True)  # noqa: DJ001
    request_fingerprint = models.CharField(max_length=64, blank=True, default="")

    class Meta:
        ordering = ["-created_at"]
        constraints = [
            models.UniqueConstraint(
                fields=["tenant", "idempotency_key"], name="one_job_per_idempotency_key"
            )
        ]

    def __str__(self) -> str:
        return f"{self.id} ({self.status})"


class FineTuningEvent(models.Model):
    """Something that happened to a job: a message, or metrics (type "metrics")."""

    class Level(models.TextChoices):
        INFO = "info"
        WARN = "warn"
        ERROR = "error"

    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="events")
    level = models.CharField(max_length=8, choices=Level.choices, default=Level.INFO)
    type = models.CharField(max_length=16, default="message")
    message = models.TextField()
    data = models.JSONField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-id"]

    def __str__(self) -> str:
        return f"{self.job_id}: {self.message}"


class FineTuningCheckpoint(models.Model):
    """The adapter at a step of a job, stored encrypted; usable as a model."""

    id = models.CharField(
        primary_key=True, max_length=40, default=new_checkpoint_id, editable=False
    )
    job = models.ForeignKey(FineTuningJob, on_delete=models.CASCADE, related_name="checkpoints")
    step = models.PositiveIntegerField()
    metrics = models.JSONField(default=dict)
    blob = models.ForeignKey("vault.Blob", null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-step"]

    def __str__(self) -> str:
        return f"{self.id} (step {self.step})"


class Adapter(models.Model):
    """A fine-tuned model a tenant can chat with: a LoRA adapter on a base model.

    `id` is the OpenAI-style model name, `ft:<base>:<tenant>:<suffix>:<job id>`. The
    adapter files (PEFT format) are one encrypted vault blob.
    """

    id = models.CharField(primary_key=True, max_length=300)
    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="+")
    base_model = models.CharField(max_length=200)
    job = models.ForeignKey(
        FineTuningJob, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    blob = models.ForeignKey("vault.Blob", null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]

    def __str__(self) -> str:
        return self.id
