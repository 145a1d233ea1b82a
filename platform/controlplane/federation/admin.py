from django.contrib import admin

from controlplane.admin_base import ReadOnlyAdmin

from .models import FederatedRound, Federation, GlobalAdapter, Participant


@admin.register(Federation)
class FederationAdmin(ReadOnlyAdmin):
    list_display = ["id", "name", "owner", "base_model", "status", "schedule", "epsilon_spent"]
    list_filter = ["status"]


@admin.register(Participant)
class ParticipantAdmin(ReadOnlyAdmin):
    """Consent records: who accepted, when, under which settings."""

    list_display = ["federation", "tenant", "status", "accepted_at", "accepted_by", "node_name"]
    list_filter = ["status"]


@admin.register(FederatedRound)
class FederatedRoundAdmin(ReadOnlyAdmin):
    list_display = ["id", "federation", "number", "status", "partial", "epsilon", "created_at"]
    list_filter = ["status"]


@admin.register(GlobalAdapter)
class GlobalAdapterAdmin(ReadOnlyAdmin):
    list_display = ["id", "federation", "created_at"]
