"""The application's database role: it may read and write rows, never bypass the policies.

Run by the tables' owner (the role migrations run as), after `migrate`. Idempotent: safe
on every deploy and from several processes at once.
"""

from django.db import connection as default_connection
from psycopg import sql

from controlplane.rls.context import SYSTEM

TABLE_PRIVILEGES = "SELECT, INSERT, UPDATE, DELETE"


class AppRoleError(Exception):
    """The role exists but must not serve the application (it would skip the wall)."""


def app_role_ensure(*, role: str, password: str | None = None, connection=None) -> list[str]:
    """Create `role` if missing (LOGIN, no superuser, no BYPASSRLS) and grant it row access.

    Grants: CONNECT on this database, USAGE on schema public, SELECT/INSERT/UPDATE/DELETE
    on its tables (SELECT only on django_migrations), USAGE/SELECT on its sequences, and the
    same by default on tables and sequences the owner creates later. Returns what it did.
    Raises AppRoleError when the role is a superuser, bypasses RLS or owns a table.
    """
    conn = connection or default_connection
    name = sql.Identifier(role)
    done: list[str] = []
    with conn.cursor() as cursor:

        def run(statement, params=None):
            cursor.execute(statement.as_string(cursor.connection), params)

        cursor.execute("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = %s", [role])
        found = cursor.fetchone()
        if found is None:
            # A concurrent creator may win the race; the role is then simply there.
            run(
                sql.SQL(
                    "DO $$ BEGIN CREATE ROLE {} LOGIN NOSUPERUSER NOBYPASSRLS NOCREATEDB "
                    "NOCREATEROLE; EXCEPTION WHEN duplicate_object OR unique_violation THEN "
                    "NULL; END $$"
                ).format(name)
            )
            done.append(f"created role {role}")
            cursor.execute("SELECT rolsuper, rolbypassrls FROM pg_roles WHERE rolname = %s", [role])
            found = cursor.fetchone()
        superuser, bypassrls = found
        if superuser or bypassrls:
            raise AppRoleError(
                f"role {role} is a {'superuser' if superuser else 'BYPASSRLS role'}: "
                "row-level security would not apply to it; use a plain role"
            )
        if password:
            run(sql.SQL("ALTER ROLE {} PASSWORD {}").format(name, sql.Literal(password)))
            done.append("set its password")
        cursor.execute(
            "SELECT string_agg(tablename, ', ') FROM pg_tables "
            "WHERE tableowner = %s AND schemaname = 'public'",
            [role],
        )
        owned = cursor.fetchone()[0]
        if owned:
            raise AppRoleError(
                f"role {role} owns tables ({owned}); the application must not own what it "
                "reads (an owner can switch row-level security off)"
            )
        cursor.execute("SELECT current_database()")
        database_name = cursor.fetchone()[0]
        database = sql.Identifier(database_name)
        grants = [
            sql.SQL("GRANT CONNECT ON DATABASE {} TO {}").format(database, name),
            sql.SQL("GRANT USAGE ON SCHEMA public TO {}").format(name),
            sql.SQL(f"GRANT {TABLE_PRIVILEGES} ON ALL TABLES IN SCHEMA public TO {{}}").format(
                name
            ),
            sql.SQL("REVOKE INSERT, UPDATE, DELETE ON TABLE django_migrations FROM {}").format(
                name
            ),
            sql.SQL("GRANT USAGE, SELECT ON ALL SEQUENCES IN SCHEMA public TO {}").format(name),
            sql.SQL(
                f"ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT {TABLE_PRIVILEGES} "
                "ON TABLES TO {}"
            ).format(name),
            sql.SQL(
                "ALTER DEFAULT PRIVILEGES IN SCHEMA public GRANT USAGE, SELECT ON SEQUENCES TO {}"
            ).format(name),
        ]
        for grant in grants:
            run(grant)
        done.append(f"granted {role} row access on database {database_name}")
    return done


def app_role_check(*, connection=None) -> dict:
    """What the connected role is: name, superuser, bypassrls, tables it owns, context."""
    conn = connection or default_connection
    with conn.cursor() as cursor:
        cursor.execute(
            "SELECT r.rolname, r.rolsuper, r.rolbypassrls, "
            "(SELECT count(*) FROM pg_tables t WHERE t.tableowner = r.rolname "
            " AND t.schemaname = 'public'), current_setting('enclave.tenant_id', true) "
            "FROM pg_roles r WHERE r.rolname = current_user"
        )
        name, superuser, bypassrls, owned, context = cursor.fetchone()
    return {
        "role": name,
        "superuser": superuser,
        "bypassrls": bypassrls,
        "owned_tables": owned,
        "context": context,
        "walled": not superuser and not bypassrls and context != SYSTEM,
    }
