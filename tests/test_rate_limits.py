"""Rate limits per API key and per client address, shared by ingress replicas through the database.

Each replica is an app of its own (its own database handle, bus connection and limiter) over the
same database, as two ingress processes would be. The Litestar test client calls from the address
"testclient", so every request here comes from one client unless X-Forwarded-For is trusted.
Replicas read each other's counts at most every ``sync_interval_s``: the tests that count across
replicas set it to 0 and let each replica sync after its request (``sent``), as time would.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any

import httpx
import pytest
from litestar.testing import AsyncTestClient
from sqlalchemy import Connection, Engine, event, select, text

from bus import BusOptions
from imagebus.catalog import load_catalog
from imagebus.roles import ingress_config
from imagebus.settings import IngressSettings
from ingress.app import create_app
from ingress.config import IngressConfig, RateLimits
from ingress.rate_limit import RateLimiter, RateLimitMiddleware
from projector.database import create_database
from projector.tables import rate_limit_counters
from storage.object_store import S3Config
from tests.stack import KEY_ALICE, KEY_BOB, assert_json_error, auth

# Long windows for the counting tests, so one never ends mid-test (see fresh_window).
HOUR = 3600


@asynccontextmanager
async def replicas(
    nats_url: str, s3: S3Config, database_url: str, limits: RateLimits, *, count: int = 2
) -> AsyncIterator[list[AsyncTestClient[Any]]]:
    config = IngressConfig(
        bus_url=nats_url,
        bus_options=BusOptions(namespace=f"t{uuid.uuid4().hex[:10]}"),
        s3=s3,
        database_url=database_url,
        catalog=load_catalog(),
        api_keys=(KEY_ALICE, KEY_BOB),
        key_secret="test-secret",
        rate_limits=limits,
    )
    async with AsyncExitStack() as stack:
        yield [await stack.enter_async_context(AsyncTestClient(create_app(config))) for _ in range(count)]


def limiter_of(replica: AsyncTestClient[Any]) -> RateLimiter:
    return next(layer.limiter for layer in replica.app.middleware if isinstance(layer, RateLimitMiddleware))


async def sent(replica: AsyncTestClient[Any], path: str, headers: dict[str, str] | None = None) -> httpx.Response:
    """GET ``path``, then let the replica add what it counted to the shared rows."""
    response = await replica.get(path, headers=headers)
    # The app runs in the test client's own thread and event loop: the sync must run there.
    await asyncio.to_thread(replica.blocking_portal.call, limiter_of(replica).sync)
    return response


def seconds_left(window_s: int) -> float:
    return window_s - time.time() % window_s


async def fresh_window(window_s: int, *, needed_s: float) -> None:
    """Wait for the next window when the current one has less than ``needed_s`` left."""
    left = seconds_left(window_s)
    if left < needed_s:
        await asyncio.sleep(left + 0.05)


def rate_limit(response: httpx.Response) -> tuple[str, int, int]:
    """The RateLimit field's policy name, remaining and reset."""
    name, remaining, reset = response.headers["RateLimit"].split(";")
    assert remaining.startswith("r=") and reset.startswith("t="), response.headers["RateLimit"]
    return name.strip('"'), int(remaining[2:]), int(reset[2:])


async def counters(database_url: str) -> dict[str, int]:
    database = create_database(database_url)
    try:

        def read(conn: Connection) -> dict[str, int]:
            rows = conn.execute(select(rate_limit_counters.c.bucket, rate_limit_counters.c["count"]))
            return {bucket: count for bucket, count in rows}

        return await database.read(read)
    finally:
        await database.dispose()


