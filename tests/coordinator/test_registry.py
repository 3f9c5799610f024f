"""The in-memory worker registry, driven by a fake clock."""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from coordinator.catalog import Catalog, ServiceSpec
from coordinator.protocol import (
    Capabilities,
    GpuInfo,
    GpuLoad,
    ServiceHealth,
    ServiceOffer,
    WorkerHeartbeatRequest,
    WorkerRegisterRequest,
)
from coordinator.registry import (
    Forbidden,
    Registration,
    Registry,
    RegistryError,
    RegistryFull,
    UnknownWorker,
    WorkerRecord,
    token_matches,
)
from coordinator.scheduler import Pool

SUSPECT_AFTER = 15.0
REMOVE_AFTER = 60.0
URL = "http://127.0.0.1:9"


class Clock:
    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Fixture:
    """A registry on a fake clock, with helpers to register and beat."""

    def __init__(self, catalog: Catalog | None = None, **kwargs: Any) -> None:
        self.clock = Clock()
        kwargs.setdefault("suspect_after_s", SUSPECT_AFTER)
        kwargs.setdefault("remove_after_s", REMOVE_AFTER)
        self.registry = Registry(
            catalog or Catalog.load(None), clock=self.clock, rng=random.Random(0), **kwargs
        )
        self.removed: list[tuple[str, str]] = []
        self.registry.on_removed = lambda record, reason: self.removed.append(
            (record.worker_id, reason)
        )
        self._ids = itertools.count(1)

    def new_id(self) -> str:
        return f"auto-{next(self._ids)}"

    def register(
        self,
        worker_id: str | None = None,
        *,
        services: Sequence[str | ServiceOffer] = ("echo",),
        worker_type: str = "cpu",
        vram_mb: Sequence[int] = (),
        ram_mb: int = 16_000,
        token: str | None = None,
        url: str = URL,
    ) -> Registration:
        req = make_request(
            worker_id,
            services=services,
            worker_type=worker_type,
            vram_mb=vram_mb,
            ram_mb=ram_mb,
            token=token,
            url=url,
        )
        return self.registry.register(req, url, new_id=self.new_id)

    def gpu(self, worker_id: str | None = None, **kwargs: Any) -> Registration:
        kwargs.setdefault("vram_mb", (24_000,))
        return self.register(worker_id, worker_type="gpu", **kwargs)

    def beat(self, record: WorkerRecord, **fields: Any) -> None:
        self.registry.heartbeat(
            record, WorkerHeartbeatRequest(worker_id=record.worker_id, **fields)
        )

    def size(self, service: str, model: str | None = None) -> int:
        pool = self.registry.pool(service, model)
        return 0 if pool is None else pool.size

    def picked(self, service: str, model: str | None = None) -> WorkerRecord | None:
        pool = self.registry.pool(service, model)
        slot = pool.pick(self.registry.rng) if pool is not None else None
        return slot.worker if slot is not None else None


def make_request(
    worker_id: str | None = None,
    *,
    services: Sequence[str | ServiceOffer] = ("echo",),
    worker_type: str = "cpu",
    vram_mb: Sequence[int] = (),
    ram_mb: int = 16_000,
    token: str | None = None,
    url: str = URL,
) -> WorkerRegisterRequest:
    gpus = [
        GpuInfo(index=i, name="gpu", memory_total_mb=v, memory_free_mb=v)
        for i, v in enumerate(vram_mb)
    ]
    offers = [s if isinstance(s, ServiceOffer) else ServiceOffer(name=s) for s in services]
    return WorkerRegisterRequest(
        worker_id=worker_id,
        worker_token=token,
        worker_type=worker_type,  # type: ignore[arg-type]
        tunnel_url=url,
        gateway_key="gateway-key-0123456789",
        capabilities=Capabilities(cpu_cores=4, ram_total_mb=ram_mb, gpus=gpus),
        services=offers,
        agent_version="test",
    )


@pytest.fixture
def fx() -> Fixture:
    return Fixture()


def small_catalog(**overrides: Any) -> Catalog:
    """Services a, b, c (target 1, priorities 10/20/30) and z (target 0)."""
    specs = [
        ServiceSpec(name="a", priority=10, target_replicas=1, aliases=("alpha",)),
        ServiceSpec(name="b", priority=20, target_replicas=1),
        ServiceSpec(name="c", priority=30, target_replicas=1),
        ServiceSpec(name="z", priority=1000, target_replicas=0),
    ]
    return Catalog(specs, **overrides)


# --------------------------------------------------------------------------------------------
# Membership


def test_register_a_new_worker(fx: Fixture) -> None:
    reg = fx.register()
    record = reg.worker
    assert not reg.replaced
    assert record.worker_id == "auto-1"
    assert len(reg.worker_token) >= 32
    assert len(fx.registry) == 1
    assert fx.registry.get("auto-1") is record
    assert list(fx.registry) == [record]
    assert record.tunnel_url == URL
    assert record.gateway_key == "gateway-key-0123456789"
    assert record.assigned == ["echo"]
    assert record.health(fx.registry.strike_limit) == "active"
    assert record.last_beat == fx.clock.now
    assert fx.registry.authenticate("auto-1", reg.worker_token) is record
    assert fx.size("echo") == 1
    assert fx.picked("echo") is record


def test_tokens_are_stored_hashed(fx: Fixture) -> None:
    reg = fx.register()
    assert reg.worker_token.encode() not in reg.worker.token_hash
    assert token_matches(reg.worker_token, reg.worker.token_hash)
    assert not token_matches(None, reg.worker.token_hash)
    assert not token_matches("", reg.worker.token_hash)
    assert not token_matches(reg.worker_token + "x", reg.worker.token_hash)


def test_register_with_a_chosen_unknown_id(fx: Fixture) -> None:
    reg = fx.register("my-worker", token="old-token-from-a-previous-life")
    assert reg.worker.worker_id == "my-worker"
    assert not reg.replaced
    assert fx.registry.authenticate("my-worker", reg.worker_token) is reg.worker


def test_tokens_differ_between_workers(fx: Fixture) -> None:
    tokens = {fx.register().worker_token for _ in range(20)}
    assert len(tokens) == 20


