"""The second wall: PostgreSQL row-level security (controlplane.rls).

A meta-test walks pg_catalog: every table whose rows belong to a tenant (a tenant column,
or a foreign key to such a table, transitively) has row-level security enabled AND
forced, and at least one policy. The application's role is no superuser, does not bypass
RLS and owns nothing. Then the wall itself, connected as that role: a tenant's context
sees only its rows with an unfiltered query, cannot write another tenant's, an unset
context sees nothing and 'system' sees everything; federations are shared exactly with
their members; the request path (API key, console tenant) narrows the connection and the
end of the request restores 'system'.
"""

import psycopg
import pytest
from django.core.signals import request_finished, request_started
from django.db import connection

from controlplane.rls import context
from controlplane.rls.roles import app_role_check
from tests.conftest import APP_ROLE

# Each table's rows belong to a tenant: through `tenant_id`, the federation's owner, or a
# parent row (a job, a federation). The meta-test must find at least these.
KNOWN_TENANT_TABLES = {
    "tenancy_tenant", "tenancy_membership", "tenancy_apikey", "tenancy_dailyusage",
    "vault_tenantkey", "vault_blob", "files_file", "tuning_finetuningjob",
    "tuning_finetuningevent", "tuning_finetuningcheckpoint", "tuning_adapter",
    "serving_batch", "audit_auditevent", "federation_federation", "federation_participant",
    "federation_federatedround", "federation_globaladapter",
}  # fmt: skip

TENANT_TABLES_SQL = """
WITH RECURSIVE walled(oid) AS (
    SELECT 'tenancy_tenant'::regclass::oid
    UNION
    SELECT a.attrelid FROM pg_attribute a JOIN pg_class c ON c.oid = a.attrelid
    JOIN pg_namespace n ON n.oid = c.relnamespace
    WHERE a.attname = 'tenant_id' AND NOT a.attisdropped AND c.relkind IN ('r', 'p')
      AND n.nspname = 'public'
    UNION
    SELECT con.conrelid FROM pg_constraint con JOIN walled w ON con.confrelid = w.oid
    WHERE con.contype = 'f'
)
SELECT c.relname, c.relrowsecurity, c.relforcerowsecurity,
       (SELECT count(*) FROM pg_policy p WHERE p.polrelid = c.oid)
FROM walled w JOIN pg_class c ON c.oid = w.oid ORDER BY c.relname
"""


def _tenant_tables() -> dict[str, tuple[bool, bool, int]]:
    with connection.cursor() as cursor:
        cursor.execute(TENANT_TABLES_SQL)
        return {name: (rls, forced, policies) for name, rls, forced, policies in cursor}


def _unwalled() -> list[str]:
    return [
        f"{name} (enabled={rls}, forced={forced}, policies={policies})"
        for name, (rls, forced, policies) in _tenant_tables().items()
        if not (rls and forced and policies)
    ]


@pytest.mark.django_db
def test_every_tenant_table_has_forced_row_security_and_a_policy():
    tables = _tenant_tables()
    assert KNOWN_TENANT_TABLES <= set(tables), KNOWN_TENANT_TABLES - set(tables)
    assert _unwalled() == [], "tables holding tenant rows without a forced policy: " + str(
        _unwalled()
    )


@pytest.mark.django_db
def test_the_meta_test_catches_a_new_tenant_table_until_it_is_walled():
    with connection.cursor() as cursor:
        cursor.execute(
            "CREATE TABLE rls_probe (id bigserial PRIMARY KEY, "
            "tenant_id bigint REFERENCES tenancy_tenant(id))"
        )
        cursor.execute("CREATE TABLE rls_probe_child (id bigserial PRIMARY KEY, "
                       "probe_id bigint REFERENCES rls_probe(id))")  # fmt: skip
        assert any(u.startswith("rls_probe ") for u in _unwalled())
        assert any(u.startswith("rls_probe_child ") for u in _unwalled())  # via its parent
        cursor.execute("ALTER TABLE rls_probe ENABLE ROW LEVEL SECURITY")
        cursor.execute("CREATE POLICY p ON rls_probe USING (enclave_tenant_visible(tenant_id))")
        assert any(u.startswith("rls_probe ") for u in _unwalled())  # enabled, not forced
        cursor.execute("ALTER TABLE rls_probe FORCE ROW LEVEL SECURITY")
        assert not any(u.startswith("rls_probe ") for u in _unwalled())
    # the test's transaction rolls back: the probe tables go with it


