"""The read model's database: SQLite (stdlib sqlite3, WAL) by default, PostgreSQL (asyncpg) by URL.

Queries are plain synchronous SQLAlchemy Core functions of a ``Connection``, the same on both
databases; ``Database.read`` and ``Database.write`` run one such function as one transaction.
On SQLite that is one hop to a worker thread running the stdlib driver: per statement, an async
driver would cost a thread hop and a greenlet switch, a hundred times the statement itself.
On PostgreSQL the function runs on the asyncpg connection through ``run_sync``.

``Database.point_read`` is for the hottest reads (a status poll): one SELECT by key. On SQLite it
runs the statement's SQL, compiled once, straight on the stdlib driver in the caller's thread,
since the hop and SQLAlchemy's execution path each cost several times the statement itself.

This is the one module that knows which SQL dialect it talks to.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import sqlalchemy
from sqlalchemy import Connection, Dialect, Engine, Executable, Select, Table, event, inspect, select, text
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from projector.apply import JobRow, UsageChanges
from projector.tables import READ_MODEL_TABLES, UTCDateTime, jobs, metadata, owner_daily_images, owner_usage

# Ingress (record_queued) and the projector write the same SQLite file from two processes;
# a writer waits this long for the other's transaction instead of failing at once.
SQLITE_BUSY_TIMEOUT_MS = 10_000

# One writer thread: SQLite takes one writer at a time anyway, and in-process writers then queue
# in order instead of retrying on the busy timeout. Readers run beside it (WAL never blocks them).
_SQLITE_READ_THREADS = 2

T = TypeVar("T")

# A point read on the event loop's thread never waits for a lock: busy, it moves to a reader thread.
_POINT_READ_BUSY_TIMEOUT_MS = 0

# Execution option marking a connection whose transaction will write (read by the SQLite begin hook).
_WRITE_OPTION = "imagebus_write"

# Arbitrary constant key for the advisory lock that serialises create/drop of the schema.
_SCHEMA_LOCK_KEY = 0x1A6EB05


class Database(ABC):
    """Runs synchronous SQLAlchemy Core work against the read model, one transaction per call."""

    @abstractmethod
    async def read(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a read transaction (one snapshot) and return its result."""

    async def write(self, work: Callable[[Connection], T]) -> T:
        """Run ``work`` in a write transaction that always ends in a commit or a rollback.

        A cancellation of the caller is delivered once the transaction has ended: the work is
        never cut off mid-statement (on aiosqlite that left a "zombie" connection holding the
        write lock until garbage collection), and whoever cancelled can rely on no transaction
        of ours still being open. Transactions here last milliseconds.
        """
        transaction = self._start_write(work)
        try:
            return await asyncio.shield(transaction)
        except asyncio.CancelledError:
            await asyncio.wait({transaction})
            raise

    async def point_read(self, statement: Select[Any], params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        """The rows of one SELECT that reads a few rows by key (one snapshot), as tuples in the
        statement's column order with the columns' result types applied.

        Only for statements that take microseconds: on SQLite it may run on the event loop.
        """
        return await self.read(lambda conn: conn.execute(statement, params).all())

    @abstractmethod
    def _start_write(self, work: Callable[[Connection], T]) -> asyncio.Future[T]:
        """Start ``work`` in a write transaction that runs to its end whatever happens to the caller."""

    @abstractmethod
    async def dispose(self) -> None:
        """Wait for work in flight, then close every connection."""


def create_database(url: str, *, pool_size: int = 10, pool_overflow: int = 20) -> Database:
    """The read model at ``sqlite:///file.db`` or a ``postgresql://`` / ``postgres://`` URL.

    SQLite always uses the stdlib driver, a connection per thread. PostgreSQL uses asyncpg unless
    the URL names psycopg, keeping ``pool_size`` connections open and up to ``pool_overflow`` more
    while busy: an ingress process holds two handles and the projector one, so these times the
    replicas must stay under the server's ``max_connections``.
    """
    parsed = make_url(url)
    backend = parsed.get_backend_name()
    if backend == "sqlite":
        if parsed.database in (None, "", ":memory:"):
            raise ValueError("an in-memory SQLite read model would be one per connection: give it a file")
        return SQLiteDatabase(parsed.set(drivername="sqlite+pysqlite"))
    if backend in ("postgresql", "postgres"):
        return PostgresDatabase(parsed, pool_size=pool_size, pool_overflow=pool_overflow)
    raise ValueError(f"unsupported read-model URL {parsed.render_as_string()!r}: use sqlite:// or postgresql://")


class SQLiteDatabase(Database):
    """A SQLite file driven by the stdlib driver in a few dedicated threads, one hop per transaction."""

    def __init__(self, url: URL) -> None:
        # Reader threads, the writer, and the event loop's connection for point reads.
        self._engine = _sqlite_engine(url, pool_size=_SQLITE_READ_THREADS + 2)
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="readmodel-write")
        self._readers = ThreadPoolExecutor(_SQLITE_READ_THREADS, thread_name_prefix="readmodel-read")
        # Each of those threads keeps one connection: a pool checkout per transaction costs more
        # than most of our statements.
        self._thread = threading.local()
        self._connections: list[Connection] = []
        # The caller's (event loop's) own raw connections, one per thread, for point reads.
        self._caller = threading.local()
        self._raw_connections: list[Any] = []
        self._point_queries: dict[Select[Any], _PointQuery] = {}

    async def read(self, work: Callable[[Connection], T]) -> T:
        return await _run_in(self._readers, functools.partial(self._read, work))

    def _start_write(self, work: Callable[[Connection], T]) -> asyncio.Future[T]:
        # Once the thread has it, the transaction runs to its end; cancelling only stops waiting.
        return _run_in(self._writer, functools.partial(self._write, work))

    async def point_read(self, statement: Select[Any], params: Mapping[str, Any]) -> Sequence[Sequence[Any]]:
        query = self._point_queries.get(statement)
        if query is None:
            query = self._point_queries[statement] = _PointQuery.compile(statement, self._engine.dialect)
        arguments = query.arguments(params)
        connection = getattr(self._caller, "connection", None)
        if connection is None:
            connection = await self._open_point_read_connection()
        try:
            # One statement in autocommit mode: its own read transaction, so one snapshot. In WAL
            # mode a reader is almost never busy (a writer does not block it); when it is, the
            # loop does not wait but hands the read to a reader thread, which may.
            rows = connection.execute(query.sql, arguments).fetchall()
        except sqlite3.OperationalError as exc:
            if exc.sqlite_errorcode & 0xFF not in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
                raise
            rows = await self.read(lambda conn: _driver(conn).execute(query.sql, arguments).fetchall())
        return query.processed(rows)

    async def _open_point_read_connection(self) -> sqlite3.Connection:
        """The loop's connection, opened off the loop (its pragmas may wait on a lock) and once: the
        reads that arrive while it opens wait for the same one, since each opened connection holds
        one of the pool's for good (a burst of first requests used to exhaust it)."""
        opening: asyncio.Future[sqlite3.Connection] | None = getattr(self._caller, "opening", None)
        if opening is None:
            opening = self._caller.opening = asyncio.ensure_future(asyncio.to_thread(self._point_read_connection))
        try:
            connection = await asyncio.shield(opening)
        finally:
            if opening.done() and getattr(self._caller, "opening", None) is opening:
                self._caller.opening = None  # opened, or failed: the next read tries again
        self._caller.connection = connection
        return connection

    def _point_read_connection(self) -> sqlite3.Connection:
        raw = self._engine.raw_connection()
        self._raw_connections.append(raw)
        driver = raw.driver_connection
        assert isinstance(driver, sqlite3.Connection)
        driver.execute(f"PRAGMA busy_timeout={_POINT_READ_BUSY_TIMEOUT_MS}")
        return driver

    async def dispose(self) -> None:
        await asyncio.to_thread(self._close)

    def _read(self, work: Callable[[Connection], T]) -> T:
        with self._thread_connection(writer=False) as conn:
            transaction = conn.begin()
            try:
                return work(conn)
            finally:
                transaction.rollback()

    def _write(self, work: Callable[[Connection], T]) -> T:
        with self._thread_connection(writer=True) as conn, conn.begin():
            return work(conn)

    @contextlib.contextmanager
    def _thread_connection(self, *, writer: bool) -> Iterator[Connection]:
        conn: Connection | None = getattr(self._thread, "connection", None)
        if conn is None:
            conn = self._engine.connect()
            if writer:
                # Read by the begin hook: every transaction of the writer thread takes the write lock up front.
                conn.execution_options(**{_WRITE_OPTION: True})
            self._thread.connection = conn
            self._connections.append(conn)
        try:
            yield conn
        except BaseException:
            # The next transaction starts on a fresh connection, whatever state this one was left in.
            del self._thread.connection
            self._connections.remove(conn)
            conn.close()
            raise

    def _close(self) -> None:
        self._writer.shutdown()
        self._readers.shutdown()
        for conn in self._connections:
            conn.close()
        self._connections.clear()
        for raw in self._raw_connections:
            raw.close()
        self._raw_connections.clear()
        self._engine.dispose()


