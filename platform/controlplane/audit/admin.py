from django.contrib import admin

from .models import AuditEvent


@admin.register(AuditEvent)
class AuditEventAdmin(admin.ModelAdmin):
    """The audit log is append-only: operators read it, nobody edits or deletes it."""

    list_display = ["created_at", "tenant_slug", "actor", "action", "object_type", "object_id",
                    "status_code", "request_id"]  # fmt: skip
    list_filter = ["tenant_slug", "object_type"]
    search_fields = ["actor", "action", "object_id", "request_id"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