def _app_connect(test_database_url: str) -> psycopg.Connection:
    return psycopg.connect(test_database_url, autocommit=True)


def test_the_app_role_is_no_superuser_does_not_bypass_rls_and_owns_nothing(test_database_url):
    assert test_database_url.startswith(f"postgres://{APP_ROLE}")
    with _app_connect(test_database_url) as conn:
        superuser, bypassrls, owned = conn.execute(
            "SELECT rolsuper, rolbypassrls, (SELECT count(*) FROM pg_class c "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE n.nspname = 'public' "
            "AND c.relowner = r.oid) FROM pg_roles r WHERE rolname = current_user"
        ).fetchone()
        assert (superuser, bypassrls, owned) == (False, False, 0)
        # Only an owner may switch the wall off.
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            conn.execute("ALTER TABLE files_file NO FORCE ROW LEVEL SECURITY")


def test_child_processes_connect_as_the_app_role(process_env):
    assert process_env["DATABASE_URL"].startswith(f"postgres://{APP_ROLE}@")


@pytest.fixture
def two_tenants(transactional_db, make_tenant):
    """Tenants A and B, each with an API key, a file (so a blob and a tenant key) and usage."""
    from controlplane.files.services import file_create_from_bytes
    from controlplane.tenancy.services import usage_record

    made = {}
    for slug in ("rls-a", "rls-b"):
        tenant, raw = make_tenant(slug)
        file = file_create_from_bytes(tenant=tenant, filename=f"{slug}.jsonl",
                                      purpose="fine-tune", data=b'{"x": 1}\n')  # fmt: skip
        usage_record(tenant=tenant, requests=1, prompt_tokens=3, completion_tokens=4)
        made[slug] = (tenant, raw, file)
    return made


def _count(conn, table: str) -> int:
    return conn.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


WALLED = ("tenancy_apikey", "files_file", "vault_blob", "vault_tenantkey", "tenancy_dailyusage")


def test_a_tenant_context_sees_only_its_rows_and_cannot_write_anothers(
    two_tenants, test_database_url
):
    from controlplane.files.models import File

    a, _, file_a = two_tenants["rls-a"]
    b, _, file_b = two_tenants["rls-b"]
    with _app_connect(test_database_url) as conn:
        # Unset (a session nobody configured): nothing at all, not even the directory.
        for table in (*WALLED, "tenancy_tenant"):
            assert _count(conn, table) == 0, table
        conn.execute("SELECT set_config('enclave.tenant_id', 'system', false)")
        for table in WALLED:
            assert _count(conn, table) >= 2, table
        conn.execute("SELECT set_config('enclave.tenant_id', %s, false)", [str(a.pk)])
        for table in WALLED:
            owners = {r[0] for r in conn.execute(f"SELECT tenant_id FROM {table}")}
            assert owners == {a.pk}, table
        # The ORM's unfiltered query, run on this connection.
        sql, params = File.objects.all().query.sql_with_params()
        assert [r[0] for r in conn.execute(sql, params)] == [file_a.id]
        # The tenant directory stays readable (invitations name tenants by slug).
        assert _count(conn, "tenancy_tenant") >= 2
        # Writes to B's rows: invisible, so nothing changes; a new row for B is refused.
        assert conn.execute("UPDATE files_file SET filename = 'x' WHERE id = %s",
                            [file_b.id]).rowcount == 0  # fmt: skip
        assert conn.execute("DELETE FROM tenancy_apikey WHERE tenant_id = %s",
                            [b.pk]).rowcount == 0  # fmt: skip
        assert conn.execute("UPDATE tenancy_tenant SET storage_bytes = 1 WHERE id = %s",
                            [b.pk]).rowcount == 0  # fmt: skip
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute(
                "INSERT INTO tenancy_dailyusage (tenant_id, day, requests, prompt_tokens, "
                "completion_tokens, training_tokens) VALUES (%s, '2000-01-01', 0, 0, 0, 0)",
                [b.pk],
            )
        with pytest.raises(psycopg.errors.InsufficientPrivilege, match="row-level security"):
            conn.execute("UPDATE files_file SET tenant_id = %s WHERE id = %s",
                         [b.pk, file_a.id])  # fmt: skip
    b_file = File.objects.get(pk=file_b.id)
    assert b_file.filename == "rls-b.jsonl" and b.api_keys.count() == 1


