"""Bookkeeping every adapter's command delivery shares: it is settled exactly once."""

from __future__ import annotations


class SettleOnce:
    def __init__(self) -> None:
        self.settled = False

    def _settle(self) -> None:
        if self.settled:
            raise RuntimeError("delivery already settled")
        self.settled = True

    def _require_unsettled(self) -> None:
        if self.settled:
            raise RuntimeError("in_progress() on a settled delivery")