def test_re_register_needs_the_token(fx: Fixture) -> None:
    first = fx.register("w1", url="http://127.0.0.1:1001")
    for token in (None, "wrong-token-0123456789", first.worker_token[:-1] + "x"):
        with pytest.raises(Forbidden) as info:
            fx.register("w1", token=token, url="http://127.0.0.1:6666")
        assert info.value.code == "forbidden"
    # The refused attempts changed nothing.
    assert fx.registry.get("w1") is first.worker
    assert first.worker.tunnel_url == "http://127.0.0.1:1001"
    assert fx.picked("echo") is first.worker
    assert len(fx.registry) == 1


def test_a_new_worker_keeps_the_token_it_proposes(fx: Fixture) -> None:
    """So an agent whose registration reply was lost repeats it with the same token."""
    proposed = "proposed-token-" + "x" * 28
    first = fx.register("w1", token=proposed)
    assert first.worker_token == proposed
    assert not first.replaced
    again = fx.register("w1", token=proposed, url="http://127.0.0.1:1002")
    assert again.replaced
    assert again.worker_token == proposed
    with pytest.raises(Forbidden):
        fx.register("w1", token="another-token-0123456789")


def test_re_register_replaces_the_tunnel_url_at_once(fx: Fixture) -> None:
    first = fx.register("w1", url="http://127.0.0.1:1001")
    fx.clock.advance(5)
    second = fx.register("w1", token=first.worker_token, url="http://127.0.0.1:2002")
    assert second.replaced
    assert second.worker_token == first.worker_token
    assert second.worker is not first.worker
    assert second.worker.tunnel_url == "http://127.0.0.1:2002"
    assert fx.registry.get("w1") is second.worker
    assert len(fx.registry) == 1
    assert fx.size("echo") == 1
    for _ in range(10):
        assert fx.picked("echo") is second.worker
    assert fx.registry.authenticate("w1", first.worker_token) is second.worker
    assert first.worker.slots["echo"].pools == []  # the old record is out of routing
    assert fx.removed == []  # a replacement is not a removal
    # Expiry follows the new registration time.
    fx.clock.advance(SUSPECT_AFTER - 1)
    assert fx.registry.sweep() == ([], [])


def test_re_register_replaces_services(fx: Fixture) -> None:
    first = fx.register("w1", services=["echo"])
    second = fx.register("w1", token=first.worker_token, services=["notes-coa"])
    assert second.worker.assigned == ["notes-coa"]
    assert fx.size("echo") == 0
    assert fx.size("notes-coa") == 1
    assert fx.registry.pool("echo") is None
    summary = {s.name: s for s in fx.registry.services_summary()}
    assert summary["echo"].workers == 0
    assert summary["notes-coa"].workers == 1


def test_re_register_an_expired_id_is_a_new_registration(fx: Fixture) -> None:
    first = fx.register("w1")
    fx.clock.advance(REMOVE_AFTER + 1)
    fx.registry.sweep()
    assert fx.registry.get("w1") is None
    again = fx.register("w1", token=first.worker_token)
    assert not again.replaced
    assert fx.registry.get("w1") is again.worker


def test_authenticate(fx: Fixture) -> None:
    reg = fx.register("w1")
    assert fx.registry.authenticate("w1", reg.worker_token) is reg.worker
    with pytest.raises(UnknownWorker) as unknown:
        fx.registry.authenticate("nobody", reg.worker_token)
    assert unknown.value.code == "unknown_worker"
    for token in (None, "", "wrong", reg.worker_token.upper() + "!"):
        with pytest.raises(Forbidden):
            fx.registry.authenticate("w1", token)
    other = fx.register("w2")
    with pytest.raises(Forbidden):
        fx.registry.authenticate("w1", other.worker_token)
    assert issubclass(UnknownWorker, RegistryError)
    assert issubclass(Forbidden, RegistryError)
    assert issubclass(RegistryFull, RegistryError)


def test_remove(fx: Fixture) -> None:
    a = fx.register("w1")
    fx.register("w2")
    assert fx.size("echo") == 2
    assert fx.registry.remove("w1", "unregistered") is a.worker
    assert fx.removed == [("w1", "unregistered")]
    assert fx.registry.get("w1") is None
    assert len(fx.registry) == 1
    assert fx.size("echo") == 1
    assert fx.registry.remove("w1", "again") is None
    assert fx.registry.remove("nobody", "x") is None
    assert fx.removed == [("w1", "unregistered")]
    with pytest.raises(UnknownWorker):
        fx.registry.authenticate("w1", a.worker_token)
    fx.registry.remove("w2", "unregistered")
    assert fx.registry.pool("echo") is None  # the last one cleans the index
    assert "echo" not in fx.registry.ready_counts()
    assert fx.registry.counts().total == 0


def test_registry_full() -> None:
    fx = Fixture(max_workers=2)
    first = fx.register("w1")
    fx.register("w2")
    with pytest.raises(RegistryFull) as info:
        fx.register("w3")
    assert info.value.code == "registry_full"
    with pytest.raises(RegistryFull):
        fx.register()
    assert len(fx.registry) == 2
    # Re-registering an existing worker needs no new room.
    assert fx.register("w1", token=first.worker_token).replaced
    fx.registry.remove("w2", "unregistered")
    fx.register("w3")
    assert len(fx.registry) == 2


# --------------------------------------------------------------------------------------------
# Heartbeats


def test_heartbeat_records_load(fx: Fixture) -> None:
    record = fx.register().worker
    fx.clock.advance(3)
    fx.beat(
        record,
        active_requests=4,
        cpu_pct=50.0,
        gpus=[GpuLoad(index=0, utilization_pct=20), GpuLoad(index=1, utilization_pct=70)],
    )
    assert record.last_beat == fx.clock.now
    assert record.reported_active == 4
    assert record.cpu_pct == 50.0
    assert record.gpu_util == 70
    assert record.reported_load() == pytest.approx(4.7)
    fx.beat(record, cpu_pct=30.0)
    assert record.gpu_util is None
    assert record.reported_load() == pytest.approx(0.3)


