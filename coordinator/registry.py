"""The in-memory worker registry.

Costs, for N registered workers:
- lookup, register, heartbeat, unregister: O(1) (plus the worker's own services and models);
- a scheduling decision: O(1) (see :mod:`coordinator.scheduler`);
- an expiry sweep: O(expired). Live workers sit in an ordered dict kept in order of their last
  beat (each beat moves its worker to the end), so a sweep only looks at the stale front.

States: ``active`` -> ``suspect`` (no beat for ``SUSPECT_AFTER`` intervals, or ``STRIKE_LIMIT``
failed connections: out of routing) -> removed (no beat for ``REMOVE_AFTER`` seconds). A
``draining`` worker keeps beating but gets no new requests.
"""

from __future__ import annotations

import hashlib
import hmac
import random
import secrets
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from coordinator.catalog import Catalog, ServiceSpec
from coordinator.protocol import (
    Capabilities,
    GpuLoad,
    ServiceOffer,
    ServiceSummary,
    WorkerCounts,
    WorkerHealth,
    WorkerHeartbeatRequest,
    WorkerRecordView,
    WorkerRegisterRequest,
    WorkerState,
    WorkerType,
)
from coordinator.scheduler import Pool, Slot
from coordinator.urls import origin_key


class RegistryError(Exception):
    """Base of registry refusals; ``code`` is the wire error code."""

    code = "registry_error"


class UnknownWorker(RegistryError):
    code = "unknown_worker"


class Forbidden(RegistryError):
    code = "forbidden"


class RegistryFull(RegistryError):
    code = "registry_full"


