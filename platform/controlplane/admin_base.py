"""Read-only admin pages: operators look, services change. Nothing here writes."""

from django.contrib import admin


class ReadOnlyAdmin(admin.ModelAdmin):
    """No add, change or delete: deleting a row here would skip the service that
    crypto-shreds its blobs and records the audit event."""

    def has_add_permission(self, request, obj=None):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False