def test_heartbeat_service_status(fx: Fixture) -> None:
    record = fx.register(services=[ServiceOffer(name="echo", status="starting")]).worker
    assert record.assigned == ["echo"]
    assert fx.size("echo") == 0  # not ready yet
    fx.beat(record, services=[ServiceHealth(name="echo", status="ready")])
    assert record.offers["echo"].status == "ready"
    assert fx.size("echo") == 1
    fx.beat(record, services=[ServiceHealth(name="echo", status="unhealthy")])
    assert fx.size("echo") == 0
    fx.beat(record, services=[ServiceHealth(name="echo", status="ready")])
    assert fx.size("echo") == 1
    # Services the worker never offered are ignored.
    fx.beat(record, services=[ServiceHealth(name="notes-coa", status="ready")])
    assert "notes-coa" not in record.offers
    assert fx.size("notes-coa") == 0


# --------------------------------------------------------------------------------------------
# Expiry


def test_active_suspect_removed(fx: Fixture) -> None:
    record = fx.register("w1").worker
    fx.clock.advance(SUSPECT_AFTER - 0.5)
    assert fx.registry.sweep() == ([], [])
    assert record.health(3) == "active"
    assert fx.size("echo") == 1
    fx.clock.advance(1)
    suspected, removed = fx.registry.sweep()
    assert suspected == [record]
    assert removed == []
    assert record.health(3) == "suspect"
    assert fx.size("echo") == 0  # out of routing
    assert fx.picked("echo") is None
    assert fx.registry.counts().suspect == 1
    assert fx.registry.views()[0].state == "suspect"
    assert fx.registry.get("w1") is record
    assert fx.registry.sweep() == ([], [])  # suspected once only
    fx.clock.advance(REMOVE_AFTER - SUSPECT_AFTER - 1)  # 59.5 s since the last beat
    assert fx.registry.sweep() == ([], [])
    fx.clock.advance(1)
    suspected, removed = fx.registry.sweep()
    assert suspected == []
    assert removed == [record]
    assert fx.registry.get("w1") is None
    assert fx.removed == [("w1", "expired")]
    assert len(fx.registry) == 0


def test_one_long_gap_suspects_and_removes_in_one_sweep(fx: Fixture) -> None:
    record = fx.register().worker
    fx.clock.advance(REMOVE_AFTER + 100)
    assert fx.registry.sweep() == ([record], [record])
    assert len(fx.registry) == 0


def test_a_beat_brings_a_suspect_back(fx: Fixture) -> None:
    record = fx.register("w1").worker
    fx.clock.advance(SUSPECT_AFTER + 1)
    fx.registry.sweep()
    assert fx.size("echo") == 0
    fx.beat(record)
    assert record.health(3) == "active"
    assert fx.size("echo") == 1
    assert fx.picked("echo") is record
    # The clock restarts from this beat.
    fx.clock.advance(SUSPECT_AFTER - 1)
    assert fx.registry.sweep() == ([], [])
    fx.clock.advance(2)
    assert fx.registry.sweep() == ([record], [])
    fx.clock.advance(REMOVE_AFTER)
    assert fx.registry.sweep() == ([], [record])


def test_regular_beats_keep_a_worker_alive(fx: Fixture) -> None:
    record = fx.register().worker
    for _ in range(50):
        fx.clock.advance(SUSPECT_AFTER / 2)
        fx.beat(record)
        assert fx.registry.sweep() == ([], [])
    assert fx.size("echo") == 1


def test_sweep_follows_beat_order(fx: Fixture) -> None:
    records = [fx.register(f"w{i}").worker for i in range(5)]
    fx.clock.advance(10)
    fx.beat(records[0])
    fx.beat(records[3])
    fx.clock.advance(SUSPECT_AFTER - 10 + 1)
    suspected, removed = fx.registry.sweep()
    assert {r.worker_id for r in suspected} == {"w1", "w2", "w4"}
    assert removed == []
    assert fx.size("echo") == 2
    fx.clock.advance(10)
    suspected, _ = fx.registry.sweep()
    assert {r.worker_id for r in suspected} == {"w0", "w3"}
    fx.clock.advance(REMOVE_AFTER - SUSPECT_AFTER - 10)
    _, removed = fx.registry.sweep()
    assert {r.worker_id for r in removed} == {"w1", "w2", "w4"}
    fx.clock.advance(10)
    _, removed = fx.registry.sweep()
    assert {r.worker_id for r in removed} == {"w0", "w3"}


