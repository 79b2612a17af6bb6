"""Message bus adapters behind one protocol; ``connect_bus`` picks one by URL scheme."""

from __future__ import annotations

import asyncio

import structlog

from bus.base import Bus, BusOptions, CommandDelivery, LoggedEvent

log = structlog.get_logger(__name__)

# How long a first connection is tried: a role may start while its broker restarts, or before it
# (under Kubernetes, a role that exits at once waits out a growing crash-loop back-off instead).
STARTUP_PATIENCE_S = 30.0
_STARTUP_RETRY_S = 1.0


async def connect_bus(url: str, options: BusOptions | None = None, *, patience_s: float = STARTUP_PATIENCE_S) -> Bus:
    """``nats://...`` → JetStream, ``amqp://...`` → RabbitMQ, ``memory://`` → in-process.

    A broker that cannot be reached is tried again every second for ``patience_s``; then the
    ConnectionError is raised (a wrong URL is seen, only later).
    """
    options = options or BusOptions()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + patience_s
    while True:
        try:
            return await _connect(url, options)
        except ConnectionError as err:
            if loop.time() + _STARTUP_RETRY_S > deadline:
                raise
            log.warning("bus_unreachable", error=str(err), retry_in_s=_STARTUP_RETRY_S)
            await asyncio.sleep(_STARTUP_RETRY_S)


async def _connect(url: str, options: BusOptions) -> Bus:
    scheme = url.split("://", 1)[0].lower()
    if scheme in ("nats", "tls"):
        from bus.nats import NatsBus

        return await NatsBus.connect(url, options)
    if scheme in ("amqp", "amqps"):
        from bus.amqp import AmqpBus

        return await AmqpBus.connect(url, options)
    if scheme == "memory":
        from bus.memory import MemoryBus

        return MemoryBus.named(url, options)
    raise ValueError(f"unsupported bus URL scheme {scheme!r}: use nats://, amqp:// or memory://")


__all__ = ["Bus", "BusOptions", "CommandDelivery", "LoggedEvent", "connect_bus"]
