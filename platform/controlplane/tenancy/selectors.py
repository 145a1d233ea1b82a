"""Reads for tenancy: tenants, members, API keys and usage.

Reads of one tenant's rows take the tenant; an id from another tenant answers 404
(Zulip's `access_*_by_id`).
"""

import datetime as dt

from django.db.models import QuerySet, Sum
from django.http import Http404
from django.utils import timezone

from .models import ApiKey, DailyUsage, Membership, Tenant


def tenant_get_by_slug(*, slug: str) -> Tenant | None:
    return Tenant.objects.filter(slug=slug).first()


def usage_for_tenant(*, tenant, days: int = 30) -> QuerySet[DailyUsage]:
    """The tenant's daily usage rows, newest first."""
    return DailyUsage.objects.filter(tenant=tenant).order_by("-day")[:days]


def usage_totals(*, tenant, days: int = 30) -> dict:
    """Today's usage row (or None) and the token totals of the last `days` days (UTC)."""
    today = timezone.now().date()
    rows = DailyUsage.objects.filter(tenant=tenant, day__gt=today - dt.timedelta(days=days))
    totals = rows.aggregate(
        requests=Sum("requests"),
        prompt_tokens=Sum("prompt_tokens"),
        completion_tokens=Sum("completion_tokens"),
        training_tokens=Sum("training_tokens"),
    )
    return {
        "today": rows.filter(day=today).first(),
        "period_days": days,
        "period": {k: v or 0 for k, v in totals.items()},
    }


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


def access_membership_by_id(*, tenant, membership_id) -> Membership:
    membership = (
        Membership.objects.filter(tenant=tenant, pk=membership_id).select_related("user").first()
    )
    if membership is None:
        raise Http404(f"No such membership: {membership_id}")
    return membership


def memberships_of_user(*, user) -> QuerySet[Membership]:
    """A person's memberships in every tenant, by tenant name (the tenant switcher)."""
    return Membership.objects.filter(user=user).select_related("tenant").order_by("tenant__name")
