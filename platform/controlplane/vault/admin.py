"""Read-only admin for the vault: ids, sizes, key ids and dates. Never key material.

Fields are listed explicitly (not excluded), so a field added to a model later stays
hidden until someone decides to show it.
"""

from django.contrib import admin

from .models import Blob, TenantKey


class _ReadOnlyAdmin(admin.ModelAdmin):
    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # destruction goes through blob_destroy / tenant_keys_destroy


@admin.register(TenantKey)
class TenantKeyAdmin(_ReadOnlyAdmin):
    list_display = ["key_id", "tenant", "master_key_id", "created_at", "rewrapped_at",
                    "destroyed_at"]  # fmt: skip
    list_filter = ["master_key_id", "tenant"]
    search_fields = ["key_id", "tenant__slug"]
    fields = ["key_id", "tenant", "master_key_id", "created_at", "rewrapped_at", "destroyed_at"]
    readonly_fields = fields


@admin.register(Blob)
class BlobAdmin(_ReadOnlyAdmin):
    list_display = ["id", "tenant", "kind", "plaintext_size", "ciphertext_size",
                    "tenant_key_id", "created_at", "destroyed_at"]  # fmt: skip
    list_filter = ["kind", "tenant"]
    search_fields = ["tenant__slug", "kind", "tenant_key_id"]
    fields = ["id", "tenant", "kind", "plaintext_size", "ciphertext_size", "ciphertext_path",
              "tenant_key_id", "created_at", "destroyed_at"]  # fmt: skip
    readonly_fields = fields
