from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError

from controlplane.tenancy.models import Tenant
from controlplane.tenancy.services import tenant_create


class Command(BaseCommand):
    help = "Create a tenant: create_tenant SLUG --name NAME --vertical finance|medical|other"

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--name", required=True)
        parser.add_argument("--vertical", choices=Tenant.Vertical.values, default="other")
        parser.add_argument("--region", default="local", help="data region (default: local)")

    def handle(self, *args, slug, name, vertical, region, **options):
        try:
            tenant = tenant_create(slug=slug, name=name, vertical=vertical, data_region=region)
        except ValidationError as exc:
            raise CommandError(
                "; ".join(f"{k}: {' '.join(v)}" for k, v in exc.message_dict.items())
            ) from exc
        self.stdout.write(f"created tenant {tenant.slug} ({tenant.name}, {tenant.vertical})")
