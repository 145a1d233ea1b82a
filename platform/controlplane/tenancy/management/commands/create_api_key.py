from datetime import timedelta

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from controlplane.tenancy.models import Role
from controlplane.tenancy.selectors import tenant_get_by_slug
from controlplane.tenancy.services import api_key_create


class Command(BaseCommand):
    help = "Create an API key for a tenant and print it once: create_api_key SLUG --role admin"

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--role", choices=Role.values, default=Role.MEMBER)
        parser.add_argument("--name", default="")
        parser.add_argument("--expires-days", type=int, default=None)

    def handle(self, *args, slug, role, name, expires_days, **options):
        tenant = tenant_get_by_slug(slug=slug)
        if tenant is None:
            raise CommandError(f"no tenant with slug {slug!r}")
        expires_at = None
        if expires_days is not None:
            expires_at = timezone.now() + timedelta(days=expires_days)
        try:
            key, raw = api_key_create(tenant=tenant, role=role, name=name, expires_at=expires_at)
        except ValidationError as exc:
            raise CommandError(
                "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
            ) from exc
        self.stderr.write(
            f"API key {key.prefix} ({role}) for {tenant.slug}; it is shown once, store it now:"
        )
        self.stdout.write(raw)
