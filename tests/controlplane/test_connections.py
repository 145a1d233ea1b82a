"""The web process does not leak database connections under concurrent requests.

Django runs each ASGI request's synchronous code in a thread of its own; a persistent
connection (CONN_MAX_AGE > 0) stayed open behind every finished request's thread until
PostgreSQL refused clients (bench/load.py found it). controlplane.asgi closes them.
"""

import asyncio

import httpx
import pytest
from django.db import connection

pytestmark = pytest.mark.django_db(transaction=True)


def _app_connections(db_name: str) -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND usename = %s",
            [db_name, "enclave_app"],
        )
        return cursor.fetchone()[0]


def test_concurrent_requests_leave_no_connections_behind(live_server_url, make_tenant):
    _tenant, key = make_tenant("conn-leak")
    db_name = connection.settings_dict["NAME"]

    async def burst(n: int) -> list[int]:
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=live_server_url, headers=headers) as client:
            answers = await asyncio.gather(*(client.get("/v1/files") for _ in range(n)))
        return [a.status_code for a in answers]

    assert set(asyncio.run(burst(4))) == {200}  # warm: the web process has connected
    before = _app_connections(db_name)
    for _ in range(4):
        assert set(asyncio.run(burst(20))) == {200}
    after = _app_connections(db_name)
    # 80 requests in bursts of 20: with the leak every one of them kept a connection.
    assert after <= before + 2, (before, after)
