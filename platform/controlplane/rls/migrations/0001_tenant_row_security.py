"""Row-level security on every table whose rows belong to a tenant (see controlplane.rls).

The context is the session setting `enclave.tenant_id`: 'system', a tenant's id, or unset
(sees nothing). Federations are shared: the owner, and the tenants it invited, see the
federation, its seats and its rounds; the owner and the members who accepted see its
global adapters, and the blobs and tenant keys that hold them (a member's chat decrypts
the owner's adapter). Only the owner (or 'system') writes them, except that a member
updates its own seat (accept, decline).
"""

from django.db import migrations

from controlplane.rls.operations import Policy, PostgresSQL, RowSecurity, tenant_rows

FUNCTIONS = """
CREATE OR REPLACE FUNCTION enclave_viewer() RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT current_setting('enclave.tenant_id', true) $$;

CREATE OR REPLACE FUNCTION enclave_tenant_visible(p_tenant bigint) RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
AS $$ SELECT coalesce(enclave_viewer() = 'system' OR enclave_viewer() = p_tenant::text, false) $$;

-- What p_viewer is to federation p_fed: 'owner', its seat's status, or NULL. It reads the
-- federation tables as 'system' (the SET clause, undone on return): the policies of
-- federations and of seats call it, and would otherwise refer to each other.
CREATE OR REPLACE FUNCTION enclave_federation_role(p_fed varchar, p_viewer text) RETURNS text
LANGUAGE sql STABLE SET enclave.tenant_id = 'system'
AS $$
    SELECT CASE WHEN f.owner_id::text = p_viewer THEN 'owner' ELSE p.status END
    FROM federation_federation f
    LEFT JOIN federation_participant p
        ON p.federation_id = f.id AND p.tenant_id::text = p_viewer
    WHERE f.id = p_fed
$$;

-- The owner and every invited tenant that has not declined (federation.selectors).
CREATE OR REPLACE FUNCTION enclave_federation_visible(p_fed varchar) RETURNS boolean
LANGUAGE sql STABLE
AS $$ SELECT coalesce(enclave_viewer() = 'system'
                      OR enclave_federation_role(p_fed, enclave_viewer()) <> 'declined', false) $$;

CREATE OR REPLACE FUNCTION enclave_federation_owned(p_fed varchar) RETURNS boolean
LANGUAGE sql STABLE
AS $$ SELECT coalesce(enclave_viewer() = 'system'
                      OR enclave_federation_role(p_fed, enclave_viewer()) = 'owner', false) $$;

-- The owner and the members that accepted: who may use the federation's global adapters.
CREATE OR REPLACE FUNCTION enclave_federation_shared(p_fed varchar) RETURNS boolean
LANGUAGE sql STABLE
AS $$ SELECT coalesce(enclave_viewer() = 'system'
                      OR enclave_federation_role(p_fed, enclave_viewer()) IN ('owner', 'accepted'),
                      false) $$;

-- A blob that holds a global adapter the viewer may use (it is under the owner's keys).
CREATE OR REPLACE FUNCTION enclave_blob_shared(p_blob uuid, p_viewer text) RETURNS boolean
LANGUAGE sql STABLE SET enclave.tenant_id = 'system'
AS $$
    SELECT EXISTS (
        SELECT 1 FROM federation_globaladapter g
        WHERE g.blob_id = p_blob
          AND enclave_federation_role(g.federation_id, p_viewer) IN ('owner', 'accepted'))
$$;

-- A tenant key that wraps such a blob's data key.
CREATE OR REPLACE FUNCTION enclave_tenant_key_shared(p_key varchar, p_viewer text)
RETURNS boolean
LANGUAGE sql STABLE SET enclave.tenant_id = 'system'
AS $$
    SELECT EXISTS (
        SELECT 1 FROM vault_blob b JOIN federation_globaladapter g ON g.blob_id = b.id
        WHERE b.tenant_key_id = p_key
          AND enclave_federation_role(g.federation_id, p_viewer) IN ('owner', 'accepted'))
$$;
"""

