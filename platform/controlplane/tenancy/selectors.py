"""Reads for tenancy."""

from .models import Tenant


def tenant_get_by_slug(*, slug: str) -> Tenant | None:
    return Tenant.objects.filter(slug=slug).first()


def usage_for_tenant(*, tenant, days: int = 30):
    """The tenant's daily usage rows, newest first."""
    from .models import DailyUsage

    return DailyUsage.objects.filter(tenant=tenant).order_by("-day")[:days]
