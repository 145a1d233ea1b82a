from django.contrib import admin

from controlplane.admin_base import ReadOnlyAdmin

from .models import Batch


@admin.register(Batch)
class BatchAdmin(ReadOnlyAdmin):
    list_display = ["id", "tenant", "status", "total", "completed", "failed", "created_at"]
    list_filter = ["status"]
