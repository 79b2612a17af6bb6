"""Checks on the names the adapters build subjects, streams and queues from."""

from __future__ import annotations

import re
from dataclasses import dataclass

# One NATS subject token / one AMQP routing-key word: no dots, wildcards or spaces, so a
# namespace, backend or job id can never widen a subscription or escape its prefix.
_TOKEN = re.compile(r"^[A-Za-z0-9_-]+$")


def checked_token(value: str, what: str) -> str:
    """``value`` if it is safe as one subject token / routing-key word, else ``ValueError``."""
    if not _TOKEN.fullmatch(value):
        raise ValueError(f"{what} {value!r} must be letters, digits, '_' or '-' only")
    return value


def nats_stream_name(namespace: str, suffix: str) -> str:
    """JetStream stream names: upper case, only A-Z, 0-9 and '_' (``imagebus-test`` → ``IMAGEBUS_TEST``)."""
    return re.sub(r"[^A-Z0-9_]", "_", f"{namespace}_{suffix}".upper())


@dataclass(frozen=True)
class NatsNames:
    """Streams, subjects and consumers of one namespace on NATS."""

    namespace: str

    @property
    def cmd_stream(self) -> str:
        return nats_stream_name(self.namespace, "CMD")

    @property
    def evt_stream(self) -> str:
        return nats_stream_name(self.namespace, "EVT")

    @property
    def dead_stream(self) -> str:
        return nats_stream_name(self.namespace, "DEAD")

    @property
    def cmd_subjects(self) -> str:
        return f"{self.namespace}.cmd.generate.>"

    @property
    def dead_subjects(self) -> str:
        return f"{self.namespace}.dead.>"

    def dead_subject(self, queue: str) -> str:
        return f"{self.namespace}.dead.{queue}"

    @property
    def evt_subjects(self) -> str:
        return f"{self.namespace}.evt.>"

    def cmd_subject(self, backend: str) -> str:
        return f"{self.namespace}.cmd.generate.{backend}"

    def worker_consumer(self, backend: str) -> str:
        return f"{self.namespace}-worker-{backend}"

    def evt_subject(self, event_type: str, job_id: str) -> str:
        return f"{self.namespace}.evt.{event_type}.{job_id}"

    def evt_watch(self, job_id: str | None) -> str:
        return self.evt_subjects if job_id is None else f"{self.namespace}.evt.*.{job_id}"

    # Live-only events: core NATS subjects outside every stream's subjects, so nothing stores them.

    def live_subject(self, event_type: str, job_id: str) -> str:
        return f"{self.namespace}.live.{event_type}.{job_id}"

    def live_watch(self, job_id: str | None) -> str:
        return f"{self.namespace}.live.>" if job_id is None else f"{self.namespace}.live.*.{job_id}"

    def ctl_subject(self, backend: str) -> str:
        return f"{self.namespace}.ctl.cancel.{backend}"


@dataclass(frozen=True)
class AmqpNames:
    """Exchanges, queues and routing keys of one namespace on RabbitMQ."""

    namespace: str

    @property
    def commands_exchange(self) -> str:
        return f"{self.namespace}.commands"

    @property
    def dead_letter_exchange(self) -> str:
        return f"{self.namespace}.dead-letter"

    @property
    def dead_queue(self) -> str:
        return f"{self.namespace}.dead"

    @property
    def events_exchange(self) -> str:
        return f"{self.namespace}.events"

    @property
    def events_log(self) -> str:
        return f"{self.namespace}.events.log"

    @property
    def live_exchange(self) -> str:
        """Live-only events: a non-durable topic exchange with the events' routing keys, bound to
        watchers' queues only (never to the log)."""
        return f"{self.namespace}.live"

    @property
    def control_exchange(self) -> str:
        return f"{self.namespace}.control"

    def cmd_queue(self, backend: str) -> str:
        return f"{self.namespace}.cmd.{backend}"

    @staticmethod
    def evt_key(event_type: str, job_id: str) -> str:
        return f"evt.{event_type}.{job_id}"

    @staticmethod
    def evt_binding(job_id: str | None) -> str:
        return "evt.#" if job_id is None else f"evt.*.{job_id}"

    @staticmethod
    def ctl_key(backend: str) -> str:
        return f"cancel.{backend}"
