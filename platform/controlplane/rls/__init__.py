"""PostgreSQL row-level security: the second wall between tenants.

The first wall is the application: every view reaches tenant data through selectors that
filter by the caller's tenant. This app adds a wall inside the database, so a forgotten
filter returns nothing of another tenant's instead of everything:

- `migrations/` enables and FORCEs row-level security on every table whose rows belong
  to a tenant (directly through a tenant column, or through a parent such as a job or a
  federation) and creates its policies. `operations.RowSecurity` is the migration
  operation a later migration uses for a new tenant table; tests/controlplane/test_rls.py
  fails while one lacks it.
- Each database session carries a context, the custom setting `enclave.tenant_id`:
  'system' (workers, beat, management commands, the admin, authentication lookups) sees
  every row; a tenant's id sees that tenant's rows (and the federation rows shared with
  it); unset sees nothing. `context` sets it: every new connection starts as 'system', a
  request authenticated as a tenant narrows its connection (`tenant_narrow`), and every
  request starts and ends by resetting it to 'system'.
- The application connects as a role that neither owns the tables nor bypasses RLS
  (`manage.py db_app_role`); migrations run as the owner. Superusers and BYPASSRLS roles
  skip every policy, so the role is what makes the wall real.

What it guards against: application code that forgets a tenant filter or follows a
foreign id. What it does not: someone who can run arbitrary SQL as the application role
can set the context to 'system' (SQL injection must be prevented by the ORM, as it is).
Needs session state, so a pooler in front of PostgreSQL must use session pooling.
"""
