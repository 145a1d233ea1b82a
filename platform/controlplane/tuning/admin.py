from django.contrib import admin

from controlplane.admin_base import ReadOnlyAdmin

from .models import Adapter, FineTuningCheckpoint, FineTuningEvent, FineTuningJob


@admin.register(FineTuningJob)
class FineTuningJobAdmin(ReadOnlyAdmin):
    list_display = ["id", "tenant", "model", "method", "status", "attempts", "created_at"]
    list_filter = ["status", "method", "tenant"]
    exclude = ["idempotency_key", "request_fingerprint"]


@admin.register(FineTuningEvent)
class FineTuningEventAdmin(ReadOnlyAdmin):
    list_display = ["job", "level", "type", "message", "created_at"]
    list_filter = ["type", "level"]


@admin.register(FineTuningCheckpoint)
class FineTuningCheckpointAdmin(ReadOnlyAdmin):
    list_display = ["id", "job", "step", "created_at"]


@admin.register(Adapter)
class AdapterAdmin(ReadOnlyAdmin):
    list_display = ["id", "tenant", "base_model", "job", "created_at"]
    list_filter = ["tenant"]