async def test_replicas_enforce_one_limit_per_key_together(
    nats_url: str, storage_config: S3Config, database_url: str
) -> None:
    limits = RateLimits(requests_per_key=5, requests_per_ip=0, window_s=HOUR, sync_interval_s=0)
    async with replicas(nats_url, storage_config, database_url, limits) as (a, b):
        await fresh_window(HOUR, needed_s=30)
        for count in range(1, 6):
            replica = a if count % 2 else b
            response = await sent(replica, "/api/models", headers=auth(KEY_ALICE))
            assert response.status_code == 200, response.text
            # The IP limit is off (0): only the key's policy is announced.
            assert response.headers["RateLimit-Policy"] == f'"key";q=5;w={HOUR}'
            name, remaining, reset = rate_limit(response)
            assert (name, remaining) == ("key", 5 - count)
            assert abs(reset - seconds_left(HOUR)) <= 1.5, reset

        refused = await sent(b, "/api/models", headers=auth(KEY_ALICE))
        body = assert_json_error(refused, 429)
        assert body["status"] == "error"
        retry_after = int(refused.headers["Retry-After"])
        assert abs(retry_after - seconds_left(HOUR)) <= 1.5, retry_after
        assert body["message"] == (
            f"rate limit exceeded: 5 requests per {HOUR} s per API key; retry in {retry_after} s"
        )
        assert rate_limit(refused) == ("key", 0, retry_after)
        assert refused.headers["RateLimit-Policy"] == f'"key";q=5;w={HOUR}'
        # Refused on the other replica too, whichever route; another key is untouched.
        assert (await sent(a, "/api/quota", headers=auth(KEY_ALICE))).status_code == 429
        bob = await sent(a, "/api/models", headers={"Authorization": f"Bearer {KEY_BOB}"})
        assert bob.status_code == 200 and rate_limit(bob)[1] == 4

    # The table holds digests of the keys, never the keys; refused requests counted nowhere.
    buckets = await counters(database_url)
    assert sorted(buckets.values()) == [1, 5]
    assert all(bucket.startswith("key:") and KEY_ALICE not in bucket for bucket in buckets)


async def test_the_address_limit_catches_requests_spread_over_keys(
    nats_url: str, storage_config: S3Config, database_url: str
) -> None:
    limits = RateLimits(requests_per_key=100, requests_per_ip=4, window_s=HOUR, sync_interval_s=0)
    async with replicas(nats_url, storage_config, database_url, limits) as (a, b):
        await fresh_window(HOUR, needed_s=30)
        keyed = await sent(a, "/api/models", headers=auth(KEY_ALICE))
        assert keyed.headers["RateLimit-Policy"] == f'"key";q=100;w={HOUR}, "ip";q=4;w={HOUR}'
        assert rate_limit(keyed)[:2] == ("ip", 3)
        assert (await sent(b, "/api/models", headers=auth(KEY_BOB))).status_code == 200
        # Keyless, and a key no one issued: counted against the address alone, and still counted.
        keyless = await sent(a, "/api/models")
        assert keyless.status_code == 200
        assert keyless.headers["RateLimit-Policy"] == f'"ip";q=4;w={HOUR}'
        assert rate_limit(keyless)[:2] == ("ip", 1)
        assert (await sent(b, "/api/quota", headers=auth("not-a-key"))).status_code == 401

        refused = await sent(a, "/api/models", headers=auth("yet-another-key"))
        body = assert_json_error(refused, 429)
        assert body["message"].startswith(f"rate limit exceeded: 4 requests per {HOUR} s per client address;")
        assert rate_limit(refused)[:2] == ("ip", 0)
        assert (await sent(b, "/api/models", headers=auth(KEY_BOB))).status_code == 429


