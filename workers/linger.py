"""Adaptive batch linger: a batch that is not full waits for more jobs only while they are coming.

A command that reaches an idle worker with no other one just before it is, as far as the worker can
tell, alone: waiting for batch-mates would only add latency, so its run starts at once. Commands
published together reach the worker one by one, a few milliseconds apart; once two have arrived
closer than ``burst_gap_s`` the worker is in a burst, and a batch that is not full waits for the
next arrival (each one extends the wait by ``burst_gap_s``), never longer than ``max_linger_s`` in
all. Under load the batches form without any waiting: jobs queue while the model is busy.

Pure: the caller passes the time (the event loop's clock in the worker, plain numbers in tests).
"""

from __future__ import annotations

# uvloop's timers fire on a millisecond clock, possibly a little early: a wait shorter than this is
# no wait (a float remainder such as 1e-17 must never become another linger).
_CLOCK_RESOLUTION_S = 0.001


class BatchLinger:
    def __init__(self, max_linger_s: float, burst_gap_s: float) -> None:
        self.max_linger_s = max_linger_s
        self.burst_gap_s = burst_gap_s
        self._last_arrival: float | None = None
        # While now < this, another delivery is likely on its way.
        self._burst_until = float("-inf")
        # When the current linger began; None when no batch is lingering.
        self._lingering_since: float | None = None

    def arrived(self, now: float) -> None:
        """A delivery arrived at ``now``."""
        if self._last_arrival is not None and now - self._last_arrival <= self.burst_gap_s:
            self._burst_until = now + self.burst_gap_s
        self._last_arrival = now

    def wait_s(self, now: float) -> float:
        """How long a batch that is not full should still wait for batch-mates; 0: start it now."""
        if self.max_linger_s <= 0 or now >= self._burst_until:
            self._lingering_since = None
            return 0.0
        if self._lingering_since is None:
            self._lingering_since = now
        wait = min(self._burst_until, self._lingering_since + self.max_linger_s) - now
        if wait < _CLOCK_RESOLUTION_S:
            self._lingering_since = None
            return 0.0
        return wait

    def started(self) -> None:
        """A batch started: the next one lingers (if at all) from its own start."""
        self._lingering_since = None
