from django.core.management.base import BaseCommand, CommandError

from controlplane.audit.services import audit_event_record
from controlplane.tenancy.selectors import tenant_get_by_slug
from controlplane.tenancy.services import tenant_delete


class Command(BaseCommand):
    help = "Erase a tenant and crypto-shred all its data: delete_tenant SLUG --yes"

    def add_arguments(self, parser):
        parser.add_argument("slug")
        parser.add_argument("--yes", action="store_true", help="confirm the erasure")

    def handle(self, *args, slug, yes, **options):
        tenant = tenant_get_by_slug(slug=slug)
        if tenant is None:
            raise CommandError(f"no tenant with slug {slug!r}")
        if not yes:
            raise CommandError(f"this erases {slug!r} for good; repeat with --yes to confirm")
        audit_event_record(
            tenant=tenant, actor="system:manage.py", action="delete_tenant",
            object_type="tenant", object_id=slug,
        )  # fmt: skip
        tenant_delete(tenant=tenant)
        self.stdout.write(f"tenant {slug} erased; its keys are destroyed")
