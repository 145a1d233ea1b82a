"""The session context row-level security reads: `enclave.tenant_id` on the connection.

'system' sees every row; a tenant's primary key (as text) sees that tenant's rows; unset
or empty sees nothing. Only PostgreSQL has it: on SQLite (the embedded default) every
function here does nothing.
"""

import logging

from django.db import DatabaseError, connection

log = logging.getLogger(__name__)

SETTING = "enclave.tenant_id"
SYSTEM = "system"


def _set(conn, value: str) -> None:
    with conn.cursor() as cursor:
        # set_config(..., false): for the session, not only the current transaction.
        cursor.execute("SELECT set_config(%s, %s, false)", [SETTING, value])


def on_connection_created(sender, connection, **kwargs) -> None:
    """Every new PostgreSQL connection starts in the 'system' context."""
    if connection.vendor == "postgresql":
        _set(connection, SYSTEM)


def tenant_narrow(*, tenant_id: int, conn=None) -> None:
    """Narrow this thread's connection to one tenant's rows until the request ends.

    Called once a request is authenticated as a tenant (an API key, the console's chosen
    tenant). The connection stays narrowed until `system_restore` (the end of the request).
    """
    conn = conn or connection
    if conn.vendor != "postgresql":
        return
    _set(conn, str(int(tenant_id)))


def system_restore(*, conn=None) -> None:
    """Back to the 'system' context, if this thread has an open connection.

    Never opens a connection. A connection that cannot be reset (a broken transaction) is
    closed rather than handed to the next request in a tenant's context.
    """
    conn = conn or connection
    if conn.vendor != "postgresql" or conn.connection is None:
        return
    try:
        _set(conn, SYSTEM)
    except DatabaseError:
        log.warning("could not reset the row-level security context; closing the connection")
        conn.close()


def current(*, conn=None) -> str | None:
    """The connection's context: 'system', a tenant id, or None when unset (or SQLite)."""
    conn = conn or connection
    if conn.vendor != "postgresql":
        return None
    with conn.cursor() as cursor:
        cursor.execute("SELECT current_setting(%s, true)", [SETTING])
        value = cursor.fetchone()[0]
    return value or None


def on_request_boundary(sender, **kwargs) -> None:
    system_restore()
