"""What handling one delivery came to; the runtime settles each kind in exactly one place."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Succeeded:
    image_ids: list[str]


@dataclass(frozen=True)
class Failed:
    error: str


@dataclass(frozen=True)
class Canceled:
    reason: str


@dataclass(frozen=True)
class DeadLetter:
    """Given up on without running (its earlier runs never finished): fail the job, keep the
    command in the dead-letter place."""

    error: str


@dataclass(frozen=True)
class Retry:
    """Transient failure: redeliver after ``delay_s``."""

    delay_s: float
    error: str


@dataclass(frozen=True)
class HandBack:
    """The worker is shutting down: give the job to another worker, no event."""


Outcome = Succeeded | Failed | Canceled | DeadLetter | Retry | HandBack
