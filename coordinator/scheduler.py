"""Least-outstanding scheduling in O(1) per decision.

Each ``(service, model)`` pair has a :class:`Pool` of routable *slots* (one slot = one worker's
offer of one service). A pool buckets its slots by the coordinator's own count of in-flight
requests, so the least-loaded bucket is found without scanning workers. Ties inside the bucket are
broken by power-of-two-choices on the worker's spare capacity and its reported load. A slot at its
``max_concurrency`` sits in no bucket and is never picked.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Generic, TypeVar

from coordinator.protocol import MAX_CONCURRENCY_CAP, ServiceOffer, ServiceStatus

if TYPE_CHECKING:
    from coordinator.registry import WorkerRecord

T = TypeVar("T")


class IndexedSet(Generic[T]):
    """A set with O(1) add, discard and uniform random choice."""

    __slots__ = ("_items", "_pos")

    def __init__(self) -> None:
        self._items: list[T] = []
        self._pos: dict[T, int] = {}

    def add(self, item: T) -> None:
        if item not in self._pos:
            self._pos[item] = len(self._items)
            self._items.append(item)

    def discard(self, item: T) -> None:
        pos = self._pos.pop(item, None)
        if pos is None:
            return
        last = self._items.pop()
        if pos < len(self._items):
            self._items[pos] = last
            self._pos[last] = pos

    def choice(self, rng: random.Random) -> T:
        return self._items[int(rng.random() * len(self._items))]

    def __contains__(self, item: object) -> bool:
        return item in self._pos

    def __len__(self) -> int:
        return len(self._items)

    def __iter__(self) -> Iterator[T]:
        return iter(list(self._items))


class Slot:
    """One worker's offer of one service (status, models), with its in-flight count."""

    __slots__ = ("in_flight", "max_concurrency", "models", "pools", "service", "status", "worker")

    def __init__(
        self,
        worker: WorkerRecord,
        service: str,
        max_concurrency: int,
        status: ServiceStatus = "ready",
        models: tuple[str, ...] = (),
    ) -> None:
        self.worker = worker
        self.service = service
        self.max_concurrency = min(max_concurrency, MAX_CONCURRENCY_CAP)
        self.status: ServiceStatus = status
        self.models = models
        self.in_flight = 0
        self.pools: list[Pool] = []  # pools this slot is attached to (empty: not routable)

    def offer(self) -> ServiceOffer:
        """The offer as the wire contract shows it (canonical service name)."""
        return ServiceOffer.model_construct(
            name=self.service,
            status=self.status,
            models=list(self.models),
            max_concurrency=self.max_concurrency,
        )

    @property
    def full(self) -> bool:
        return self.in_flight >= self.max_concurrency

    def score(self) -> tuple[int, float]:
        """Lower is better among equally loaded slots: more headroom, then less reported load."""
        reported = self.worker.reported_load()
        return (self.in_flight - self.max_concurrency, reported)


class Pool:
    """Routable slots of one ``(service, model)`` pair, bucketed by in-flight count.

    Buckets that empty are kept (at most ``MAX_CONCURRENCY_CAP + 1`` of them), so a request's
    acquire and release move a slot between two existing buckets without allocating.
    """

    __slots__ = ("_buckets", "_free", "_min", "size")

    def __init__(self) -> None:
        self._buckets: dict[int, IndexedSet[Slot]] = {}
        self._min = 0  # a lower bound of the smallest non-empty bucket key
        self._free = 0  # slots in buckets (routable and not full)
        self.size = 0  # routable slots, full ones included

    def _bucket_add(self, slot: Slot, load: int) -> None:
        bucket = self._buckets.get(load)
        if bucket is None:
            bucket = self._buckets[load] = IndexedSet()
        if slot not in bucket:
            bucket.add(slot)
            self._free += 1
        if load < self._min:
            self._min = load

    def _bucket_discard(self, slot: Slot, load: int) -> None:
        bucket = self._buckets.get(load)
        if bucket is not None and slot in bucket:
            bucket.discard(slot)
            self._free -= 1

    def add(self, slot: Slot) -> None:
        self.size += 1
        if not slot.full:
            self._bucket_add(slot, slot.in_flight)

    def remove(self, slot: Slot) -> None:
        self.size -= 1
        self._bucket_discard(slot, slot.in_flight)

    def move(self, slot: Slot, old: int) -> None:
        """``slot.in_flight`` changed from ``old``: re-bucket it.

        On every proxied request's path (twice), so the bucket operations are written inline.
        """
        buckets = self._buckets
        cap = slot.max_concurrency
        if old < cap:
            bucket = buckets.get(old)
            if bucket is not None:
                pos = bucket._pos.pop(slot, None)
                if pos is not None:
                    items = bucket._items
                    last = items.pop()
                    if pos < len(items):
                        items[pos] = last
                        bucket._pos[last] = pos
                    self._free -= 1
        new = slot.in_flight
        if new < cap:
            bucket = buckets.get(new)
            if bucket is None:
                bucket = buckets[new] = IndexedSet()
            if slot not in bucket._pos:
                bucket._pos[slot] = len(bucket._items)
                bucket._items.append(slot)
                self._free += 1
            if new < self._min:
                self._min = new

    @property
    def available(self) -> bool:
        return self._free > 0

    def pick(self, rng: random.Random, exclude: frozenset[str] = frozenset()) -> Slot | None:
        """The least-outstanding slot not owned by an excluded worker, or ``None``."""
        if not self._free:
            return None
        buckets = self._buckets
        load = self._min
        top = MAX_CONCURRENCY_CAP
        while load < top:
            bucket = buckets.get(load)
            if bucket is None or not bucket._items:
                load += 1
                continue
            if not exclude:
                self._min = load
                items = bucket._items
                if len(items) == 1:
                    return items[0]
            chosen = _pick_in_bucket(bucket, rng, exclude)
            if chosen is not None:
                return chosen
            load += 1
        return None


def _pick_in_bucket(
    bucket: IndexedSet[Slot], rng: random.Random, exclude: frozenset[str]
) -> Slot | None:
    n = len(bucket)
    a = bucket.choice(rng)
    if n == 1:
        return None if a.worker.worker_id in exclude else a
    b = bucket.choice(rng)
    candidates = [s for s in (a, b) if s.worker.worker_id not in exclude]
    if not candidates:
        candidates = [s for s in bucket if s.worker.worker_id not in exclude]
        if not candidates:
            return None
        return candidates[int(rng.random() * len(candidates))]
    if len(candidates) == 2 and candidates[1].score() < candidates[0].score():
        return candidates[1]
    return candidates[0]
