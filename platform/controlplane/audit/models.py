from django.db import models


class AuditEvent(models.Model):
    """One mutating action: who did what to which object, in which tenant, when.

    Append-only: the application never updates or deletes a row (services offer no way
    to), and the admin shows the log read-only.
    """

    tenant = models.ForeignKey(
        "tenancy.Tenant", null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    #: tenant slug at the time, kept when the tenant row is gone
    tenant_slug = models.CharField(max_length=64, blank=True, default="")
    #: "key:<prefix>", "user:<username>" or "system"
    actor = models.CharField(max_length=200)
    action = models.CharField(max_length=200)
    object_type = models.CharField(max_length=100, blank=True, default="")
    object_id = models.CharField(max_length=200, blank=True, default="")
    request_id = models.CharField(max_length=100, blank=True, default="")
    status_code = models.PositiveSmallIntegerField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["tenant", "created_at"])]

    def __str__(self) -> str:
        return f"{self.created_at:%Y-%m-%d %H:%M:%S} {self.actor} {self.action} {self.object_id}"
