"""Message bus adapters behind one protocol; ``connect_bus`` picks one by URL scheme."""

from __future__ import annotations

from bus.base import Bus, BusOptions, CommandDelivery, LoggedEvent


async def connect_bus(url: str, options: BusOptions | None = None) -> Bus:
    """``nats://...`` → JetStream, ``amqp://...`` → RabbitMQ, ``memory://`` → in-process."""
    options = options or BusOptions()
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