def hash_token(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()


def token_matches(presented: str | None, stored: bytes) -> bool:
    """Constant-time check of a presented token against a stored hash."""
    candidate = hash_token(presented) if presented else b"\0" * 32
    return hmac.compare_digest(candidate, stored) and presented is not None


def _model_key(model: str) -> str:
    """The pool key of a model: ``llama3:latest`` and ``llama3`` are one model (Ollama's rule)."""
    return model.removesuffix(":latest")


class WorkerRecord:
    """One registered worker. Never serialised with its secrets."""

    __slots__ = (
        "_caps",
        "agent_version",
        "assigned",
        "cpu_pct",
        "gateway_key",
        "gpu_util",
        "in_flight",
        "last_beat",
        "missed",
        "origin",
        "proxy_head",
        "registered_at",
        "reported_active",
        "slots",
        "state",
        "strikes",
        "token_hash",
        "tunnel_url",
        "worker_id",
        "worker_type",
    )

    def __init__(
        self,
        worker_id: str,
        token_hash: bytes,
        worker_type: WorkerType,
        tunnel_url: str,
        gateway_key: str | None,
        capabilities: Capabilities,
        agent_version: str | None,
        now: float,
    ) -> None:
        self.worker_id = worker_id
        self.token_hash = token_hash
        self.worker_type: WorkerType = worker_type
        self.tunnel_url = tunnel_url
        self.origin = origin_key(tunnel_url)
        self.gateway_key = gateway_key
        # The front door's Host and gateway-key header lines for this worker, made on first use.
        self.proxy_head: bytes | None = None
        # Kept compact (the JSON of its non-default fields): a validated pydantic model costs
        # about 1.5 KiB per worker, and only the admin views read it back.
        self._caps = capabilities.model_dump_json(exclude_defaults=True).encode()
        self.agent_version = agent_version
        self.assigned: list[str] = []
        self.slots: dict[str, Slot] = {}
        self.state: WorkerState = "active"
        self.missed = False
        self.strikes = 0
        self.in_flight = 0
        self.reported_active = 0
        self.cpu_pct: float | None = None
        self.gpu_util: float | None = None
        self.last_beat = now
        self.registered_at = time.time()

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities.model_validate_json(self._caps)

    @property
    def offers(self) -> dict[str, ServiceOffer]:
        """The services the worker offers, by canonical name (built from its slots)."""
        return {name: slot.offer() for name, slot in self.slots.items()}

    def health(self, strike_limit: int) -> WorkerHealth:
        if self.missed or self.strikes >= strike_limit:
            return "suspect"
        return self.state

    def reported_load(self) -> float:
        util = self.gpu_util if self.gpu_util is not None else (self.cpu_pct or 0.0)
        return self.reported_active + util / 100.0

    def view(self, strike_limit: int, now: float) -> WorkerRecordView:
        return WorkerRecordView(
            worker_id=self.worker_id,
            worker_type=self.worker_type,
            state=self.health(strike_limit),
            tunnel_url=self.tunnel_url,
            capabilities=self.capabilities,
            services=[slot.offer() for slot in self.slots.values()],
            assigned_services=list(self.assigned),
            in_flight=self.in_flight,
            reported_active_requests=self.reported_active,
            cpu_pct=self.cpu_pct,
            strikes=self.strikes,
            registered_at=self.registered_at,
            last_heartbeat_age_s=round(max(0.0, now - self.last_beat), 3),
            agent_version=self.agent_version,
        )


@dataclass(frozen=True)
class Registration:
    worker: WorkerRecord
    worker_token: str
    replaced: bool


class _ServiceIndex:
    """Per-service routing pools and assignment bookkeeping."""

    __slots__ = ("assigned", "model_pools", "offered", "pool", "waiting")

    def __init__(self) -> None:
        self.pool = Pool()
        self.model_pools: dict[str, Pool] = {}
        self.offered = 0  # live workers offering it (any state)
        self.assigned = 0  # live workers it is assigned to
        self.waiting: dict[str, None] = {}  # fit workers that offer it, not assigned (cap)


class Registry:
    def __init__(
        self,
        catalog: Catalog,
        *,
        suspect_after_s: float,
        remove_after_s: float,
        strike_limit: int = 3,
        max_workers: int = 200_000,
        max_services_per_worker: int = 8,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
    ) -> None:
        self.catalog = catalog
        self.suspect_after_s = suspect_after_s
        self.remove_after_s = remove_after_s
        self.strike_limit = strike_limit
        self.max_workers = max_workers
        self.max_services_per_worker = max_services_per_worker
        self.clock = clock
        self.rng = rng or random.Random()  # noqa: S311 - load balancing, not security
        self._workers: dict[str, WorkerRecord] = {}
        self._alive: OrderedDict[str, WorkerRecord] = OrderedDict()  # by last beat
        self._suspects: OrderedDict[str, WorkerRecord] = OrderedDict()  # by last beat
        self._services: dict[str, _ServiceIndex] = {}
        self.on_removed: Callable[[WorkerRecord, str], None] | None = None

    # ---------------------------------------------------------------- lookups

    def __len__(self) -> int:
        return len(self._workers)

    def __iter__(self) -> Iterator[WorkerRecord]:
        return iter(list(self._workers.values()))

    def get(self, worker_id: str) -> WorkerRecord | None:
        return self._workers.get(worker_id)

    # ---------------------------------------------------------------- membership

    def register(
        self, req: WorkerRegisterRequest, tunnel_url: str, *, new_id: Callable[[], str]
    ) -> Registration:
        """Add a worker, or replace one whose ``worker_token`` the request proves.

        A new worker keeps the ``worker_token`` it presents (else one is generated): an agent
        that lost the reply to its registration repeats it with the same token instead of being
        locked out of its own id until the old record expires.
        """
        old = self._workers.get(req.worker_id) if req.worker_id else None
        if old is not None:
            if not token_matches(req.worker_token, old.token_hash):
                raise Forbidden(
                    "this worker_id is registered; re-registering it needs its worker_token"
                )
            token = req.worker_token
            assert token is not None
        else:
            if len(self._workers) >= self.max_workers:
                raise RegistryFull(f"the registry holds its maximum of {self.max_workers} workers")
            # A worker may propose its own token (the agent persists one before it registers),
            # so a registration whose reply was lost can be repeated with the same token.
            token = req.worker_token or secrets.token_urlsafe(32)
        worker_id = req.worker_id or new_id()
        offers: dict[str, ServiceOffer] = {}
        for offer in req.services:
            offers[self.catalog.canonical(offer.name)] = offer
        record = WorkerRecord(
            worker_id=worker_id,
            token_hash=hash_token(token),
            worker_type=req.worker_type,
            tunnel_url=tunnel_url,
            gateway_key=req.gateway_key,
            capabilities=req.capabilities,
            agent_version=req.agent_version,
            now=self.clock(),
        )
        gaps: list[ServiceSpec] = []
        if old is not None:
            # Fill the gaps the old record leaves only after the new one took its services back:
            # a holder that re-registers (a new quick-tunnel URL) is not a departure.
            gaps = self._drop(old, fill_gaps=False)
        self._workers[worker_id] = record
        self._alive[worker_id] = record
        for name, offer in offers.items():
            record.slots[name] = Slot(
                record, name, offer.max_concurrency, offer.status, tuple(offer.models)
            )
            self._index(name).offered += 1
        self._assign(record, req.capabilities)
        self._route(record)
        for spec in gaps:
            self._fill_gap(spec)
        return Registration(record, token, replaced=old is not None)

    def authenticate(self, worker_id: str, token: str | None) -> WorkerRecord:
        record = self._workers.get(worker_id)
        if record is None:
            raise UnknownWorker(f"worker {worker_id!r} is not registered here; register again")
        if not token_matches(token, record.token_hash):
            raise Forbidden("the worker token does not match")
        return record

    def heartbeat(self, record: WorkerRecord, beat: WorkerHeartbeatRequest) -> None:
        """Record a beat from an authenticated worker."""
        wid = record.worker_id
        record.last_beat = self.clock()
        record.reported_active = beat.active_requests
        record.cpu_pct = beat.cpu_pct
        record.gpu_util = _max_util(beat.gpus)
        changed = record.state != beat.state or record.missed or record.strikes > 0
        record.state = beat.state
        record.strikes = 0
        if record.missed:
            record.missed = False
            del self._suspects[wid]
            self._alive[wid] = record
        else:
            self._alive.move_to_end(wid)
        for health in beat.services:
            name = self.catalog.canonical(health.name)
            slot = record.slots.get(name)
            if slot is None:
                continue
            models = health.models
            models_changed = models is not None and tuple(models) != slot.models
            if slot.status != health.status or models_changed:
                slot.status = health.status
                if models_changed:
                    self._unroute_slot(slot)
                    slot.models = tuple(models or ())
                changed = True
        if changed:
            self._route(record)

    def remove(self, worker_id: str, reason: str) -> WorkerRecord | None:
        record = self._workers.get(worker_id)
        if record is None:
            return None
        self._drop(record)
        if self.on_removed is not None:
            self.on_removed(record, reason)
        return record

    def _drop(self, record: WorkerRecord, *, fill_gaps: bool = True) -> list[ServiceSpec]:
        """Forget a worker; returns the services it leaves below target (filled unless told not)."""
        wid = record.worker_id
        del self._workers[wid]
        self._alive.pop(wid, None)
        self._suspects.pop(wid, None)
        for slot in record.slots.values():
            self._unroute_slot(slot)
        gaps = []
        for name in record.slots:
            index = self._services[name]
            index.offered -= 1
            index.waiting.pop(wid, None)
        for name in record.assigned:
            index = self._services[name]
            index.assigned -= 1
            spec = self.catalog.get(name)
            if spec is not None and index.assigned < spec.target_replicas:
                gaps.append(spec)
        for name in [n for n in record.slots if self._services[n].offered == 0]:
            index = self._services[name]
            if index.pool.size == 0 and not index.waiting:
                del self._services[name]
        if fill_gaps:
            for spec in gaps:
                self._fill_gap(spec)
        return gaps

    # ---------------------------------------------------------------- assignment

    def _index(self, name: str) -> _ServiceIndex:
        index = self._services.get(name)
        if index is None:
            index = self._services[name] = _ServiceIndex()
        return index

    def _assign(self, record: WorkerRecord, capabilities: Capabilities) -> None:
        """Assign the offered services the worker is fit for: gaps first, then by priority."""
        fit: list[ServiceSpec] = []
        for name in record.slots:
            spec = self.catalog.get(name)
            if spec is not None and spec.fits(record.worker_type, capabilities):
                fit.append(spec)

        def order(spec: ServiceSpec) -> tuple[int, int, int]:
            gap = spec.target_replicas - self._index(spec.name).assigned
            return (0 if gap > 0 else 1, spec.priority, -gap)

        fit.sort(key=order)
        for i, spec in enumerate(fit):
            index = self._index(spec.name)
            if i < self.max_services_per_worker:
                record.assigned.append(spec.name)
                index.assigned += 1
            else:
                index.waiting[record.worker_id] = None

    def _fill_gap(self, spec: ServiceSpec) -> None:
        index = self._services.get(spec.name)
        if index is None:
            return
        while index.waiting and index.assigned < spec.target_replicas:
            wid = next(iter(index.waiting))
            del index.waiting[wid]
            record = self._workers.get(wid)
            if record is None or spec.name in record.assigned:
                continue
            record.assigned.append(spec.name)
            index.assigned += 1
            self._route(record)

    # ---------------------------------------------------------------- routing

    def _route(self, record: WorkerRecord) -> None:
        """Attach or detach each slot of the worker according to its health and status."""
        routable = record.health(self.strike_limit) == "active"
        for name, slot in record.slots.items():
            want = routable and name in record.assigned and slot.status == "ready"
            if want and not slot.pools:
                index = self._index(name)
                slot.pools.append(index.pool)
                for model in slot.models:
                    key = _model_key(model)
                    pool = index.model_pools.get(key)
                    if pool is None:
                        pool = index.model_pools[key] = Pool()
                    if model != key:  # `llama3:latest` is listed under that name too
                        index.model_pools.setdefault(model, pool)
                    if pool not in slot.pools:
                        slot.pools.append(pool)
                for pool in slot.pools:
                    pool.add(slot)
            elif not want and slot.pools:
                self._unroute_slot(slot)

    def _unroute_slot(self, slot: Slot) -> None:
        if not slot.pools:
            return
        index = self._services.get(slot.service)
        for pool in slot.pools:
            pool.remove(slot)
        slot.pools = []
        if index is not None:
            for key in [k for k, p in index.model_pools.items() if p.size == 0]:
                del index.model_pools[key]

    def resolve(self, name: str) -> str:
        return self.catalog.canonical(name)

    def pool(self, service: str, model: str | None = None) -> Pool | None:
        index = self._services.get(service)
        if index is None:
            return None
        if model is None or not index.model_pools:
            return index.pool
        return index.model_pools.get(_model_key(model))

    def models(self, service: str) -> list[str]:
        index = self._services.get(service)
        return sorted(index.model_pools) if index else []

    def known_service(self, service: str) -> bool:
        return service in self._services or service in self.catalog

    def service_names(self) -> list[str]:
        return sorted(set(self._services) | {s.name for s in self.catalog})

    def acquire(self, slot: Slot) -> None:
        old = slot.in_flight
        slot.in_flight = old + 1
        slot.worker.in_flight += 1
        for pool in slot.pools:
            pool.move(slot, old)

    def release(self, slot: Slot) -> None:
        old = slot.in_flight
        slot.in_flight = old - 1
        slot.worker.in_flight -= 1
        for pool in slot.pools:
            pool.move(slot, old)

    def strike(self, record: WorkerRecord) -> bool:
        """Count a failed connection; returns True when the worker just became suspect."""
        if self._workers.get(record.worker_id) is not record:
            return False
        record.strikes += 1
        if record.strikes == self.strike_limit:
            self._route(record)
            return True
        return False

    # ---------------------------------------------------------------- expiry

    def sweep(self) -> tuple[list[WorkerRecord], list[WorkerRecord]]:
        """Mark workers suspect and remove expired ones. Costs O(workers that change)."""
        now = self.clock()
        suspected: list[WorkerRecord] = []
        removed: list[WorkerRecord] = []
        cutoff = now - self.suspect_after_s
        alive = self._alive
        while alive:
            wid, record = next(iter(alive.items()))
            if record.last_beat > cutoff:
                break
            alive.popitem(last=False)
            record.missed = True
            self._suspects[wid] = record
            self._route(record)
            suspected.append(record)
        cutoff = now - self.remove_after_s
        suspects = self._suspects
        while suspects:
            wid, record = next(iter(suspects.items()))
            if record.last_beat > cutoff:
                break
            self.remove(wid, "expired")
            removed.append(record)
        return suspected, removed

    # ---------------------------------------------------------------- summaries

    def counts(self) -> WorkerCounts:
        counts = WorkerCounts(total=len(self._workers))
        for record in self._workers.values():
            health = record.health(self.strike_limit)
            setattr(counts, health, getattr(counts, health) + 1)
            setattr(counts, record.worker_type, getattr(counts, record.worker_type) + 1)
        return counts

    def ready_counts(self) -> dict[str, int]:
        return {name: idx.pool.size for name, idx in sorted(self._services.items())}

    def services_summary(self) -> list[ServiceSummary]:
        out = []
        for name in self.service_names():
            index = self._services.get(name)
            out.append(
                ServiceSummary(
                    name=name,
                    ready_workers=index.pool.size if index else 0,
                    workers=index.offered if index else 0,
                    models=sorted(index.model_pools) if index else [],
                    aliases=self.catalog.aliases_of(name),
                )
            )
        return out

    def views(self, records: Iterable[WorkerRecord] | None = None) -> list[WorkerRecordView]:
        now = self.clock()
        chosen = self._workers.values() if records is None else records
        return [r.view(self.strike_limit, now) for r in chosen]


def _max_util(gpus: list[GpuLoad]) -> float | None:
    utils = [g.utilization_pct for g in gpus if g.utilization_pct is not None]
    return max(utils) if utils else None