class _CountingSlot:
    """Wraps WorkerRecord's ``last_beat`` slot descriptor and counts reads."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.reads = 0

    def __get__(self, obj: Any, owner: Any = None) -> Any:
        if obj is None:
            return self
        self.reads += 1
        return self.inner.__get__(obj, owner)

    def __set__(self, obj: Any, value: Any) -> None:
        self.inner.__set__(obj, value)


def test_sweep_costs_o_expired(monkeypatch: pytest.MonkeyPatch) -> None:
    fx = Fixture()
    n = 20_000
    step = 0.0005  # worker i registers (and last beats) at start + i * step: 10 s in all
    start = fx.clock.now
    req = make_request()
    for i in range(n):
        fx.clock.now = start + i * step
        fx.registry.register(req, URL, new_id=fx.new_id)
    assert len(fx.registry) == n
    counter = _CountingSlot(WorkerRecord.__dict__["last_beat"])
    monkeypatch.setattr(WorkerRecord, "last_beat", counter)
    routed = 0
    original_route = Registry._route

    def counting_route(self: Registry, record: WorkerRecord) -> None:
        nonlocal routed
        routed += 1
        original_route(self, record)

    monkeypatch.setattr(Registry, "_route", counting_route)

    # Nothing expires: a sweep looks at one record and touches nothing.
    fx.clock.now = start + SUSPECT_AFTER - step / 2
    for _ in range(100):
        assert fx.registry.sweep() == ([], [])
    assert counter.reads <= 100
    assert routed == 0
    assert fx.size("echo") == n

    # The ten oldest go suspect: about ten records are looked at.
    fx.clock.now = start + SUSPECT_AFTER + 9.5 * step
    counter.reads = 0
    suspected, removed = fx.registry.sweep()
    assert [r.worker_id for r in suspected] == [f"auto-{i}" for i in range(1, 11)]
    assert removed == []
    assert counter.reads <= 2 * len(suspected) + 2
    assert routed == 10
    assert fx.size("echo") == n - 10

    # The five oldest are removed: again only they (and the next in line) are looked at.
    fx.clock.now = start + REMOVE_AFTER + 4.5 * step
    counter.reads = 0
    suspected, removed = fx.registry.sweep()
    assert [r.worker_id for r in removed] == [f"auto-{i}" for i in range(1, 6)]
    assert counter.reads <= 2 * (len(suspected) + len(removed)) + 4
    assert len(fx.registry) == n - 5


# --------------------------------------------------------------------------------------------
# Draining and strikes


def test_draining_workers_are_not_routable(fx: Fixture) -> None:
    a = fx.register("a").worker
    b = fx.register("b").worker
    fx.beat(a, state="draining")
    assert a.health(3) == "draining"
    assert fx.size("echo") == 1
    for _ in range(20):
        assert fx.picked("echo") is b
    counts = fx.registry.counts()
    assert (counts.active, counts.draining, counts.total) == (1, 1, 2)
    fx.beat(b, state="draining")
    assert fx.picked("echo") is None
    # Draining workers keep beating and stay registered.
    fx.clock.advance(REMOVE_AFTER * 2)
    fx.beat(a, state="draining")
    fx.beat(b, state="draining")
    assert fx.registry.sweep() == ([], [])
    # Back to active.
    fx.beat(a)
    assert fx.picked("echo") is a
    # A draining worker that stops beating expires like any other.
    fx.clock.advance(REMOVE_AFTER + 1)
    _, removed = fx.registry.sweep()
    assert {r.worker_id for r in removed} == {"a", "b"}


def test_strikes(fx: Fixture) -> None:
    record = fx.register("w1").worker
    limit = fx.registry.strike_limit
    assert limit == 3
    for _ in range(limit - 1):
        assert fx.registry.strike(record) is False
        assert record.health(limit) == "active"
        assert fx.size("echo") == 1
    assert fx.registry.strike(record) is True
    assert record.health(limit) == "suspect"
    assert fx.size("echo") == 0
    assert fx.registry.counts().suspect == 1
    assert fx.registry.strike(record) is False  # already suspect
    fx.beat(record)
    assert record.strikes == 0
    assert record.health(limit) == "active"
    assert fx.size("echo") == 1


def test_custom_strike_limit() -> None:
    fx = Fixture(strike_limit=1)
    record = fx.register().worker
    assert fx.registry.strike(record) is True
    assert fx.size("echo") == 0


def test_strikes_on_a_stale_record_are_ignored(fx: Fixture) -> None:
    first = fx.register("w1")
    second = fx.register("w1", token=first.worker_token)
    for _ in range(5):
        assert fx.registry.strike(first.worker) is False
    assert second.worker.strikes == 0
    assert fx.size("echo") == 1
    fx.registry.remove("w1", "unregistered")
    assert fx.registry.strike(second.worker) is False


# --------------------------------------------------------------------------------------------
# Assignment


def test_cpu_worker_is_not_assigned_gpu_services(fx: Fixture) -> None:
    record = fx.register(services=["llm-inference", "vision-ocr", "echo"]).worker
    assert record.assigned == ["echo"]
    assert fx.size("llm-inference") == 0
    assert fx.size("vision-ocr") == 0
    summary = {s.name: s for s in fx.registry.services_summary()}
    assert summary["llm-inference"].workers == 1  # offered
    assert summary["llm-inference"].ready_workers == 0  # but not assigned


@pytest.mark.parametrize(
    ("worker_type", "vram", "expected"),
    [
        ("gpu", (24_000,), ["llm-inference", "vision-ocr"]),
        ("gpu", (4_000,), ["vision-ocr"]),  # too little VRAM for LLMs
        ("gpu", (), []),  # a "gpu" worker without a GPU
        ("cpu", (24_000,), []),
        ("edge", (24_000,), []),
    ],
)
def test_gpu_services_need_a_fitting_gpu(
    fx: Fixture, worker_type: str, vram: tuple[int, ...], expected: list[str]
) -> None:
    record = fx.register(
        services=["llm-inference", "vision-ocr"], worker_type=worker_type, vram_mb=vram
    ).worker
    assert sorted(record.assigned) == expected
    assert fx.size("llm-inference") == int("llm-inference" in expected)


def test_ram_requirements(fx: Fixture) -> None:
    small = fx.register(services=["rag-embeddings", "notes-coa"], ram_mb=1_000).worker
    big = fx.register(services=["rag-embeddings", "notes-coa"], ram_mb=8_000).worker
    assert small.assigned == ["notes-coa"]
    assert sorted(big.assigned) == ["notes-coa", "rag-embeddings"]


def test_gaps_first_then_priority() -> None:
    fx = Fixture(small_catalog(), max_services_per_worker=2)
    first = fx.register(services=["z", "c", "b", "a"]).worker
    # All of a, b, c have gaps: the two with the best priority win.
    assert first.assigned == ["a", "b"]
    second = fx.register(services=["z", "c", "b", "a"]).worker
    # Only c still has a gap: it comes first, then the best priority.
    assert second.assigned == ["c", "a"]
    third = fx.register(services=["z", "c", "b", "a"]).worker
    # No gaps left: priority alone.
    assert third.assigned == ["a", "b"]


@pytest.mark.parametrize("cap", [1, 2, 3, 8])
def test_max_services_per_worker(cap: int) -> None:
    specs = [ServiceSpec(name=f"s{i}", priority=i, target_replicas=1) for i in range(10)]
    fx = Fixture(Catalog(specs), max_services_per_worker=cap)
    for _ in range(4):
        record = fx.register(services=[f"s{i}" for i in range(10)]).worker
        assert len(record.assigned) == min(cap, 10)
        assert len(set(record.assigned)) == len(record.assigned)


def test_a_waiting_worker_fills_a_gap_when_the_holder_leaves() -> None:
    fx = Fixture(small_catalog(), max_services_per_worker=1)
    holder = fx.register("holder", services=["a"]).worker
    waiting = fx.register("waiting", services=["a", "b"]).worker
    assert holder.assigned == ["a"]
    assert waiting.assigned == ["b"]  # b had a gap; a was covered
    assert fx.size("a") == 1
    fx.registry.remove("holder", "unregistered")
    assert waiting.assigned == ["b", "a"]
    assert fx.size("a") == 1
    assert fx.picked("a") is waiting


def test_a_gap_from_expiry_is_filled() -> None:
    fx = Fixture(small_catalog(), max_services_per_worker=1)
    holder = fx.register("holder", services=["a"]).worker
    fx.clock.advance(30)
    waiting = fx.register("waiting", services=["a", "b"]).worker
    fx.clock.advance(REMOVE_AFTER - 30 + 1)
    fx.beat(waiting)
    _, removed = fx.registry.sweep()
    assert removed == [holder]
    assert "a" in waiting.assigned
    assert fx.picked("a") is waiting


def test_no_gap_no_fill() -> None:
    fx = Fixture(small_catalog(), max_services_per_worker=1)
    fx.register("h1", services=["a"])
    fx.register("h2", services=["a"])
    waiting = fx.register("waiting", services=["a", "b"]).worker
    fx.registry.remove("h1", "unregistered")  # a still has h2: no gap
    assert waiting.assigned == ["b"]
    fx.registry.remove("h2", "unregistered")  # now it has one
    assert waiting.assigned == ["b", "a"]


def test_gap_fill_skips_workers_that_left() -> None:
    fx = Fixture(small_catalog(), max_services_per_worker=1)
    fx.register("holder", services=["a"])
    fx.register("gone", services=["a", "b"])
    stay = fx.register("stay", services=["a", "c"]).worker
    fx.registry.remove("gone", "unregistered")
    fx.registry.remove("holder", "unregistered")
    assert stay.assigned == ["c", "a"]


def test_re_registration_of_the_holder_is_not_a_gap() -> None:
    """A holder that re-registers (say, with a new quick-tunnel URL) keeps its service at once:
    the service never really drops below target, so no waiting worker is pulled past its cap."""
    fx = Fixture(small_catalog(), max_services_per_worker=1)
    holder = fx.register("holder", services=["a"])
    waiting = fx.register("waiting", services=["a", "b"]).worker
    again = fx.register(
        "holder", token=holder.worker_token, services=["a"], url="http://127.0.0.1:7777"
    ).worker
    assert again.assigned == ["a"]
    assert waiting.assigned == ["b"]
    assert fx.size("a") == 1
    assert fx.picked("a") is again


def test_re_registration_that_drops_a_service_opens_a_gap() -> None:
    fx = Fixture(small_catalog(), max_services_per_worker=1)
    holder = fx.register("holder", services=["a"])
    waiting = fx.register("waiting", services=["a", "b"]).worker
    again = fx.register("holder", token=holder.worker_token, services=["c"]).worker
    assert again.assigned == ["c"]
    assert waiting.assigned == ["b", "a"]
    assert fx.picked("a") is waiting


def test_aliases_offered_at_registration_are_canonicalised(fx: Fixture) -> None:
    record = fx.gpu(services=["llm", "ocr", "notes"]).worker
    assert sorted(record.offers) == ["llm-inference", "notes-coa", "vision-ocr"]
    for name, offer in record.offers.items():
        assert offer.name == name
    assert sorted(record.slots) == sorted(record.offers)
    assert sorted(record.assigned) == ["llm-inference", "notes-coa", "vision-ocr"]
    assert fx.size("llm-inference") == 1
    assert fx.registry.pool("llm") is None  # pools are keyed by canonical name
    assert fx.registry.resolve("llm") == "llm-inference"
    assert fx.registry.resolve("echo") == "echo"
    # Heartbeats may use aliases too.
    fx.beat(record, services=[ServiceHealth(name="llm", status="unhealthy")])
    assert record.offers["llm-inference"].status == "unhealthy"
    assert fx.size("llm-inference") == 0


def test_unlisted_services() -> None:
    strict = Fixture()
    record = strict.register(services=["my-thing", "echo"]).worker
    assert record.assigned == ["echo"]
    assert strict.size("my-thing") == 0
    assert strict.registry.known_service("my-thing")  # offered, so known

    lenient = Fixture(Catalog.load(None, allow_unlisted=True))
    record = lenient.register(services=["my-thing", "echo"]).worker
    assert sorted(record.assigned) == ["echo", "my-thing"]
    assert lenient.size("my-thing") == 1
    assert "my-thing" in lenient.registry.service_names()


def test_known_service(fx: Fixture) -> None:
    assert fx.registry.known_service("llm-inference")
    assert fx.registry.known_service("echo")
    assert not fx.registry.known_service("nope")
    names = fx.registry.service_names()
    assert names == sorted(names)
    assert "llm-inference" in names


# --------------------------------------------------------------------------------------------
# Model pools


def test_model_pools(fx: Fixture) -> None:
    w1 = fx.gpu(
        "w1", services=[ServiceOffer(name="llm-inference", models=["llama3:latest", "mistral"])]
    ).worker
    w2 = fx.gpu("w2", services=[ServiceOffer(name="llm-inference", models=["qwen2"])]).worker
    assert fx.size("llm-inference") == 2
    assert fx.size("llm-inference", "llama3") == 1
    assert fx.picked("llm-inference", "llama3") is w1
    assert fx.picked("llm-inference", "llama3:latest") is w1
    assert fx.picked("llm-inference", "mistral") is w1
    assert fx.picked("llm-inference", "qwen2") is w2
    assert fx.registry.pool("llm-inference", "gpt-4") is None
    assert fx.registry.models("llm-inference") == [
        "llama3",
        "llama3:latest",
        "mistral",
        "qwen2",
    ]
    assert fx.registry.models("echo") == []
    summary = {s.name: s for s in fx.registry.services_summary()}
    assert set(summary["llm-inference"].models) >= {"llama3:latest", "mistral", "qwen2"}
    assert summary["llm-inference"].aliases == ["llm"]

    # A heartbeat that changes the model list moves the worker between pools.
    fx.beat(
        w2,
        services=[ServiceHealth(name="llm-inference", status="ready", models=["qwen2", "llama3"])],
    )
    assert w2.offers["llm-inference"].models == ["qwen2", "llama3"]
    assert fx.size("llm-inference", "llama3") == 2
    assert fx.size("llm-inference") == 2
    fx.beat(w2, services=[ServiceHealth(name="llm-inference", status="ready", models=["phi3"])])
    assert fx.size("llm-inference", "llama3") == 1
    assert fx.registry.pool("llm-inference", "qwen2") is None
    assert fx.picked("llm-inference", "phi3") is w2
    # A heartbeat without a model list keeps the known one.
    fx.beat(w2, services=[ServiceHealth(name="llm-inference", status="ready")])
    assert w2.offers["llm-inference"].models == ["phi3"]

    # Leaving empties the worker's model pools.
    fx.registry.remove("w1", "unregistered")
    assert fx.registry.pool("llm-inference", "llama3") is None
    assert fx.registry.pool("llm-inference", "mistral") is None
    assert fx.registry.models("llm-inference") == ["phi3"]


def test_model_pools_follow_health(fx: Fixture) -> None:
    record = fx.gpu(services=[ServiceOffer(name="llm-inference", models=["llama3"])]).worker
    fx.beat(record, state="draining")
    assert fx.size("llm-inference", "llama3") == 0
    fx.beat(record)
    assert fx.size("llm-inference", "llama3") == 1
    fx.clock.advance(SUSPECT_AFTER + 1)
    fx.registry.sweep()
    assert fx.size("llm-inference", "llama3") == 0
    fx.beat(record)
    assert fx.picked("llm-inference", "llama3") is record


def test_workers_without_model_lists_serve_any_model(fx: Fixture) -> None:
    record = fx.gpu(services=["llm-inference"]).worker
    assert fx.registry.models("llm-inference") == []
    assert fx.picked("llm-inference", "whatever-model") is record


def test_model_names_with_a_tag(fx: Fixture) -> None:
    record = fx.gpu(services=[ServiceOffer(name="llm-inference", models=["llama3:8b"])]).worker
    assert fx.picked("llm-inference", "llama3:8b") is record
    assert fx.registry.pool("llm-inference", "llama3") is None  # only :latest is implied


@pytest.mark.parametrize(
    "models",
    [["llama3", "llama3:latest"], ["llama3:latest", "llama3"], ["llama3", "llama3"]],
    ids=["bare-then-tagged", "tagged-then-bare", "repeated"],
)
def test_a_model_listed_with_and_without_its_tag_is_one_membership(
    fx: Fixture, models: list[str]
) -> None:
    """One worker is one member of a model pool, however many of its names map to that pool."""
    record = fx.gpu(services=[ServiceOffer(name="llm-inference", models=models)]).worker
    slot = record.slots["llm-inference"]
    assert fx.size("llm-inference", "llama3") == 1
    assert fx.size("llm-inference", "llama3:latest") == 1
    assert len({id(p) for p in slot.pools}) == len(slot.pools)
    other = fx.gpu(services=[ServiceOffer(name="llm-inference", models=["llama3"])]).worker
    assert fx.size("llm-inference", "llama3") == 2
    fx.registry.remove(other.worker_id, "unregistered")
    assert fx.size("llm-inference", "llama3") == 1


# --------------------------------------------------------------------------------------------
# Summaries


def test_counts(fx: Fixture) -> None:
    a = fx.register("a").worker
    fx.register("b", worker_type="edge")
    c = fx.gpu("c").worker
    d = fx.register("d").worker
    fx.beat(a, state="draining")
    for _ in range(3):
        fx.registry.strike(c)
    fx.clock.advance(SUSPECT_AFTER - 1)
    fx.beat(a, state="draining")
    fx.beat(c)  # clears strikes
    fx.beat(d)
    fx.clock.advance(2)
    fx.registry.sweep()  # b missed its beats
    counts = fx.registry.counts()
    assert counts.model_dump() == {
        "total": 4,
        "active": 2,
        "suspect": 1,
        "draining": 1,
        "gpu": 1,
        "cpu": 2,
        "edge": 1,
    }


def test_ready_counts_and_summary(fx: Fixture) -> None:
    fx.register("a", services=["echo", "notes-coa"])
    b = fx.register("b", services=["echo"]).worker
    fx.register("c", services=["llm-inference"])  # CPU: offered, not assigned
    assert fx.registry.ready_counts() == {"echo": 2, "llm-inference": 0, "notes-coa": 1}
    summary = {s.name: s for s in fx.registry.services_summary()}
    assert [s.name for s in fx.registry.services_summary()] == fx.registry.service_names()
    assert (summary["echo"].ready_workers, summary["echo"].workers) == (2, 2)
    assert (summary["notes-coa"].ready_workers, summary["notes-coa"].workers) == (1, 1)
    assert summary["notes-coa"].aliases == ["notes", "coa"]
    assert (summary["llm-inference"].ready_workers, summary["llm-inference"].workers) == (0, 1)
    assert (summary["vision-ocr"].ready_workers, summary["vision-ocr"].workers) == (0, 0)
    fx.beat(b, state="draining")
    assert fx.registry.ready_counts()["echo"] == 1
    summary = {s.name: s for s in fx.registry.services_summary()}
    assert (summary["echo"].ready_workers, summary["echo"].workers) == (1, 2)


def test_views(fx: Fixture) -> None:
    reg = fx.register("w1", services=["echo", "notes-coa"])
    fx.clock.advance(4)
    views = fx.registry.views()
    assert len(views) == 1
    view = views[0]
    assert view.worker_id == "w1"
    assert view.state == "active"
    assert view.tunnel_url == URL
    assert sorted(view.assigned_services) == ["echo", "notes-coa"]
    assert view.last_heartbeat_age_s == 4.0
    assert view.agent_version == "test"
    dumped = view.model_dump_json()
    assert reg.worker_token not in dumped
    assert "gateway-key-0123456789" not in dumped
    assert fx.registry.views([reg.worker])[0].worker_id == "w1"


def test_views_of_no_records_is_empty(fx: Fixture) -> None:
    fx.register("w1")
    assert fx.registry.views([]) == []


# --------------------------------------------------------------------------------------------
# acquire / release


def test_acquire_release_keep_in_flight_consistent(fx: Fixture) -> None:
    offer = ServiceOffer(name="llm-inference", models=["llama3:latest"], max_concurrency=2)
    a = fx.gpu("a", services=[offer, ServiceOffer(name="vision-ocr", max_concurrency=5)]).worker
    b = fx.gpu("b", services=[offer]).worker
    reg = fx.registry
    slot_a, slot_b = a.slots["llm-inference"], b.slots["llm-inference"]
    assert len(slot_a.pools) == 2  # the service pool and "llama3" (alias "llama3:latest")

    reg.acquire(slot_a)
    reg.acquire(a.slots["vision-ocr"])
    assert (slot_a.in_flight, a.in_flight) == (1, 2)
    for model in (None, "llama3", "llama3:latest"):
        assert fx.picked("llm-inference", model) is b  # b is less loaded in every pool
    reg.acquire(slot_b)
    reg.acquire(slot_b)
    assert slot_b.full
    for model in (None, "llama3", "llama3:latest"):
        assert fx.picked("llm-inference", model) is a
    reg.acquire(slot_a)
    for model in (None, "llama3", "llama3:latest"):
        assert fx.picked("llm-inference", model) is None
        assert fx.size("llm-inference", model) == 2  # full slots stay members
    reg.release(slot_b)
    for model in (None, "llama3", "llama3:latest"):
        assert fx.picked("llm-inference", model) is b
    reg.release(slot_b)
    reg.release(slot_a)
    reg.release(slot_a)
    reg.release(a.slots["vision-ocr"])
    assert (a.in_flight, b.in_flight, slot_a.in_flight, slot_b.in_flight) == (0, 0, 0, 0)


def test_in_flight_survives_leaving_and_rejoining_routing(fx: Fixture) -> None:
    a = fx.register("a", services=[ServiceOffer(name="echo", max_concurrency=4)]).worker
    b = fx.register("b", services=[ServiceOffer(name="echo", max_concurrency=4)]).worker
    reg = fx.registry
    for _ in range(3):
        reg.acquire(a.slots["echo"])
    fx.beat(a, state="draining")
    reg.release(a.slots["echo"])  # released while out of routing
    reg.acquire(b.slots["echo"])
    fx.beat(a)  # back in at in_flight 2, b is at 1
    assert a.slots["echo"].in_flight == 2
    assert fx.picked("echo") is b
    reg.acquire(b.slots["echo"])
    reg.acquire(b.slots["echo"])
    assert fx.picked("echo") is a


def test_release_after_removal_is_harmless(fx: Fixture) -> None:
    record = fx.register("a").worker
    slot = record.slots["echo"]
    fx.registry.acquire(slot)
    fx.registry.remove("a", "unregistered")
    fx.registry.release(slot)
    assert (slot.in_flight, record.in_flight) == (0, 0)
    fresh = fx.register("b").worker
    assert fx.picked("echo") is fresh


def test_acquire_through_a_replacement(fx: Fixture) -> None:
    first = fx.register("w1")
    old_slot = first.worker.slots["echo"]
    fx.registry.acquire(old_slot)
    second = fx.register("w1", token=first.worker_token)
    new_slot = second.worker.slots["echo"]
    assert new_slot.in_flight == 0
    fx.registry.release(old_slot)  # the old request finishes
    assert new_slot.in_flight == 0
    assert fx.picked("echo") is second.worker


# --------------------------------------------------------------------------------------------
# A randomised model of the whole registry

CATALOG_SPECS = [
    ServiceSpec(name="g", requires_gpu=True, min_vram_mb=1_000, priority=5, target_replicas=1),
    ServiceSpec(name="a", priority=10, target_replicas=2, aliases=("aa",)),
    ServiceSpec(name="b", priority=20, target_replicas=1),
    ServiceSpec(name="c", priority=30, target_replicas=0),
]
OFFERABLE = ["g", "a", "aa", "b", "c", "u"]
MODELS = ["m1", "m1:latest", "m2"]
# Model lists a worker may send. None holds a model both with and without its ":latest" tag:
# test_a_model_listed_with_and_without_its_tag_is_one_membership covers that case on its own.
MODEL_LISTS = [[], ["m1"], ["m1:latest"], ["m2"], ["m1", "m2"], ["m2", "m1:latest"]]
CAP = 2


def _model_keys(models: Sequence[str]) -> set[str]:
    """Names a worker serves: `m1:latest` is also `m1`, and `m1` is also `m1:latest`."""
    keys = set(models)
    keys |= {m.removesuffix(":latest") for m in models if m.endswith(":latest")}
    keys |= {f"{m}:latest" for m in models if ":" not in m}
    return keys


class RegistryMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.fx = Fixture(
            Catalog(CATALOG_SPECS), max_services_per_worker=CAP, max_workers=12, strike_limit=2
        )
        self.tokens: dict[str, str] = {}
        self.held: list[Any] = []

    @property
    def reg(self) -> Registry:
        return self.fx.registry

    def _offers(self, draw: Any) -> list[ServiceOffer]:
        names, models, statuses, mcs = draw
        return [
            ServiceOffer(name=n, models=m, status=s, max_concurrency=c)
            for n, m, s, c in zip(names, models, statuses, mcs, strict=False)
        ]

    offers = st.tuples(
        st.lists(st.sampled_from(OFFERABLE), max_size=4, unique=True),
        st.lists(st.sampled_from(MODEL_LISTS), min_size=4, max_size=4),
        st.lists(
            st.sampled_from(["ready", "ready", "starting", "unhealthy"]), min_size=4, max_size=4
        ),
        st.lists(st.integers(1, 3), min_size=4, max_size=4),
    )
    ids = st.sampled_from([f"w{i}" for i in range(8)])

    @rule(
        worker_id=ids,
        offers=offers,
        worker_type=st.sampled_from(["gpu", "cpu", "edge"]),
        vram=st.sampled_from([(), (500,), (8_000,)]),
    )
    def register(self, worker_id: str, offers: Any, worker_type: str, vram: Any) -> None:
        token = self.tokens.get(worker_id) if self.reg.get(worker_id) else None
        try:
            result = self.fx.register(
                worker_id,
                services=self._offers(offers),
                worker_type=worker_type,
                vram_mb=vram,
                token=token,
            )
        except RegistryFull:
            assert len(self.reg) >= 12
            return
        self.tokens[worker_id] = result.worker_token

    @rule(worker_id=ids)
    def forged_re_register(self, worker_id: str) -> None:
        if self.reg.get(worker_id) is None:
            return
        with pytest.raises(Forbidden):
            self.fx.register(worker_id, token="forged-token-0123456789")

    @rule(
        worker_id=ids,
        state=st.sampled_from(["active", "active", "draining"]),
        health=st.lists(
            st.tuples(
                st.sampled_from(OFFERABLE),
                st.sampled_from(["ready", "starting", "unhealthy"]),
                st.none() | st.sampled_from(MODEL_LISTS),
            ),
            max_size=3,
        ),
    )
    def beat(self, worker_id: str, state: str, health: Any) -> None:
        record = self.reg.get(worker_id)
        if record is None:
            return
        self.fx.beat(
            record,
            state=state,
            services=[ServiceHealth(name=n, status=s, models=m) for n, s, m in health],
        )

    @rule(worker_id=ids)
    def strike(self, worker_id: str) -> None:
        record = self.reg.get(worker_id)
        if record is not None:
            self.reg.strike(record)

    @rule(worker_id=ids)
    def remove(self, worker_id: str) -> None:
        self.reg.remove(worker_id, "unregistered")

    @rule(seconds=st.sampled_from([1.0, 10.0, 20.0, 50.0]))
    def tick(self, seconds: float) -> None:
        self.fx.clock.advance(seconds)
        _suspected, removed = self.reg.sweep()
        for record in removed:
            assert self.reg.get(record.worker_id) is None

    @rule(
        service=st.sampled_from(["g", "a", "b", "c", "u"]), model=st.sampled_from([None, *MODELS])
    )
    def acquire(self, service: str, model: str | None) -> None:
        pool = self.reg.pool(service, model)
        if pool is None:
            return
        slot = pool.pick(self.reg.rng)
        if slot is None:
            return
        self.reg.acquire(slot)
        self.held.append(slot)

    @precondition(lambda self: bool(self.held))
    @rule(index=st.integers(0, 100))
    def release(self, index: int) -> None:
        slot = self.held.pop(index % len(self.held))
        self.reg.release(slot)

    # ------------------------------------------------------------------ invariants

    def _live(self) -> list[WorkerRecord]:
        return list(self.reg)

    def _routable(self, record: WorkerRecord, name: str) -> bool:
        return (
            record.health(self.reg.strike_limit) == "active"
            and name in record.assigned
            and record.offers[name].status == "ready"
        )

    @invariant()
    def pools_hold_exactly_the_routable_slots(self) -> None:
        for name in ["g", "a", "b", "c", "u"]:
            expected = [r.slots[name] for r in self._live() if name in r.offers]
            expected = [s for s in expected if self._routable(s.worker, name)]
            pool = self.reg.pool(name)
            assert (pool.size if pool else 0) == len(expected), name
            if pool is not None:
                eligible = [s for s in expected if not s.full]
                picked = pool.pick(random.Random(1))
                if eligible:
                    assert picked in eligible
                    assert picked.in_flight == min(s.in_flight for s in eligible)
                else:
                    assert picked is None
            for model in ["m1", "m1:latest", "m2"]:
                with_model = [
                    s for s in expected if model in _model_keys(s.worker.offers[name].models)
                ]
                mpool = self.reg.pool(name, model)
                if with_model:
                    assert mpool is not None
                    assert mpool.size == len(with_model), (name, model)
                elif mpool is not None and self.reg.models(name):
                    # A model pool that is found must hold the model.
                    raise AssertionError((name, model))

    @invariant()
    def slot_pools_are_consistent(self) -> None:
        for record in self._live():
            for name, slot in record.slots.items():
                if slot.pools:
                    assert self._routable(record, name)
                    assert isinstance(slot.pools[0], Pool)
                else:
                    assert not self._routable(record, name)

    @invariant()
    def assignment_rules(self) -> None:
        catalog = self.reg.catalog
        for record in self._live():
            assert set(record.assigned) <= set(record.offers)
            assert len(set(record.assigned)) == len(record.assigned)
            for name in record.assigned:
                spec = catalog.get(name)
                assert spec is not None
                assert spec.fits(record.worker_type, record.capabilities)
            assert set(record.offers) <= {"g", "a", "b", "c", "u"}  # canonical names only
        for spec in catalog:
            holders = [r for r in self._live() if spec.name in r.assigned]
            if len(holders) < spec.target_replicas:
                # Every fit worker that offers it holds it, or is at its cap.
                for record in self._live():
                    if spec.name in record.offers and spec.fits(
                        record.worker_type, record.capabilities
                    ):
                        assert spec.name in record.assigned or len(record.assigned) >= CAP, (
                            spec.name,
                            record.worker_id,
                        )

    @invariant()
    def in_flight_is_consistent(self) -> None:
        for record in self._live():
            assert record.in_flight == sum(s.in_flight for s in record.slots.values())
            for slot in record.slots.values():
                assert slot.in_flight == sum(1 for h in self.held if h is slot)

    @invariant()
    def summaries_agree(self) -> None:
        live = self._live()
        counts = self.reg.counts()
        assert counts.total == len(live) == len(self.reg)
        assert counts.active + counts.suspect + counts.draining == counts.total
        assert counts.gpu + counts.cpu + counts.edge == counts.total
        summary = {s.name: s for s in self.reg.services_summary()}
        for name in ["g", "a", "b", "c"]:
            assert summary[name].workers == sum(1 for r in live if name in r.offers)
        ready = self.reg.ready_counts()
        for name, value in ready.items():
            assert summary[name].ready_workers == value

    @invariant()
    def expiry_follows_the_clock(self) -> None:
        # Only tick() moves the clock, and it sweeps at once: states match the last beat exactly.
        now = self.fx.clock.now
        for record in self._live():
            age = now - record.last_beat
            assert age < REMOVE_AFTER
            assert record.missed is (age >= SUSPECT_AFTER)
            if record.missed:
                assert record.health(self.reg.strike_limit) == "suspect"


TestRegistryMachine = RegistryMachine.TestCase
TestRegistryMachine.settings = settings(
    max_examples=60,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
