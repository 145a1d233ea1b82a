from urllib.parse import unquote, urlsplit

from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from controlplane.rls.roles import AppRoleError, app_role_ensure


class Command(BaseCommand):
    help = (
        "Create (if missing) the application's PostgreSQL role and grant it row access: "
        "db_app_role --app-url postgres://enclave_app:PASSWORD@host/db, or db_app_role NAME. "
        "Run it as the tables' owner (DATABASE_URL = the owner's URL), after migrate."
    )

    def add_arguments(self, parser):
        parser.add_argument("role", nargs="?", help="the role's name")
        parser.add_argument(
            "--app-url",
            help="the application's DATABASE_URL: the role's name and password come from it",
        )

    def handle(self, *args, role, app_url, **options):
        if connection.vendor != "postgresql":
            raise CommandError(
                f"row-level security needs PostgreSQL; this database is {connection.vendor}"
            )
        password = None
        if app_url:
            parts = urlsplit(app_url)
            if parts.scheme not in ("postgres", "postgresql", "pgsql") or not parts.username:
                raise CommandError("--app-url must be a postgres:// URL with a user name")
            role = role or unquote(parts.username)
            password = unquote(parts.password) if parts.password else None
        if not role:
            raise CommandError("name the role, or give --app-url")
        owner = connection.settings_dict["USER"]
        if role == owner:
            raise CommandError(
                f"the application role must not be the tables' owner ({owner}); "
                "give migrate the owner's URL and the application another role"
            )
        try:
            done = app_role_ensure(role=role, password=password)
        except AppRoleError as exc:
            raise CommandError(str(exc)) from exc
        for line in done:
            self.stdout.write(line)
