"""Reads for the audit log, always scoped to a tenant."""

from django.db.models import QuerySet

from .models import AuditEvent


def audit_events_for_tenant(*, tenant) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(tenant=tenant)
