"""How many events arrived lately: what tells the projector whether a batch is worth waiting for.

A transaction costs far more than an event in it, so under a steady trickle a batch waits a gap for
company. On a quiet stack that wait is pure lag: a job's last events come a millisecond apart and
then nothing, so a gap's wait for company that never comes delays the job's end in the read model.
The projector waits only while events have been arriving fast enough that the gap is likely to bring
one (see ``Projector._next_batch``).

Pure: the caller passes the time (the event loop's clock in the projector, plain numbers in tests).
"""

from __future__ import annotations

import math


class RecentArrivals:
    """Events counted with a weight that decays over ``window_s``: about how many arrived in the
    last ``window_s`` (exactly that many for a burst, its rate times ``window_s`` for a steady flow)."""

    def __init__(self, window_s: float) -> None:
        self.window_s = window_s
        self._weight = 0.0
        self._at = 0.0

    def arrived(self, now: float, count: int = 1) -> None:
        self._weight = self.recent(now) + count
        self._at = now

    def recent(self, now: float) -> float:
        if self.window_s <= 0 or self._weight == 0.0:
            return 0.0
        return self._weight * math.exp(-max(now - self._at, 0.0) / self.window_s)
