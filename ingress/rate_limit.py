"""Request rate limits per API key and per client address: decided in process, shared by replicas.

Fixed windows: each subject ("key:<HMAC of the key>", "ip:<address>") has one row in
``rate_limit_counters`` holding its current window and the requests counted in it. Each replica
decides alone, on the shared count it last read plus what it admitted since. A request over a
limit adds to no count; refused on what the replica already knows, it costs no I/O at all.
A replica reads a subject's shared count again before admitting a request when its reading is
older than ``sync_interval_s``, and adds what it admitted to the shared rows (one upsert for all
its subjects, returning their totals) at most that often. So one replica is exact. With several,
a window admits at most the limit plus what the others admitted to that subject in the last two
intervals (their counts reach the store up to one interval after they admit them, and a replica
admits on a reading up to one interval old), and never more than the limit on any one replica.
Every limited answer carries the IETF draft's RateLimit-Policy and RateLimit fields; over a limit
it is a 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import hmac
import math
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import structlog
from litestar import Litestar
from litestar.connection import ASGIConnection
from litestar.enums import ScopeType
from litestar.middleware import ASGIMiddleware
from litestar.types import ASGIApp, Message, Receive, Scope, Send
from sqlalchemy import Connection, Executable, bindparam, case, delete, func, select
from sqlalchemy.dialects import postgresql, sqlite

from ingress.auth import presented_key
from ingress.config import IngressConfig
from ingress.errors import ApiError
from ingress.services import open_database
from projector.database import Database
from projector.tables import rate_limit_counters

log = structlog.get_logger(__name__)

# A counter store slower than this lets the request through rather than stall it (a PostgreSQL
# that is down takes a minute to refuse a connection); after a failure the store is left alone
# this long, so an outage costs one slow request per replica, not one per request.
STORE_TIMEOUT_S = 1.0
STORE_RETRY_S = 5.0

# Probes must answer while a client is throttled; preflights carry no credentials to count.
_EXEMPT_PATHS = frozenset({"/health", "/ready", "/metrics"})
_EXEMPT_METHODS = frozenset({"OPTIONS"})

# Fits the bucket column with its "ip:" prefix whatever a proxy wrote into X-Forwarded-For.
_MAX_ADDRESS_CHARS = 190


@dataclass(frozen=True)
class Policy:
    """One limit, named as the RateLimit-Policy field names it."""

    name: str
    quota: int
    window_s: int
    subject: str

    def field_item(self) -> str:
        return f'"{self.name}";q={self.quota};w={self.window_s}'


@dataclass(frozen=True)
class Usage:
    """A bucket after counting this request."""

    policy: Policy
    count: int
    resets_in_s: int

    @property
    def remaining(self) -> int:
        return max(0, self.policy.quota - self.count)

    @property
    def exceeded(self) -> bool:
        return self.count > self.policy.quota


@dataclass
class _Count:
    """One subject's count in this replica, for one window."""

    window_start: int
    # The shared count the store last returned (this replica's synced requests included)...
    shared: int = 0
    # ...and when (monotonic; never yet in this window: -inf).
    read_at: float = -math.inf
    # Admitted here since, not yet added to the shared row.
    unsynced: int = 0

    @property
    def total(self) -> int:
        return self.shared + self.unsynced


