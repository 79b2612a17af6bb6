"""The connections one ingress process holds, opened on startup and closed on shutdown."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from bus import Bus, connect_bus
from ingress.auth import KeyRing
from ingress.config import IngressConfig
from ingress.images import ImageService
from ingress.jobs import JobService
from ingress.keys import KeyStore
from ingress.links import LinkSigner
from ingress.live import LiveEvents, LiveProgress
from projector.database import Database, create_database, create_schema
from projector.readside import ReadModel
from storage.object_store import ObjectStore


@dataclass
class Services:
    config: IngressConfig
    bus: Bus
    store: ObjectStore
    read_model: ReadModel
    keyring: KeyRing
    keys: KeyStore
    jobs: JobService
    images: ImageService
    # The process's one bus subscription for event streams and live steps; the app runs it.
    live: LiveEvents


def open_database(config: IngressConfig) -> Database:
    """A handle on the read model's database, with the configured connection pool."""
    return create_database(
        config.database_url, pool_size=config.database_pool_size, pool_overflow=config.database_pool_overflow
    )


@asynccontextmanager
async def open_services(config: IngressConfig) -> AsyncIterator[Services]:
    database = open_database(config)
    await create_schema(database)
    keys = KeyStore(database, config.key_secret)
    keyring = KeyRing(
        config.api_keys,
        config.key_secret,
        admin_keys=config.admin_keys,
        allow_anonymous=config.allow_anonymous,
        store=keys,
        quota=config.quota,
        cache_s=config.key_cache_s,
    )
    bus = await connect_bus(config.bus_url, config.bus_options)
    store = ObjectStore(config.s3)
    try:
        read_model = ReadModel(database)
        progress = LiveProgress()
        jobs = JobService(bus, read_model, store, config.catalog, LinkSigner(config.key_secret), config.quota, progress)
        yield Services(
            config=config,
            bus=bus,
            store=store,
            read_model=read_model,
            keyring=keyring,
            keys=keys,
            jobs=jobs,
            images=ImageService(bus, read_model, store, jobs),
            live=LiveEvents(bus, read_model, progress),
        )
    finally:
        await bus.close()
        await database.dispose()