@pytest.fixture
def app_role_orm(test_database_url):
    """Django's own connection, in this process, as the application's role."""
    connection.close()
    owner = connection.settings_dict["USER"]
    connection.settings_dict["USER"] = APP_ROLE
    try:
        yield connection
    finally:
        connection.close()
        connection.settings_dict["USER"] = owner


def test_an_api_key_narrows_the_orm_and_the_end_of_the_request_restores_system(
    two_tenants, app_role_orm
):
    from controlplane.api import principal_from_authorization
    from controlplane.files.models import File
    from controlplane.tenancy.models import ApiKey

    a, _, _ = two_tenants["rls-a"]
    b, raw_b, file_b = two_tenants["rls-b"]
    assert app_role_check()["role"] == APP_ROLE
    assert context.current() == context.SYSTEM  # a new connection starts as 'system'
    assert File.objects.count() == 2
    request_started.send(sender=None)
    principal = principal_from_authorization(f"Bearer {raw_b}")
    assert principal.tenant == b and context.current() == str(b.pk)
    assert app_role_check()["walled"]
    assert list(File.objects.values_list("id", flat=True)) == [file_b.id]
    assert set(ApiKey.objects.values_list("tenant_id", flat=True)) == {b.pk}
    assert not File.objects.filter(tenant=a).exists()
    request_finished.send(sender=None)
    assert context.current() == context.SYSTEM
    assert File.objects.count() == 2


def test_the_console_tenant_narrows_the_connection(two_tenants, app_role_orm, rf):
    from django.contrib.auth import get_user_model
    from django.contrib.sessions.backends.db import SessionStore

    from controlplane.console.access import principal_for
    from controlplane.files.models import File
    from controlplane.tenancy.models import Membership

    a, _, file_a = two_tenants["rls-a"]
    b, _, _ = two_tenants["rls-b"]
    user = get_user_model().objects.create_user("rls-both", password="x-long-password-1")
    Membership.objects.create(user=user, tenant=a, role="member")
    Membership.objects.create(user=user, tenant=b, role="member")
    request = rf.get("/console/")
    request.user, request.session = user, SessionStore()
    request.session["console_tenant_id"] = a.pk
    assert principal_for(request).tenant == a
    assert list(File.objects.values_list("id", flat=True)) == [file_a.id]
    assert list(Membership.objects.values_list("tenant_id", flat=True)) == [a.pk]
    request_finished.send(sender=None)
    assert File.objects.count() == 2


@pytest.fixture
def federation(two_tenants, make_tenant):
    """A's federation: B accepted, C invited then declined, D never invited; round 1 made
    a global adapter stored under A's keys."""
    from controlplane.federation.models import (
        FederatedRound,
        Federation,
        GlobalAdapter,
        Participant,
    )
    from controlplane.vault.services import blob_put

    a, _, _ = two_tenants["rls-a"]
    b, _, _ = two_tenants["rls-b"]
    c, _ = make_tenant("rls-c")
    d, _ = make_tenant("rls-d")
    fed = Federation.objects.create(owner=a, name="rls", base_model="enclave-test")
    Participant.objects.create(federation=fed, tenant=a, status="accepted")
    Participant.objects.create(federation=fed, tenant=b, status="accepted")
    Participant.objects.create(federation=fed, tenant=c, status="declined")
    fed_round = FederatedRound.objects.create(federation=fed, number=1, status="succeeded")
    blob = blob_put(tenant=a, kind="federation:adapter", source=[b"adapter bytes"])
    adapter = GlobalAdapter.objects.create(
        id=f"fed:enclave-test:{fed.id}:r1", federation=fed, round=fed_round, blob=blob
    )
    return {"a": a, "b": b, "c": c, "d": d, "fed": fed, "adapter": adapter}


