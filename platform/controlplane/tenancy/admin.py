from django.contrib import admin

from .models import ApiKey, DailyUsage, Membership, Tenant


class MembershipInline(admin.TabularInline):
    model = Membership
    extra = 0
    autocomplete_fields = ["user"]


@admin.register(Tenant)
class TenantAdmin(admin.ModelAdmin):
    list_display = ["slug", "name", "vertical", "data_region", "created_at"]
    list_filter = ["vertical", "data_region"]
    search_fields = ["slug", "name"]
    inlines = [MembershipInline]

    def has_delete_permission(self, request, obj=None):
        return False  # erasure is `manage.py delete_tenant`, which crypto-shreds first


@admin.register(ApiKey)
class ApiKeyAdmin(admin.ModelAdmin):
    """Keys are created with `create_api_key` or the console; here only the prefix shows."""

    list_display = ["prefix", "tenant", "role", "name", "created_at", "expires_at", "revoked_at"]
    list_filter = ["role", "tenant"]
    fields = ["prefix", "tenant", "role", "name", "created_at", "expires_at", "revoked_at",
              "last_used_at"]  # fmt: skip
    readonly_fields = ["prefix", "tenant", "role", "name", "created_at", "expires_at",
                       "revoked_at", "last_used_at"]  # fmt: skip
    actions = ["revoke"]

    def has_add_permission(self, request):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # revoke instead: the row stays for the audit trail

    @admin.action(description="Revoke the selected keys")
    def revoke(self, request, queryset):
        from controlplane.audit.services import audit_event_record
        from controlplane.tenancy.services import api_key_revoke

        for key in queryset:
            api_key_revoke(key=key)
            audit_event_record(
                tenant=key.tenant, actor=f"staff:{request.user.get_username()}",
                action="admin revoke api key", object_type="api_key", object_id=key.prefix,
            )  # fmt: skip


@admin.register(DailyUsage)
class DailyUsageAdmin(admin.ModelAdmin):
    list_display = ["tenant", "day", "requests", "prompt_tokens", "completion_tokens",
                    "training_tokens"]  # fmt: skip
    list_filter = ["tenant"]

    def has_add_permission(self, request):
        return False

    def has_change_permission(self, request, obj=None):
        return False

    def has_delete_permission(self, request, obj=None):
        return False  # billing records