@dataclass(frozen=True)
class _PointQuery:
    """A SELECT compiled once for the stdlib driver: its SQL, its parameters' order, and what
    SQLAlchemy would do to each result column (None: nothing)."""

    sql: str
    names: tuple[str, ...]
    defaults: Mapping[str, Any]
    # What SQLAlchemy would do to each parameter before the driver gets it (a date into text on
    # SQLite), by position; None: nothing.
    bind_processors: tuple[Callable[[Any], Any] | None, ...]
    processors: tuple[Callable[[Any], Any] | None, ...]

    @classmethod
    def compile(cls, statement: Select[Any], dialect: Dialect) -> _PointQuery:
        compiled = statement.compile(dialect=dialect)
        names = tuple(compiled.positiontup or ())
        bind_processors = tuple(
            compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect) for name in names
        )
        processors = tuple(
            _utc_from_sqlite_text
            if dialect.name == "sqlite" and isinstance(column.type, UTCDateTime)
            else column.type.dialect_impl(dialect).result_processor(dialect, None)
            for column in statement.selected_columns
        )
        # Values the statement carries itself (literals); the rest come with each call.
        defaults = {key: bind.value for key, bind in compiled.binds.items() if not bind.required}
        return cls(str(compiled), names, defaults, bind_processors, processors)

    def arguments(self, params: Mapping[str, Any]) -> tuple[Any, ...]:
        values = (params[name] if name in params else self.defaults[name] for name in self.names)
        return tuple(
            value if process is None or value is None else process(value)
            for value, process in zip(values, self.bind_processors, strict=True)
        )

    def processed(self, rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        converted = [(index, p) for index, p in enumerate(self.processors) if p is not None]
        if not converted:
            return rows
        processed = []
        for row in rows:
            values = list(row)
            for index, process in converted:
                if values[index] is not None:
                    values[index] = process(values[index])
            processed.append(tuple(values))
        return processed


def _utc_from_sqlite_text(value: str) -> datetime:
    # UTCDateTime's result processing of SQLite's "YYYY-MM-DD HH:MM:SS.ffffff" text, done by the C
    # parser: SQLAlchemy's regular expression and two wrappers cost more than the point read itself.
    try:
        # Stored naive (the wall-clock digits of a UTC time): parsed straight into an aware UTC value.
        return datetime.fromisoformat(value + "+00:00")
    except ValueError:  # text that carries an offset of its own
        return datetime.fromisoformat(value).astimezone(UTC)


class PostgresDatabase(Database):
    """PostgreSQL on asyncpg: the same synchronous work, run on the async connection by run_sync."""

    def __init__(self, url: URL, *, pool_size: int, pool_overflow: int) -> None:
        self._engine = _postgres_engine(url, pool_size=pool_size, pool_overflow=pool_overflow)

    async def read(self, work: Callable[[Connection], T]) -> T:
        async with self._engine.connect() as conn:
            return await conn.run_sync(work)

    def _start_write(self, work: Callable[[Connection], T]) -> asyncio.Future[T]:
        # In a task of its own: a cancellation of the caller cannot reach it mid-statement.
        return asyncio.ensure_future(self._write(work))

    async def _write(self, work: Callable[[Connection], T]) -> T:
        async with self._engine.begin() as conn:
            return await conn.run_sync(work)

    async def dispose(self) -> None:
        await self._engine.dispose()


def _driver(conn: Connection) -> sqlite3.Connection:
    driver = conn.connection.driver_connection
    assert isinstance(driver, sqlite3.Connection)
    return driver


def _run_in(executor: Executor, call: Callable[[], T]) -> asyncio.Future[T]:
    # The caller's context travels along, so log lines from the work keep its bound job_id.
    context = contextvars.copy_context()
    return asyncio.get_running_loop().run_in_executor(executor, context.run, call)


def _sqlite_engine(url: URL, *, pool_size: int) -> Engine:
    # Connections are made in our threads and closed by dispose in another.
    engine = sqlalchemy.create_engine(url, pool_size=pool_size, connect_args={"check_same_thread": False})

    @event.listens_for(engine, "connect")
    def _configure(dbapi_connection: Any, _record: Any) -> None:
        # Take BEGIN out of the driver's hands (it only begins before DML, so a read-then-write
        # transaction would not be one); SQLAlchemy emits it in _begin below.
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        # First, so that switching to WAL waits for a lock too.
        cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
        # WAL: readers (ingress) never block the writer (projector) and vice versa.
        cursor.execute("PRAGMA journal_mode=WAL")
        # In WAL mode NORMAL stays consistent across crashes; a power cut may lose the last
        # commits, rows and position together, and the projector simply replays them.
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _begin(connection: Connection) -> None:
        # A deferred transaction that reads and then writes fails with SQLITE_BUSY_SNAPSHOT (no
        # busy wait) when another process committed in between; writers take the lock up front.
        # Straight to the driver: a statement through SQLAlchemy costs more than SQLite running it.
        cursor = connection.connection.cursor()
        cursor.execute("BEGIN IMMEDIATE" if connection.get_execution_options().get(_WRITE_OPTION) else "BEGIN")
        cursor.close()

    return engine


def _postgres_engine(url: URL, *, pool_size: int, pool_overflow: int) -> AsyncEngine:
    driver = url.drivername.partition("+")[2]
    if driver not in ("asyncpg", "psycopg", "psycopg_async"):
        url = url.set(drivername="postgresql+asyncpg")
    if url.drivername == "postgresql+asyncpg" and "sslmode" in url.query:
        # libpq spelling in a URL that asyncpg only understands as ``ssl``.
        mode = url.query["sslmode"]
        url = url.difference_update_query(["sslmode"]).update_query_dict({"ssl": mode})
    return create_async_engine(
        url,
        pool_size=pool_size,
        max_overflow=pool_overflow,
        # Survive a database restart or a proxy that drops idle connections.
        pool_pre_ping=True,
        pool_recycle=1800,
    )


async def create_schema(database: Database) -> None:
    """Create the read-model tables that are missing (idempotent; safe from several processes)."""
    await database.write(_create_tables)


async def reset_schema(database: Database) -> None:
    """Drop and recreate the read-model tables in one transaction (readers never see them missing)."""
    await database.write(_recreate_tables)


def _create_tables(conn: Connection) -> None:
    _lock_schema(conn)
    counted = inspect(conn).has_table(owner_daily_images.name)
    metadata.create_all(conn)
    # create_all skips the indexes of tables that exist: a read model from before an index gets it here.
    for table in metadata.sorted_tables:
        for index in table.indexes:
            index.create(conn, checkfirst=True)
    if not counted:
        # A read model from before the usage counters: count its jobs once, as a rebuild would.
        changes = UsageChanges()
        for row in conn.execute(select(jobs)).mappings():
            changes.count(None, JobRow.from_columns(row))
        write_usage(conn, changes)


def _recreate_tables(conn: Connection) -> None:
    _lock_schema(conn)
    metadata.drop_all(conn, tables=list(READ_MODEL_TABLES))
    metadata.create_all(conn)


def _lock_schema(conn: Connection) -> None:
    # Two roles starting together would both find a table missing and race on CREATE TABLE.
    # SQLite is already serialised by BEGIN IMMEDIATE.
    if conn.dialect.name == "postgresql":
        conn.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": _SCHEMA_LOCK_KEY})


def upsert(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert rows, replacing every non-key column of rows whose primary key already exists."""
    if rows:
        conn.execute(_upsert_statement(conn.dialect.name, table), list(rows))


def insert_if_absent(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> int:
    """Insert rows whose primary key is not there yet; leave existing rows untouched. Returns how
    many were inserted."""
    if not rows:
        return 0
    return conn.execute(_insert_if_absent_statement(conn.dialect.name, table), list(rows)).rowcount


def insert_absent(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> set[Any]:
    """Like insert_if_absent, but returns the primary keys (first key column) of the rows inserted."""
    if not rows:
        return set()
    return set(conn.execute(_insert_absent_statement(conn.dialect.name, table), list(rows)).scalars())


def add_to(conn: Connection, table: Table, rows: Sequence[Mapping[str, Any]]) -> None:
    """Add each row's non-key values to those of the row with its primary key (missing: inserted)."""
    if rows:
        conn.execute(_add_to_statement(conn.dialect.name, table), list(rows))


def write_usage(conn: Connection, changes: UsageChanges) -> None:
    """Add ``changes`` to the per-owner usage counters."""
    active, daily = changes.nonzero()
    # Sorted: on PostgreSQL concurrent writers then lock counter rows in one order (no deadlock).
    add_to(conn, owner_usage, [{"owner": owner, "active_jobs": active[owner]} for owner in sorted(active)])
    add_to(
        conn,
        owner_daily_images,
        [{"owner": owner, "day": day, "images": daily[owner, day]} for owner, day in sorted(daily)],
    )


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


@functools.cache
def _insert_absent_statement(dialect: str, table: Table) -> Executable:
    keys = [column.name for column in table.primary_key.columns]
    return _insert(dialect, table).on_conflict_do_nothing(index_elements=keys).returning(table.c[keys[0]])


@functools.cache
def _add_to_statement(dialect: str, table: Table) -> Executable:
    statement = _insert(dialect, table)
    keys = [column.name for column in table.primary_key.columns]
    added = {
        column.name: column + statement.excluded[column.name] for column in table.columns if column.name not in keys
    }
    return statement.on_conflict_do_update(index_elements=keys, set_=added)


def _insert(dialect: str, table: Table) -> sqlite.Insert | postgresql.Insert:
    # ON CONFLICT exists in both dialects but only behind their own insert() constructs.
    if dialect == "postgresql":
        return postgresql.insert(table)
    if dialect == "sqlite":
        return sqlite.insert(table)
    raise ValueError(f"unsupported dialect {dialect!r}")
