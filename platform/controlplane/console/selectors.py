"""Tenant-scoped reads the console needs that the owning apps do not offer yet.

Each takes the tenant and answers 404 for another tenant's id (Zulip's `access_*_by_id`).
They belong in controlplane.tenancy.selectors / audit.selectors; they live here until
those apps adopt them.
"""

import datetime as dt

from django.db.models import QuerySet, Sum
from django.http import Http404
from django.utils import timezone

from controlplane.audit.selectors import audit_events_for_tenant
from controlplane.files.selectors import files_total_bytes
from controlplane.tenancy.models import ApiKey, DailyUsage, Membership


def api_keys_list(*, tenant) -> QuerySet[ApiKey]:
    return ApiKey.objects.filter(tenant=tenant).order_by("-created_at")


def access_api_key_by_id(*, tenant, key_id) -> ApiKey:
    key = ApiKey.objects.filter(tenant=tenant, pk=key_id).first()
    if key is None:
        raise Http404(f"No such API key: {key_id}")
    return key


def memberships_list(*, tenant) -> QuerySet[Membership]:
    return (
        Membership.objects.filter(tenant=tenant).select_related("user").order_by("user__username")
    )


def usage_summary(*, tenant, days: int = 30) -> dict:
    """Today's and the last `days` days' token usage, and storage against the quota."""
    today = timezone.now().date()
    rows = DailyUsage.objects.filter(tenant=tenant, day__gt=today - dt.timedelta(days=days))
    totals = rows.aggregate(
        requests=Sum("requests"),
        prompt_tokens=Sum("prompt_tokens"),
        completion_tokens=Sum("completion_tokens"),
        training_tokens=Sum("training_tokens"),
    )
    today_row = rows.filter(day=today).first()
    return {
        "today": today_row,
        "period_days": days,
        "period": {k: v or 0 for k, v in totals.items()},
        "storage_used": files_total_bytes(tenant=tenant),
        "storage_quota": tenant.storage_bytes,
    }


AUDIT_FILTERS = ("actor", "action", "object_type", "object_id")


def audit_events_filtered(
    *,
    tenant,
    actor: str = "",
    action: str = "",
    object_type: str = "",
    object_id: str = "",
    since: dt.date | None = None,
    until: dt.date | None = None,
) -> QuerySet:
    """The tenant's audit events, newest first; text filters match case-insensitively
    anywhere in the field, dates are inclusive UTC days."""
    events = audit_events_for_tenant(tenant=tenant)
    for name, value in (
        ("actor", actor),
        ("action", action),
        ("object_type", object_type),
        ("object_id", object_id),
    ):
        if value:
            events = events.filter(**{f"{name}__icontains": value})
    if since:
        events = events.filter(created_at__date__gte=since)
    if until:
        events = events.filter(created_at__date__lte=until)
    return events.order_by("-created_at", "-id")