class RateLimiter:
    """Counts requests in process and syncs the counts with the shared rows; owns their database handle."""

    def __init__(self, config: IngressConfig) -> None:
        self.limits = limits = config.rate_limits
        self._secret = config.key_secret.encode()
        self._config = config
        self._database: Database | None = None
        self._key_policy = Policy("key", limits.requests_per_key, limits.window_s, "per API key")
        self._ip_policy = Policy("ip", limits.requests_per_ip, limits.window_s, "per client address")
        self._counts: dict[str, _Count] = {}
        # One sync at a time; a request waiting for one may find that another already read its count.
        self._sync_lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self._synced_at = -math.inf
        self._store_down_until = 0.0
        self._pruned_window = -1
        # Transactions given up on after STORE_TIMEOUT_S still run to their end; held until then.
        self._abandoned: set[asyncio.Future[Any]] = set()

    @property
    def enabled(self) -> bool:
        return self.limits.requests_per_key > 0 or self.limits.requests_per_ip > 0

    @asynccontextmanager
    async def lifespan(self, _app: Litestar) -> AsyncIterator[None]:
        # A handle of its own: the ingress's read model is private to its services, and on SQLite
        # a writer thread of its own keeps counting off the queue of record_queued's inserts.
        if not self.enabled:
            yield
            return
        self._database = open_database(self._config)
        try:
            yield
        finally:
            flusher, self._flusher = self._flusher, None
            if flusher is not None:
                flusher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await flusher
            await self.sync()  # what was admitted since the last sync
            database, self._database = self._database, None
            await database.dispose()

    async def count(self, scope: Scope) -> list[Usage]:
        """Count the request against its subjects, unless it is over a limit (then it counts
        nowhere); empty when no limit applies."""
        buckets = self._buckets(scope)
        if not buckets:
            return []
        window_s = self.limits.window_s
        window_start = int(time.time() // window_s) * window_s
        counts = [self._count_of(bucket, window_start) for _, bucket in buckets]
        usages = self._usages(buckets, counts, window_start)
        if any(usage.exceeded for usage in usages):
            return usages  # refused on what this replica knows: no I/O, nothing counted
        stale_before = time.monotonic() - self.limits.sync_interval_s
        if any(count.read_at <= stale_before for count in counts):
            # What the other replicas counted since this one last looked (at most every interval).
            await self._refresh(bucket for _, bucket in buckets)
            usages = self._usages(buckets, counts, window_start)
            if any(usage.exceeded for usage in usages):
                return usages
        for count in counts:
            count.unsynced += 1
        if self._flusher is None and self._database is not None:
            self._flusher = asyncio.create_task(self._flush(), name="rate-limit-flush")
        return usages

    async def sync(self) -> None:
        """Add what this replica admitted to the shared rows now, and read back their totals."""
        async with self._sync_lock:
            await self._sync_now(())

    def _usages(self, buckets: list[tuple[Policy, str]], counts: list[_Count], window_start: int) -> list[Usage]:
        window_s = self.limits.window_s
        resets_in = min(window_s, max(1, math.ceil(window_start + window_s - time.time())))
        return [Usage(policy, count.total + 1, resets_in) for (policy, _), count in zip(buckets, counts, strict=True)]

    def _count_of(self, bucket: str, window_start: int) -> _Count:
        count = self._counts.get(bucket)
        if count is None or count.window_start < window_start:
            # A new window counts from zero; what the last one admitted but never synced is moot.
            count = self._counts[bucket] = _Count(window_start)
        return count

    async def _refresh(self, buckets: Iterable[str]) -> None:
        asked_at = time.monotonic()
        async with self._sync_lock:
            # Read by a sync that started after this request asked: nothing newer to learn.
            stale = [bucket for bucket in buckets if (count := self._counts.get(bucket)) and count.read_at < asked_at]
            if stale:
                await self._sync_now(stale)

    async def _flush(self) -> None:
        """Sync what was admitted, at most every interval, until nothing is left unsynced."""
        try:
            while any(count.unsynced for count in self._counts.values()):
                due = max(self._synced_at + self.limits.sync_interval_s, self._store_down_until)
                await asyncio.sleep(max(0.0, due - time.monotonic()))
                await self.sync()
        finally:
            self._flusher = None

    async def _sync_now(self, unread: Iterable[str]) -> None:
        database = self._database
        if database is None or time.monotonic() < self._store_down_until:
            return
        window_start = int(time.time() // self.limits.window_s) * self.limits.window_s
        # Subjects of windows gone by are dead weight, here and in the store.
        self._counts = {bucket: count for bucket, count in self._counts.items() if count.window_start >= window_start}
        taken = {bucket: count.unsynced for bucket, count in self._counts.items() if count.unsynced}
        to_read = sorted({bucket for bucket in unread if bucket in self._counts and bucket not in taken})
        if not taken and not to_read:
            return
        # Once per window each replica clears the store's rows of past windows along with a sync.
        prune = window_start > self._pruned_window
        self._pruned_window = max(self._pruned_window, window_start)
        self._synced_at = started = time.monotonic()
        for bucket, n in taken.items():
            # Taken out now: requests admitted during the transaction go in the next one.
            self._counts[bucket].unsynced -= n
        work = functools.partial(_sync_counts, added=taken, unread=to_read, window_start=window_start, prune=prune)
        transaction = asyncio.ensure_future(database.write(work))
        done, _ = await asyncio.wait({transaction}, timeout=STORE_TIMEOUT_S)
        try:
            if not done:
                raise TimeoutError(f"no answer from the counter store in {STORE_TIMEOUT_S} s")
            shared = transaction.result()
        except Exception as error:
            # Fail open to the local counts: each replica still limits what it sees, but refusing
            # every request because the shared bookkeeping is down would make an outage total.
            self._store_down_until = time.monotonic() + STORE_RETRY_S
            log.warning("rate_limit.store_unavailable", error=repr(error), local_only_for_s=STORE_RETRY_S)
            for bucket, n in taken.items():
                # Still counted here, never sent again: a transaction given up on may yet commit,
                # and a count missing from the store is better than one counted twice.
                if (count := self._counts.get(bucket)) is not None:
                    count.shared += n
            if not done:
                self._abandoned.add(transaction)
                transaction.add_done_callback(self._forget)
            return
        for bucket, total in shared.items():
            count = self._counts.get(bucket)
            if count is not None:
                count.shared, count.read_at = total, started

    def _buckets(self, scope: Scope) -> list[tuple[Policy, str]]:
        # Key before address, always: on PostgreSQL every upsert then locks its rows in the same
        # order, so two requests sharing an address but not a key cannot deadlock.
        buckets = []
        if self.limits.requests_per_key > 0:
            key = presented_key(ASGIConnection(scope))
            if key:
                digest = hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()[:32]
                buckets.append((self._key_policy, f"key:{digest}"))
        if self.limits.requests_per_ip > 0:
            address = client_address(scope, self.limits.trusted_proxy_hops)
            buckets.append((self._ip_policy, f"ip:{address[:_MAX_ADDRESS_CHARS]}"))
        return buckets

    def _forget(self, transaction: asyncio.Future[Any]) -> None:
        self._abandoned.discard(transaction)
        if not transaction.cancelled():
            transaction.exception()  # already reported as a timeout; retrieved so asyncio stays quiet


def client_address(scope: Scope, trusted_proxy_hops: int) -> str:
    """The peer's address, or with N trusted proxies the Nth X-Forwarded-For entry from the right.

    Each proxy appends the address it got the request from, so only the entries our own proxies
    wrote can be believed; anything further left is whatever the client sent.
    """
    peer = scope.get("client")
    address = peer[0] if peer else "unknown"
    if trusted_proxy_hops <= 0:
        return address
    forwarded = [
        entry.strip()
        for name, value in scope["headers"]
        if name == b"x-forwarded-for"
        for entry in value.decode("latin-1").split(",")
        if entry.strip()
    ]
    # Fewer entries than proxies: the request skipped one, and its header is not trustworthy.
    # The peer's address over-limits those clients together rather than believing a forged one.
    if len(forwarded) < trusted_proxy_hops:
        return address
    return forwarded[-trusted_proxy_hops]


class RateLimitMiddleware(ASGIMiddleware):
    """Refuses requests over a limit with 429 and adds the RateLimit fields to every answer."""

    scopes = (ScopeType.HTTP,)

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self.should_bypass_for_scope = _is_exempt if limiter.enabled else _always

    async def handle(self, scope: Scope, receive: Receive, send: Send, next_app: ASGIApp) -> None:
        usages = await self.limiter.count(scope)
        if not usages:
            await next_app(scope, receive, send)
            return
        headers = rate_limit_headers(usages)
        exceeded = [usage for usage in usages if usage.exceeded]
        if exceeded:
            worst = max(exceeded, key=lambda usage: usage.resets_in_s)
            policy = worst.policy
            raise ApiError(
                429,
                f"rate limit exceeded: {policy.quota} requests per {policy.window_s} s {policy.subject}; "
                f"retry in {worst.resets_in_s} s",
                headers={**headers, "Retry-After": str(worst.resets_in_s)},
            )
        raw_headers = [(name.lower().encode(), value.encode()) for name, value in headers.items()]

        async def send_with_fields(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *raw_headers]
            await send(message)

        await next_app(scope, receive, send_with_fields)


def rate_limit_headers(usages: Sequence[Usage]) -> dict[str, str]:
    """RateLimit-Policy lists every limit counted; RateLimit reports the one closest to refusing."""
    tightest = min(usages, key=lambda usage: (usage.remaining, -usage.resets_in_s))
    return {
        "RateLimit-Policy": ", ".join(usage.policy.field_item() for usage in usages),
        "RateLimit": f'"{tightest.policy.name}";r={tightest.remaining};t={tightest.resets_in_s}',
    }


def _is_exempt(scope: Scope) -> bool:
    return scope["path"] in _EXEMPT_PATHS or scope.get("method") in _EXEMPT_METHODS


def _always(_scope: Scope) -> bool:
    return True


def _sync_counts(
    conn: Connection, *, added: dict[str, int], unread: list[str], window_start: int, prune: bool
) -> dict[str, int]:
    """Add counts to the shared rows and read others; returns each subject's shared count."""
    shared: dict[str, int] = {}
    if added:
        # Sorted: on PostgreSQL every sync then locks its rows in one order, so two replicas
        # cannot deadlock. Several parameter sets of one INSERT ... RETURNING go out as one
        # multi-row statement (SQLAlchemy's "insertmanyvalues"), one round trip.
        rows = [{"bucket": bucket, "window_start": window_start, "count": added[bucket]} for bucket in sorted(added)]
        shared.update((row[0], row[1]) for row in conn.execute(_add_statement(conn.dialect.name), rows))
    if unread:
        # No row yet: nothing counted.
        shared.update(dict.fromkeys(unread, 0))
        for bucket, count, counted_window in conn.execute(_READ, {"buckets": unread}):
            # A row of a window gone by counts nothing in this one.
            shared[bucket] = count if counted_window >= window_start else 0
    if prune:
        conn.execute(_PRUNE, {"before": window_start})
    return shared


# Built once per dialect: constructing the upsert costs more than running it. One row's VALUES,
# not a multi-row values() (SQLAlchemy cannot cache that, and compiled it anew on every request).
@functools.cache
def _add_statement(dialect: str) -> Executable:
    table = rate_limit_counters
    # ON CONFLICT exists on both databases but only behind their own insert() constructs.
    insert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    # A later window starts the count again, at what this replica admitted. An earlier one (a
    # replica whose clock is behind) counts into the row's window instead of resetting it, so
    # skewed clocks cannot take turns wiping each other's counts.
    newer_window = insert.excluded.window_start > table.c.window_start
    upsert = insert.on_conflict_do_update(
        index_elements=[table.c.bucket],
        set_={
            "count": case((newer_window, insert.excluded["count"]), else_=table.c["count"] + insert.excluded["count"]),
            "window_start": case((newer_window, insert.excluded.window_start), else_=table.c.window_start),
        },
    ).returning(table.c.bucket, table.c["count"], table.c.window_start)
    if dialect == "postgresql":
        # Asynchronous commit for this transaction: a count lost to a database crash is harmless,
        # and waiting for the WAL flush was most of the limiter's cost (bench/rate_limit.py).
        # Set from RETURNING so that it stays one statement, one round trip.
        upsert = upsert.returning(func.set_config("synchronous_commit", "off", True))
    return upsert


_READ = select(rate_limit_counters.c.bucket, rate_limit_counters.c["count"], rate_limit_counters.c.window_start).where(
    rate_limit_counters.c.bucket.in_(bindparam("buckets", expanding=True))
)

# SKIP LOCKED (PostgreSQL; SQLite has one writer and no row locks): rows that an in-flight count is
# reviving are left for the next prune, so pruning never waits on a count and cannot deadlock one.
_PRUNE = delete(rate_limit_counters).where(
    rate_limit_counters.c.bucket.in_(
        select(rate_limit_counters.c.bucket)
        .where(rate_limit_counters.c.window_start < bindparam("before"))
        .with_for_update(skip_locked=True)
    )
)
