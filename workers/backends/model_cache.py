"""Loaded pipelines kept resident across jobs within a memory budget, evicted least-recently-used.

The seeds sit at the two bad ends: CyberImage unloads on every model switch (seconds to minutes per
switch), txt2img holds one model per process. Here a worker keeps as many models as its budget
holds and drops the one used longest ago when a new one needs the room.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import structlog

log = structlog.get_logger(__name__)

GIB = 1024**3


@dataclass(frozen=True)
class CacheEntry:
    pipeline: Any
    size_bytes: int


class ModelCache:
    """Not thread-safe: the diffusers backend calls it from its one torch thread only."""

    def __init__(
        self,
        load: Callable[[str], Any],
        *,
        budget_bytes: int,
        max_models: int | None = None,
        measure: Callable[[Any], int] | None = None,
        estimate: Callable[[str], int | None] = lambda _model: None,
        release: Callable[[], None] = lambda: None,
    ) -> None:
        self._load = load
        self._budget_bytes = budget_bytes
        self._max_models = max_models
        self._measure = measure or resident_bytes
        self._estimate = estimate
        self._release = release
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()
        # Sizes measured at earlier loads: better than the catalog's estimate when a model returns.
        self._known_sizes: dict[str, int] = {}
        self.loads = 0
        self.evictions = 0

    @property
    def used_bytes(self) -> int:
        return sum(entry.size_bytes for entry in self._entries.values())

    @property
    def loaded(self) -> list[str]:
        """Least recently used first."""
        return list(self._entries)

    def get(self, model: str) -> Any:
        entry = self._entries.get(model)
        if entry is not None:
            self._entries.move_to_end(model)
            return entry.pipeline
        # Make room before loading, so the old and the new model never share the memory at once.
        expected = self._known_sizes.get(model) or self._estimate(model) or 0
        self._evict_until(lambda: self.used_bytes + expected <= self._budget_bytes, reserve_slot=True)
        pipeline = self._load(model)
        size = self._measure(pipeline)
        self._known_sizes[model] = size
        self._entries[model] = CacheEntry(pipeline, size)
        self.loads += 1
        log.info("model_loaded", model=model, size_mb=size // 2**20, resident=self.loaded)
        # The measured size may exceed the estimate: evict others until it fits (never the new one).
        self._evict_until(lambda: self.used_bytes <= self._budget_bytes, keep=model)
        if size > self._budget_bytes:
            log.warning("model_exceeds_cache_budget", model=model, size_mb=size // 2**20,
                        budget_mb=self._budget_bytes // 2**20)  # fmt: skip
        return pipeline

    def _evict_until(self, fits: Callable[[], bool], *, keep: str | None = None, reserve_slot: bool = False) -> None:
        def over_count() -> bool:
            if self._max_models is None:
                return False
            limit = self._max_models - 1 if reserve_slot else self._max_models
            return len(self._entries) > limit

        evicted = False
        while self._entries and (not fits() or over_count()):
            victim = next(iter(self._entries))
            if victim == keep:
                break
            del self._entries[victim]
            self.evictions += 1
            evicted = True
            log.info("model_evicted", model=victim, resident=self.loaded)
        if evicted:
            self._release()


def resident_bytes(pipeline: Any) -> int:
    """Bytes of every parameter and buffer of the pipeline's torch modules (shared ones once)."""
    seen: set[int] = set()
    total = 0
    components = getattr(pipeline, "components", {}) or {}
    for component in components.values():
        tensors = []
        if hasattr(component, "parameters") and hasattr(component, "buffers"):
            tensors = [*component.parameters(), *component.buffers()]
        for tensor in tensors:
            if id(tensor) in seen:
                continue
            seen.add(id(tensor))
            total += tensor.numel() * tensor.element_size()
    return total
