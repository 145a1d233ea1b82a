import secrets

from django.db import models


def new_file_id() -> str:
    return f"file-{secrets.token_hex(12)}"


class File(models.Model):
    """An uploaded file (OpenAI Files API). Its content lives only encrypted, in the vault."""

    class Purpose(models.TextChoices):
        FINE_TUNE = "fine-tune"
        BATCH = "batch"
        EVALS = "evals"
        BATCH_OUTPUT = "batch_output"  # written by the platform, not uploadable

    class Status(models.TextChoices):
        UPLOADED = "uploaded"
        PROCESSED = "processed"  # validated, usable
        ERROR = "error"  # stored, but failed validation: see status_details

    UPLOADABLE = ("fine-tune", "batch", "evals")

    id = models.CharField(primary_key=True, max_length=40, default=new_file_id, editable=False)
    tenant = models.ForeignKey("tenancy.Tenant", on_delete=models.CASCADE, related_name="files")
    purpose = models.CharField(max_length=16, choices=Purpose.choices)
    filename = models.CharField(max_length=255)
    bytes = models.PositiveBigIntegerField()
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.UPLOADED)
    status_details = models.TextField(null=True, blank=True)  # noqa: DJ001 - OpenAI sends null
    #: the validator's report (counts, statistics, line-numbered errors)
    validation = models.JSONField(null=True, blank=True)
    blob = models.ForeignKey("vault.Blob", null=True, on_delete=models.SET_NULL, related_name="+")
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        ordering = ["-created_at"]
        indexes = [models.Index(fields=["tenant", "purpose", "created_at"])]

    def __str__(self) -> str:
        return f"{self.id} ({self.filename})"
