"""Migration operations for row-level security; no-ops on databases other than PostgreSQL.

A later migration that adds a table whose rows belong to a tenant adds its wall with

    RowSecurity("app_thing", [Policy("enclave_tenant_rows", using=tenant_rows())])

and tests/controlplane/test_rls.py fails until it does.
"""

from dataclasses import dataclass

from django.db import migrations


@dataclass(frozen=True)
class Policy:
    """One permissive policy: `command` is ALL, SELECT, INSERT, UPDATE or DELETE.

    `using` filters the rows a command sees; `check` (default: `using`) is what a written
    row must satisfy. Permissive policies on the same command are OR-ed.
    """

    name: str
    using: str | None = None
    command: str = "ALL"
    check: str | None = None

    def create_sql(self, table: str, quote) -> str:
        sql = f"CREATE POLICY {quote(self.name)} ON {quote(table)} FOR {self.command}"
        if self.using is not None:
            sql += f" USING ({self.using})"
        if self.check is not None:
            sql += f" WITH CHECK ({self.check})"
        return sql


def tenant_rows(column: str = "tenant_id") -> str:
    """The common case: a row is the tenant's named in `column`."""
    return f"enclave_tenant_visible({column})"


class RowSecurity(migrations.operations.base.Operation):
    """ENABLE and FORCE row-level security on `table` and create its policies.

    FORCE makes the table's owner obey the policies too; only superusers and BYPASSRLS
    roles skip them, which is why the application must not connect as one.
    """

    reversible = True
    reduces_to_sql = True

    def __init__(self, table: str, policies: list[Policy]):
        self.table = table
        self.policies = list(policies)

    def deconstruct(self):
        return self.__class__.__qualname__, [self.table, self.policies], {}

    def state_forwards(self, app_label, state):
        pass  # the models do not change

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return
        quote = schema_editor.quote_name
        schema_editor.execute(f"ALTER TABLE {quote(self.table)} ENABLE ROW LEVEL SECURITY")
        schema_editor.execute(f"ALTER TABLE {quote(self.table)} FORCE ROW LEVEL SECURITY")
        for policy in self.policies:
            schema_editor.execute(policy.create_sql(self.table, quote))

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor != "postgresql":
            return
        quote = schema_editor.quote_name
        for policy in self.policies:
            schema_editor.execute(
                f"DROP POLICY IF EXISTS {quote(policy.name)} ON {quote(self.table)}"
            )
        schema_editor.execute(f"ALTER TABLE {quote(self.table)} NO FORCE ROW LEVEL SECURITY")
        schema_editor.execute(f"ALTER TABLE {quote(self.table)} DISABLE ROW LEVEL SECURITY")

    def describe(self):
        return f"Row-level security on {self.table} ({len(self.policies)} policies)"


class PostgresSQL(migrations.RunSQL):
    """RunSQL that runs only on PostgreSQL (the embedded SQLite default has no RLS)."""

    def database_forwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_forwards(app_label, schema_editor, from_state, to_state)

    def database_backwards(self, app_label, schema_editor, from_state, to_state):
        if schema_editor.connection.vendor == "postgresql":
            super().database_backwards(app_label, schema_editor, from_state, to_state)
