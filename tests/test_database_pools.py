"""PostgreSQL connection pools: what one handle may open, and the settings that size it.

Operators size the server's ``max_connections`` from these (docs/deploy.md): a handle opening
more than its pool would exhaust the server once the ingress HPA adds replicas.
"""

from __future__ import annotations

import asyncio

import pytest
from sqlalchemy import Connection, text

from imagebus.roles import ingress_config
from imagebus.settings import IngressSettings, ProjectorSettings
from ingress.services import open_database
from projector.database import Database, create_database

CONCURRENT = 6


def _backend_pid(conn: Connection) -> int:
    # Held a moment, so the transactions started together overlap and each needs a connection.
    conn.execute(text("SELECT pg_sleep(0.2)"))
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


async def connections_used(database: Database) -> int:
    """How many server connections CONCURRENT transactions at once were spread over."""
    try:
        pids = await asyncio.gather(*(database.read(_backend_pid) for _ in range(CONCURRENT)))
    finally:
        await database.dispose()
    return len(set(pids))


@pytest.mark.parametrize("database_kind", ["postgresql"])
@pytest.mark.parametrize(
    ("pool", "connections"),
    [({"pool_size": 2, "pool_overflow": 0}, 2), ({"pool_size": 1, "pool_overflow": 2}, 3), ({}, CONCURRENT)],
    ids=["2+0", "1+2", "default"],
)
async def test_a_handle_opens_at_most_its_pool(database_url: str, pool: dict[str, int], connections: int) -> None:
    """Transactions beyond the pool wait for a connection instead of opening another."""
    assert await connections_used(create_database(database_url, **pool)) == connections


@pytest.mark.parametrize("database_kind", ["postgresql"])
async def test_the_pool_settings_reach_the_ingress_handles(database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEBUS_DATABASE_URL", database_url)
    monkeypatch.setenv("IMAGEBUS_DATABASE_POOL_SIZE", "1")
    monkeypatch.setenv("IMAGEBUS_DATABASE_POOL_OVERFLOW", "1")
    config = ingress_config(IngressSettings())
    assert await connections_used(open_database(config)) == 2
    projector = ProjectorSettings()
    assert (projector.database_pool_size, projector.database_pool_overflow) == (1, 1)


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_a_pool_of_no_connections_is_refused(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEBUS_DATABASE_POOL_SIZE", value)
    with pytest.raises(ValueError, match="IMAGEBUS_DATABASE_POOL_SIZE"):
        IngressSettings()
