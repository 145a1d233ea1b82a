from django.contrib import admin

from .models import File


@admin.register(File)
class FileAdmin(admin.ModelAdmin):
    """Metadata only: content is encrypted in the vault and never shown here."""

    list_display = ["id", "tenant", "purpose", "filename", "bytes", "status", "created_at"]
    list_filter = ["purpose", "status", "tenant"]
    readonly_fields = ["id", "tenant", "purpose", "filename", "bytes", "status",
                       "status_details", "validation", "blob", "created_at"]  # fmt: skip

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # deleting goes through file_delete, which crypto-shreds the blob