async def test_after_retry_after_a_request_succeeds_again_and_old_windows_are_pruned(
    nats_url: str, storage_config: S3Config, database_url: str
) -> None:
    limits = RateLimits(requests_per_key=2, requests_per_ip=0, window_s=2, sync_interval_s=0)
    async with replicas(nats_url, storage_config, database_url, limits) as (a, b):
        await fresh_window(2, needed_s=1)
        assert (await sent(a, "/api/models", headers=auth(KEY_BOB))).status_code == 200
        assert (await sent(a, "/api/models", headers=auth(KEY_ALICE))).status_code == 200
        assert (await sent(b, "/api/models", headers=auth(KEY_ALICE))).status_code == 200
        refused = await sent(a, "/api/models", headers=auth(KEY_ALICE))
        assert refused.status_code == 429
        retry_after = int(refused.headers["Retry-After"])
        assert 1 <= retry_after <= 2

        await asyncio.sleep(retry_after)
        again = await sent(a, "/api/models", headers=auth(KEY_ALICE))
        assert again.status_code == 200, again.text
        assert rate_limit(again)[1] == 1
        # The first sync of a window on replica a cleared the rows of windows gone by: Bob's.
        assert list((await counters(database_url)).values()) == [1]


async def test_a_limit_of_zero_is_off(nats_url: str, storage_config: S3Config, database_url: str) -> None:
    limits = RateLimits(requests_per_key=0, requests_per_ip=0, window_s=HOUR)
    async with replicas(nats_url, storage_config, database_url, limits, count=1) as (client,):
        for _ in range(30):
            response = await client.get("/api/models", headers=auth(KEY_ALICE))
            assert response.status_code == 200
            assert "RateLimit" not in response.headers and "RateLimit-Policy" not in response.headers
    assert await counters(database_url) == {}


async def test_health_and_preflights_are_never_limited(
    nats_url: str, storage_config: S3Config, database_url: str
) -> None:
    limits = RateLimits(requests_per_key=1, requests_per_ip=1, window_s=HOUR)
    async with replicas(nats_url, storage_config, database_url, limits, count=1) as (client,):
        await fresh_window(HOUR, needed_s=30)
        assert (await client.get("/api/models")).status_code == 200
        assert (await client.get("/api/models")).status_code == 429
        for _ in range(5):
            health = await client.get("/health", headers=auth(KEY_ALICE))
            assert health.status_code == 200 and "RateLimit" not in health.headers
            assert (await client.options("/api/models", headers=auth(KEY_ALICE))).status_code < 400
    assert list((await counters(database_url)).values()) == [1]


def forwarded_for(*addresses: str) -> dict[str, str]:
    return {"X-Forwarded-For": ", ".join(addresses)}


async def test_behind_one_trusted_proxy_the_address_it_appended_counts(
    nats_url: str, storage_config: S3Config, database_url: str
) -> None:
    limits = RateLimits(requests_per_key=0, requests_per_ip=1, window_s=HOUR, trusted_proxy_hops=1)
    async with replicas(nats_url, storage_config, database_url, limits, count=1) as (client,):
        await fresh_window(HOUR, needed_s=30)
        assert (await client.get("/api/models", headers=forwarded_for("198.51.100.7"))).status_code == 200
        assert (await client.get("/api/models", headers=forwarded_for("203.0.113.9"))).status_code == 200
        # Our proxy appends the address it saw, the rightmost entry; what the client wrote to
        # the left of it is ignored.
        spoofed = forwarded_for("203.0.113.10", "198.51.100.7")
        assert (await client.get("/api/models", headers=spoofed)).status_code == 429
        # No header where one is expected: the peer's own address.
        assert (await client.get("/api/models")).status_code == 200
    assert await counters(database_url) == {"ip:198.51.100.7": 1, "ip:203.0.113.9": 1, "ip:testclient": 1}


async def test_with_no_trusted_proxy_x_forwarded_for_is_ignored(
    nats_url: str, storage_config: S3Config, database_url: str
) -> None:
    limits = RateLimits(requests_per_key=0, requests_per_ip=1, window_s=HOUR)
    async with replicas(nats_url, storage_config, database_url, limits, count=1) as (client,):
        await fresh_window(HOUR, needed_s=30)
        assert (await client.get("/api/models", headers=forwarded_for("192.0.2.1"))).status_code == 200
        assert (await client.get("/api/models", headers=forwarded_for("192.0.2.2"))).status_code == 429
    assert await counters(database_url) == {"ip:testclient": 1}