def test_a_federation_is_shared_with_its_members_only(federation, app_role_orm):
    from controlplane.federation.models import (
        FederatedRound,
        Federation,
        GlobalAdapter,
        Participant,
    )
    from controlplane.vault.exceptions import BlobNotFound
    from controlplane.vault.selectors import blob_read_bytes

    f = federation
    a, b, c, d = f["a"], f["b"], f["c"], f["d"]
    blob_id = f["adapter"].blob_id

    # B, an accepted member: sees the federation, the roster, the rounds, the adapter, and
    # can decrypt the adapter kept under A's keys (what its chat does).
    context.tenant_narrow(tenant_id=b.pk)
    assert list(Federation.objects.values_list("id", flat=True)) == [f["fed"].id]
    assert Participant.objects.count() == 3
    assert FederatedRound.objects.count() == 1 and GlobalAdapter.objects.count() == 1
    assert blob_read_bytes(tenant=a, blob_id=blob_id) == b"adapter bytes"
    # ... but changes only its own seat, never the federation or another seat.
    assert Federation.objects.filter(pk=f["fed"].pk).update(name="taken") == 0
    assert Participant.objects.filter(tenant=c).update(status="accepted") == 0
    assert Participant.objects.filter(tenant=b).update(node_name="b-node") == 1
    assert FederatedRound.objects.update(number=9) == 0

    # C declined: it keeps its own seat row and nothing else.
    context.tenant_narrow(tenant_id=c.pk)
    assert Federation.objects.count() == 0 and GlobalAdapter.objects.count() == 0
    assert list(Participant.objects.values_list("tenant_id", flat=True)) == [c.pk]
    with pytest.raises(BlobNotFound):
        blob_read_bytes(tenant=a, blob_id=blob_id)

    # D, never invited: nothing; it cannot seat itself either.
    context.tenant_narrow(tenant_id=d.pk)
    assert Federation.objects.count() == 0 and Participant.objects.count() == 0
    assert FederatedRound.objects.count() == 0
    from django.db import DatabaseError, transaction

    with pytest.raises(DatabaseError, match="row-level security"), transaction.atomic():
        Participant.objects.create(federation_id=f["fed"].pk, tenant=d, status="accepted")

    # A, the owner: everything of its federation, and it may invite.
    context.tenant_narrow(tenant_id=a.pk)
    Participant.objects.create(federation=f["fed"], tenant=d)
    assert Participant.objects.count() == 4
    assert Federation.objects.filter(pk=f["fed"].pk).update(name="renamed") == 1
    context.system_restore()
    assert Participant.objects.get(tenant=b).node_name == "b-node"
    assert Federation.objects.get().name == "renamed"


@pytest.mark.django_db
def test_db_app_role_grants_the_role_in_the_app_url_and_refuses_a_superuser(test_database_url):
    from io import StringIO

    from django.core.management import CommandError, call_command

    out = StringIO()
    call_command("db_app_role", "--app-url", test_database_url, stdout=out)  # idempotent
    assert f"granted {APP_ROLE} row access" in out.getvalue()
    with pytest.raises(CommandError, match="owner"):
        call_command("db_app_role", connection.settings_dict["USER"])
    with connection.cursor() as cursor:
        cursor.execute("CREATE ROLE rls_probe_superuser SUPERUSER")  # rolled back with the test
    with pytest.raises(CommandError, match="superuser"):
        call_command("db_app_role", "rls_probe_superuser")
