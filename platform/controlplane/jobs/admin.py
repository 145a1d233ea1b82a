from django.contrib import admin

from .models import DiagnosticJob


@admin.register(DiagnosticJob)
class DiagnosticJobAdmin(admin.ModelAdmin):
    list_display = ["id", "status", "progress", "steps", "attempts", "lease_owner", "created_at"]
    list_filter = ["status"]

    def has_change_permission(self, request, obj=None):
        return False