async def test_a_failing_counter_store_leaves_each_replica_limiting_on_its_own_counts(
    nats_url: str, storage_config: S3Config, database_url: str
) -> None:
    limits = RateLimits(requests_per_key=1, requests_per_ip=0, window_s=HOUR)
    async with replicas(nats_url, storage_config, database_url, limits, count=1) as (client,):
        await fresh_window(HOUR, needed_s=30)
        assert (await client.get("/api/models", headers=auth(KEY_ALICE))).status_code == 200
        assert (await client.get("/api/models", headers=auth(KEY_ALICE))).status_code == 429
        database = create_database(database_url)
        try:
            await database.write(lambda conn: conn.execute(text("DROP TABLE rate_limit_counters")))
        finally:
            await database.dispose()
        # Nothing fails for it; a key this replica already counted stays refused, a new one is
        # counted here alone.
        assert (await client.get("/api/models", headers=auth(KEY_ALICE))).status_code == 429
        first = await client.get("/api/models", headers=auth(KEY_BOB))
        assert first.status_code == 200, first.text
        assert rate_limit(first)[:2] == ("key", 0)
        assert (await client.get("/api/models", headers=auth(KEY_BOB))).status_code == 429


async def test_a_refused_request_writes_nothing(nats_url: str, storage_config: S3Config, database_url: str) -> None:
    limits = RateLimits(requests_per_key=2, requests_per_ip=2, window_s=HOUR, sync_interval_s=0)
    async with replicas(nats_url, storage_config, database_url, limits, count=1) as (client,):
        await fresh_window(HOUR, needed_s=30)
        for _ in range(2):
            assert (await sent(client, "/api/models", headers=auth(KEY_ALICE))).status_code == 200
        before = await counters(database_url)
        statements: list[str] = []

        def record(_conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
            statements.append(statement)

        # Every engine in this process: the limiter's, the read model's, SQLite's or PostgreSQL's.
        event.listen(Engine, "before_cursor_execute", record)
        try:
            for headers in (auth(KEY_ALICE), auth(KEY_ALICE), auth(KEY_BOB), None):
                refused = await client.get("/api/models", headers=headers)
                assert_json_error(refused, 429)
        finally:
            event.remove(Engine, "before_cursor_execute", record)
        assert statements == []
        assert await counters(database_url) == before
    # Nor after: the replica had nothing left to add when it stopped.
    assert await counters(database_url) == before == {"key:" + digest_of(KEY_ALICE): 2, "ip:testclient": 2}


def digest_of(key: str) -> str:
    return hmac.new(b"test-secret", key.encode(), hashlib.sha256).hexdigest()[:32]


async def test_between_syncs_each_replica_admits_at_most_the_limit(
    nats_url: str, storage_config: S3Config, database_url: str
) -> None:
    """The bound the README gives: a replica that has not read the others' counts since they
    counted admits what it knows to be under the limit, never more."""
    limits = RateLimits(requests_per_key=3, requests_per_ip=0, window_s=HOUR, sync_interval_s=HOUR)
    async with replicas(nats_url, storage_config, database_url, limits) as (a, b):
        await fresh_window(HOUR, needed_s=30)
        for replica in (a, b):
            answers = [(await replica.get("/api/models", headers=auth(KEY_ALICE))).status_code for _ in range(5)]
            assert answers == [200, 200, 200, 429, 429]
    assert list((await counters(database_url)).values()) == [6]


def test_the_rate_limit_settings_reach_the_ingress_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("IMAGEBUS_INGRESS_RATE_LIMIT_KEY", "7")
    monkeypatch.setenv("IMAGEBUS_INGRESS_RATE_LIMIT_SYNC_S", "0.5")
    limits = ingress_config(IngressSettings()).rate_limits
    assert (limits.requests_per_key, limits.sync_interval_s) == (7, 0.5)
    monkeypatch.setenv("IMAGEBUS_INGRESS_RATE_LIMIT_SYNC_S", "-1")
    with pytest.raises(ValueError, match="rate_limit_sync_s"):
        IngressSettings()
