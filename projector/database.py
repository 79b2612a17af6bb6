"""Engines and schema for the read model: SQLite (aiosqlite, WAL) by default, PostgreSQL (asyncpg) by URL.

This is the one module that knows which SQL dialect it talks to.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from sqlalchemy import Connection, Executable, Table, event, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from projector.tables import READ_MODEL_TABLES, metadata

# Ingress (record_queued) and the projector write the same SQLite file from two processes;
# a writer waits this long for the other's transaction instead of failing at once.
SQLITE_BUSY_TIMEOUT_MS = 10_000

T = TypeVar("T")

# Execution option marking a connection whose transaction will write (see write).
_WRITE_OPTION = "imagebus_write"

# Arbitrary constant key for the advisory lock that serialises create/drop of the schema.
_SCHEMA_LOCK_KEY = 0x1A6EB05


def create_engine(url: str) -> AsyncEngine:
    """An async engine for ``sqlite:///file.db`` or ``postgresql://`` / ``postgres://`` URLs.

    Any sync driver named in the URL is swapped for the async one (aiosqlite, asyncpg).
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        return _sqlite_engine(parsed.set(drivername="sqlite+aiosqlite"))
    if backend in ("postgresql", "postgres"):
        return _postgres_engine(parsed)
    raise ValueError(f"unsupported read-model URL {parsed.render_as_string()!r}: use sqlite:// or postgresql://")


def _sqlite_engine(url: URL) -> AsyncEngine:
    engine = create_async_engine(url)

    @event.listens_for(engine.sync_engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN out of the driver's hands (it only begins before DML, so a read-then-write
        # transaction would not be one); SQLAlchemy emits it in _begin below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # WAL: readers (ingress) never block the writer (projector) and vice versa.
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # In WAL mode NORMAL stays consistent across crashes; a power cut may lose the last
        # commits, rows and position together, and the projector simply replays them.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _begin(connection: Connection) -> None:
        # A deferred transaction that reads and then writes fails with SQLITE_BUSY_SNAPSHOT (no
        # busy wait) when another process committed in between; writers take the lock up front.
        if connection.get_execution_options().get(_WRITE_OPTION):
            connection.exec_driver_sql("BEGIN IMMEDIATE")
        else:
            connection.exec_driver_sql("BEGIN")

    return engine


def _postgres_engine(url: URL) -> AsyncEngine:
    driver = url.drivername.partition("+")[2]
    if driver not in ("asyncpg", "psycopg", "psycopg_async"):
        url = url.set(drivername="postgresql+asyncpg")
    if url.drivername == "postgresql+asyncpg" and "sslmode" in url.query:
        # libpq spelling in a URL that asyncpg only understands as ``ssl``.
        mode = url.query["sslmode"]
        url = url.difference_update_query(["sslmode"]).update_query_dict({"ssl": mode})
    return create_async_engine(
        url,
        pool_size=10,
        max_overflow=20,
        # Survive a database restart or a proxy that drops idle connections.
        pool_pre_ping=True,
        pool_recycle=1800,
    )


async def write(engine: AsyncEngine, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """Run ``work`` in a write transaction that always ends in a commit or a rollback.

    A cancellation arriving mid-statement would make SQLAlchemy close an aiosqlite connection
    whose statement is still open: SQLite keeps such a "zombie" connection, and its write lock,
    until it is garbage-collected, and every other writer (other processes too) waits on it.
    So the transaction runs in its own task and a cancellation is delivered once it has ended.
    Transactions here last milliseconds.
    """

    async def transaction() -> T:
        async with engine.connect() as conn:
            # Read by the SQLite "begin" hook: this transaction takes the write lock up front.
            await conn.execution_options(**{_WRITE_OPTION: True})
            async with conn.begin():
                return await work(conn)

    task = asyncio.ensure_future(transaction())
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError:
        await asyncio.wait({task})
        raise


async def create_schema(engine: AsyncEngine) -> None:
    """Create the read-model tables that are missing (idempotent; safe from several processes)."""

    async def create(conn: AsyncConnection) -> None:
        await _lock_schema(conn)
        await conn.run_sync(metadata.create_all)

    await write(engine, create)


async def reset_schema(engine: AsyncEngine) -> None:
    """Drop and recreate the read-model tables in one transaction (readers never see them missing)."""

    async def recreate(conn: AsyncConnection) -> None:
        await _lock_schema(conn)
        await conn.run_sync(lambda sync: metadata.drop_all(sync, tables=list(READ_MODEL_TABLES)))
        await conn.run_sync(metadata.create_all)

    await write(engine, recreate)


async def _lock_schema(conn: AsyncConnection) -> None:
    # Two roles starting together would both find a table missing and race on CREATE TABLE.
    # SQLite is already serialised by BEGIN IMMEDIATE.
    if conn.dialect.name == "postgresql":
        await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})


async def upsert(conn: AsyncConnection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert rows, replacing every non-key column of rows whose primary key already exists."""
    if rows:
        await conn.execute(_upsert_statement(conn.dialect.name, table), list(rows))


async def insert_if_absent(conn: AsyncConnection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert rows whose primary key is not there yet; leave existing rows untouched."""
    if rows:
        await conn.execute(_insert_if_absent_statement(conn.dialect.name, table), list(rows))


# Built once per dialect and table: constructing ON CONFLICT clauses costs more than running them.
@functools.cache
def _upsert_statement(dialect: str, table: Table) -> Executable:
    statement = _insert(dialect, table)
    keys = [column.name for column in table.primary_key.columns]
    replace = {column.name: statement.excluded[column.name] for column in table.columns if column.name not in keys}
    return statement.on_conflict_do_update(index_elements=keys, set_=replace)


@functools.cache
def _insert_if_absent_statement(dialect: str, table: Table) -> Executable:
    keys = [column.name for column in table.primary_key.columns]
    return _insert(dialect, table).on_conflict_do_nothing(index_elements=keys)


def _insert(dialect: str, table: Table) -> sqlite.Insert | postgresql.Insert:
    # ON CONFLICT exists in both dialects but only behind their own insert() constructs.
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"unsupported dialect {dialect!r}")
