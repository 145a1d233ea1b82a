"""Reads for the audit log, always scoped to a tenant."""

import datetime as dt

from django.db.models import QuerySet

from .models import AuditEvent

#: the text fields `audit_events_filtered` can filter on
AUDIT_FILTERS = ("actor", "action", "object_type", "object_id")


def audit_events_for_tenant(*, tenant) -> QuerySet[AuditEvent]:
    return AuditEvent.objects.filter(tenant=tenant)


def audit_events_filtered(
    *,
    tenant,
    actor: str = "",
    action: str = "",
    object_type: str = "",
    object_id: str = "",
    since: dt.date | None = None,
    until: dt.date | None = None,
) -> QuerySet[AuditEvent]:
    """The tenant's audit events, newest first; text filters match case-insensitively
    anywhere in the field, dates are inclusive UTC days."""
    events = audit_events_for_tenant(tenant=tenant)
    for name, value in zip(AUDIT_FILTERS, (actor, action, object_type, object_id), strict=True):
        if value:
            events = events.filter(**{f"{name}__icontains": value})
    if since:
        events = events.filter(created_at__date__gte=since)
    if until:
        events = events.filter(created_at__date__lte=until)
    return events.order_by("-created_at", "-id")