DROP_FUNCTIONS = """
DROP FUNCTION IF EXISTS enclave_tenant_key_shared(varchar, text);
DROP FUNCTION IF EXISTS enclave_blob_shared(uuid, text);
DROP FUNCTION IF EXISTS enclave_federation_shared(varchar);
DROP FUNCTION IF EXISTS enclave_federation_owned(varchar);
DROP FUNCTION IF EXISTS enclave_federation_visible(varchar);
DROP FUNCTION IF EXISTS enclave_federation_role(varchar, text);
DROP FUNCTION IF EXISTS enclave_tenant_visible(bigint);
DROP FUNCTION IF EXISTS enclave_viewer();
"""

OWN = "enclave_tenant_rows"


def _job_rows(table: str) -> str:
    """A job's child row is visible when its job is (the job table's own policy decides)."""
    return f"EXISTS (SELECT 1 FROM tuning_finetuningjob j WHERE j.id = {table}.job_id)"


class Migration(migrations.Migration):
    dependencies = [
        ("audit", "0001_initial"),
        ("federation", "0002_federatedround_bell_rung_at"),
        ("files", "0002_alter_file_purpose"),
        ("serving", "0002_batch_bell_rung_at"),
        ("tenancy", "0002_tenant_max_concurrent_jobs_and_more"),
        ("tuning", "0002_finetuningjob_bell_rung_at"),
        ("vault", "0001_initial"),
    ]

    operations = [
        PostgresSQL(FUNCTIONS, DROP_FUNCTIONS),
        # The tenant directory: any tenant context reads it (invitations name tenants by
        # slug, rosters show slugs); a tenant writes only its own row; unset reads nothing.
        RowSecurity(
            "tenancy_tenant",
            [
                Policy("enclave_tenant_self", using="enclave_tenant_visible(id)"),
                Policy(
                    "enclave_tenant_directory",
                    command="SELECT",
                    using="coalesce(enclave_viewer(), '') <> ''",
                ),
            ],
        ),
        *(
            RowSecurity(table, [Policy(OWN, using=tenant_rows())])
            for table in (
                "tenancy_membership",
                "tenancy_apikey",
                "tenancy_dailyusage",
                "files_file",
                "tuning_finetuningjob",
                "tuning_adapter",
                "serving_batch",
                "audit_auditevent",
            )
        ),
        *(
            RowSecurity(table, [Policy("enclave_job_rows", using=_job_rows(table))])
            for table in ("tuning_finetuningevent", "tuning_finetuningcheckpoint")
        ),
        RowSecurity(
            "vault_blob",
            [
                Policy(OWN, using=tenant_rows()),
                Policy(
                    "enclave_shared_adapter_blob",
                    command="SELECT",
                    using="enclave_blob_shared(id, enclave_viewer())",
                ),
            ],
        ),
        RowSecurity(
            "vault_tenantkey",
            [
                Policy(OWN, using=tenant_rows()),
                Policy(
                    "enclave_shared_adapter_key",
                    command="SELECT",
                    using="enclave_tenant_key_shared(key_id, enclave_viewer())",
                ),
            ],
        ),
        RowSecurity(
            "federation_federation",
            [
                Policy("enclave_federation_owner", using=tenant_rows("owner_id")),
                Policy(
                    "enclave_federation_members",
                    command="SELECT",
                    using="enclave_federation_visible(id)",
                ),
            ],
        ),
        RowSecurity(
            "federation_participant",
            [
                Policy("enclave_federation_owner", using="enclave_federation_owned(federation_id)"),
                Policy("enclave_own_seat", command="UPDATE", using=tenant_rows()),
                Policy(
                    "enclave_federation_members",
                    command="SELECT",
                    using=f"{tenant_rows()} OR enclave_federation_visible(federation_id)",
                ),
            ],
        ),
        RowSecurity(
            "federation_federatedround",
            [
                Policy("enclave_federation_owner", using="enclave_federation_owned(federation_id)"),
                Policy(
                    "enclave_federation_members",
                    command="SELECT",
                    using="enclave_federation_visible(federation_id)",
                ),
            ],
        ),
        RowSecurity(
            "federation_globaladapter",
            [
                Policy("enclave_federation_owner", using="enclave_federation_owned(federation_id)"),
                Policy(
                    "enclave_federation_accepted",
                    command="SELECT",
                    using="enclave_federation_shared(federation_id)",
                ),
            ],
        ),
    ]
