"""Writes for tenancy."""

from django.core.exceptions import ValidationError
from django.utils.text import slugify

from .models import Tenant


def tenant_create(
    *, slug: str, name: str, vertical: str = Tenant.Vertical.OTHER, data_region: str = "local"
) -> Tenant:
    """Create a tenant; ValidationError names the field that is wrong."""
    if slugify(slug) != slug:
        raise ValidationError({"slug": f"{slug!r} is not a slug (lowercase letters, digits, -)"})
    if Tenant.objects.filter(slug=slug).exists():
        raise ValidationError({"slug": f"a tenant with slug {slug!r} already exists"})
    tenant = Tenant(slug=slug, name=name, vertical=vertical, data_region=data_region)
    tenant.full_clean()
    tenant.save()
    return tenant
