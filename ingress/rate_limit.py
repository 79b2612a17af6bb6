"""Request rate limits per API key and per client address, counted in the database replicas share.

Fixed windows: each subject ("key:<HMAC of the key>", "ip:<address>") has one row in
``rate_limit_counters`` holding its current window and the requests counted in it. A request
bumps all its subjects in one upsert that returns the new counts, so replicas never read and
then write, and any number of them enforce one limit together. Every limited answer carries the
IETF draft's RateLimit-Policy and RateLimit fields; over a limit it is a 429 with Retry-After.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import hmac
import math
import time
from collections.abc import AsyncIterator, Sequence
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


class RateLimiter:
    """Counts requests against the shared counters; owns the database handle they live in."""

    def __init__(self, config: IngressConfig) -> None:
        self.limits = limits = config.rate_limits
        self._secret = config.key_secret.encode()
        self._config = config
        self._database: Database | None = None
        self._key_policy = Policy("key", limits.requests_per_key, limits.window_s, "per API key")
        self._ip_policy = Policy("ip", limits.requests_per_ip, limits.window_s, "per client address")
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
            database, self._database = self._database, None
            await database.dispose()

    async def count(self, scope: Scope) -> list[Usage]:
        """Count the request against its buckets; empty when no limit applies or the store failed."""
        buckets = self._buckets(scope)
        if not buckets:
            return []
        now = time.time()
        window_s = self.limits.window_s
        window_start = int(now // window_s) * window_s
        counted = await self._bump([bucket for _, bucket in buckets], window_start)
        if counted is None:
            return []
        usages = []
        for policy, bucket in buckets:
            count, counted_window = counted[bucket]
            # A replica whose clock runs ahead may have opened the window a little early.
            resets_in = min(window_s, max(1, math.ceil(counted_window + window_s - now)))
            usages.append(Usage(policy, count, resets_in))
        return usages

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

    async def _bump(self, buckets: list[str], window_start: int) -> dict[str, tuple[int, int]] | None:
        database = self._database
        if database is None or time.monotonic() < self._store_down_until:
            return None
        # Rows of past windows are dead weight (every address ever seen); once per window each
        # replica clears them along with its count.
        prune = window_start > self._pruned_window
        self._pruned_window = max(self._pruned_window, window_start)
        transaction = asyncio.ensure_future(
            database.write(functools.partial(_bump_counters, buckets=buckets, window_start=window_start, prune=prune))
        )
        done, _ = await asyncio.wait({transaction}, timeout=STORE_TIMEOUT_S)
        try:
            if not done:
                raise TimeoutError(f"no answer from the counter store in {STORE_TIMEOUT_S} s")
            return transaction.result()
        except Exception as error:
            # Fail open: the limits protect the service from abuse, but refusing every request
            # because their bookkeeping is down would turn a database outage into a total one.
            self._store_down_until = time.monotonic() + STORE_RETRY_S
            log.warning("rate_limit.store_unavailable", error=repr(error), unlimited_for_s=STORE_RETRY_S)
            if not done:
                self._abandoned.add(transaction)
                transaction.add_done_callback(self._forget)
            return None

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


def _bump_counters(
    conn: Connection, *, buckets: list[str], window_start: int, prune: bool
) -> dict[str, tuple[int, int]]:
    # Several parameter sets of one INSERT ... RETURNING go out as a single multi-row statement
    # (SQLAlchemy's "insertmanyvalues"), one round trip, and keep VALUES in the order given.
    rows = [{"bucket": bucket, "window_start": window_start, "count": 1} for bucket in buckets]
    counted = {row[0]: (row[1], row[2]) for row in conn.execute(_bump_statement(conn.dialect.name), rows)}
    if prune:
        conn.execute(_PRUNE, {"before": window_start})
    return counted


# Built once per dialect: constructing the upsert costs more than running it. One row's VALUES,
# not a multi-row values() (SQLAlchemy cannot cache that, and compiled it anew on every request).
@functools.cache
def _bump_statement(dialect: str) -> Executable:
    table = rate_limit_counters
    # ON CONFLICT exists on both databases but only behind their own insert() constructs.
    insert = postgresql.insert(table) if dialect == "postgresql" else sqlite.insert(table)
    # A later window starts the count again. An earlier one (a replica whose clock is behind)
    # counts into the row's window instead of resetting it, so skewed clocks cannot take turns
    # wiping each other's counts.
    newer_window = insert.excluded.window_start > table.c.window_start
    upsert = insert.on_conflict_do_update(
        index_elements=[table.c.bucket],
        set_={
            "count": case((newer_window, 1), else_=table.c["count"] + 1),
            "window_start": case((newer_window, insert.excluded.window_start), else_=table.c.window_start),
        },
    ).returning(table.c.bucket, table.c["count"], table.c.window_start)
    if dialect == "postgresql":
        # Asynchronous commit for this transaction: a count lost to a database crash is harmless,
        # and waiting for the WAL flush was most of the limiter's cost (bench/rate_limit.py).
        # Set from RETURNING so that it stays one statement, one round trip.
        upsert = upsert.returning(func.set_config("synchronous_commit", "off", True))
    return upsert


# SKIP LOCKED (PostgreSQL; SQLite has one writer and no row locks): rows that an in-flight count is
# reviving are left for the next prune, so pruning never waits on a count and cannot deadlock one.
_PRUNE = delete(rate_limit_counters).where(
    rate_limit_counters.c.bucket.in_(
        select(rate_limit_counters.c.bucket)
        .where(rate_limit_counters.c.window_start < bindparam("before"))
        .with_for_update(skip_locked=True)
    )
)
