"""Least-outstanding scheduling: IndexedSet, Slot and Pool."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from coordinator.catalog import Catalog
from coordinator.protocol import MAX_CONCURRENCY_CAP, ServiceOffer, WorkerRegisterRequest
from coordinator.registry import Registry
from coordinator.scheduler import IndexedSet, Pool, Slot

PROPS = settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])


class FakeWorker:
    """The two things a slot reads from its worker."""

    def __init__(self, worker_id: str, load: float = 0.0) -> None:
        self.worker_id = worker_id
        self.load = load

    def reported_load(self) -> float:
        return self.load


class ScriptedRandom(random.Random):
    """``random()`` answers from a script (then repeats the last value)."""

    def __init__(self, values: Sequence[float]) -> None:
        super().__init__(0)
        self.values = list(values)
        self.calls = 0

    def random(self) -> float:
        value = self.values[min(self.calls, len(self.values) - 1)]
        self.calls += 1
        return value


def make_slot(worker_id: str, max_concurrency: int = 4, load: float = 0.0) -> Slot:
    return Slot(FakeWorker(worker_id, load), "svc", max_concurrency)  # type: ignore[arg-type]


def set_in_flight(pool: Pool, slot: Slot, value: int) -> None:
    """What Registry.acquire/release do, one step at a time."""
    while slot.in_flight != value:
        old = slot.in_flight
        slot.in_flight += 1 if value > old else -1
        pool.move(slot, old)


# --------------------------------------------------------------------------------------------
# IndexedSet


def test_indexed_set_basics() -> None:
    s: IndexedSet[str] = IndexedSet()
    assert len(s) == 0
    assert not s
    assert "a" not in s
    s.add("a")
    s.add("b")
    s.add("a")  # idempotent
    assert len(s) == 2
    assert "a" in s
    assert sorted(s) == ["a", "b"]
    s.discard("a")
    s.discard("a")  # idempotent
    s.discard("zzz")  # absent: no error
    assert list(s) == ["b"]
    assert s.choice(random.Random(1)) == "b"
    s.discard("b")
    assert len(s) == 0
    with pytest.raises(IndexError):
        s.choice(random.Random(1))


def test_indexed_set_iteration_is_a_snapshot() -> None:
    s: IndexedSet[int] = IndexedSet()
    for i in range(5):
        s.add(i)
    for item in s:
        s.discard(item)  # mutating while iterating is safe
    assert len(s) == 0


def test_indexed_set_choice_is_uniform() -> None:
    s: IndexedSet[int] = IndexedSet()
    for i in range(4):
        s.add(i)
    s.discard(1)
    rng = random.Random(7)
    seen = Counter(s.choice(rng) for _ in range(6000))
    assert set(seen) == {0, 2, 3}
    for count in seen.values():
        assert 1700 < count < 2300


@PROPS
@given(st.lists(st.tuples(st.booleans(), st.integers(0, 15)), max_size=200), st.randoms())
def test_indexed_set_matches_a_python_set(ops: list[tuple[bool, int]], rng: random.Random) -> None:
    s: IndexedSet[int] = IndexedSet()
    model: set[int] = set()
    for add, item in ops:
        if add:
            s.add(item)
            model.add(item)
        else:
            s.discard(item)
            model.discard(item)
        assert len(s) == len(model)
        assert set(s) == model
        assert len(list(s)) == len(model)  # no duplicates
        for probe in range(16):
            assert (probe in s) is (probe in model)
        if model:
            assert s.choice(rng) in model


class IndexedSetMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.s: IndexedSet[str] = IndexedSet()
        self.model: set[str] = set()

    items = st.sampled_from([f"item-{i}" for i in range(12)])

    @rule(item=items)
    def add(self, item: str) -> None:
        self.s.add(item)
        self.model.add(item)

    @rule(item=items)
    def discard(self, item: str) -> None:
        self.s.discard(item)
        self.model.discard(item)

    @precondition(lambda self: bool(self.model))
    @rule(r=st.floats(0, 1, exclude_max=True))
    def choice(self, r: float) -> None:
        assert self.s.choice(ScriptedRandom([r])) in self.model

    @invariant()
    def same_members(self) -> None:
        assert len(self.s) == len(self.model)
        assert sorted(self.s) == sorted(self.model)
        assert all(item in self.s for item in self.model)

    @invariant()
    def every_member_is_reachable_by_choice(self) -> None:
        n = len(self.s)
        picked = {self.s.choice(ScriptedRandom([(i + 0.5) / n])) for i in range(n)}
        assert picked == self.model


TestIndexedSetMachine = IndexedSetMachine.TestCase
TestIndexedSetMachine.settings = settings(max_examples=40, stateful_step_count=40, deadline=None)


# --------------------------------------------------------------------------------------------
# Slot


def test_slot_caps_max_concurrency_and_scores_headroom() -> None:
    slot = make_slot("w", max_concurrency=10_000)
    assert slot.max_concurrency == MAX_CONCURRENCY_CAP
    assert not slot.full
    slot.in_flight = MAX_CONCURRENCY_CAP
    assert slot.full
    roomy = make_slot("a", max_concurrency=10, load=5.0)
    tight = make_slot("b", max_concurrency=2, load=0.0)
    assert roomy.score() < tight.score()  # headroom first
    calm = make_slot("c", max_concurrency=10, load=0.5)
    assert calm.score() < roomy.score()  # then reported load


# --------------------------------------------------------------------------------------------
# Pool


def test_empty_pool() -> None:
    pool = Pool()
    assert pool.size == 0
    assert not pool.available
    assert pool.pick(random.Random(0)) is None
    assert pool.pick(random.Random(0), frozenset({"x"})) is None


def test_single_slot() -> None:
    pool = Pool()
    slot = make_slot("a", max_concurrency=2)
    pool.add(slot)
    assert pool.size == 1
    assert pool.available
    assert pool.pick(random.Random(0)) is slot
    assert pool.pick(random.Random(0), frozenset({"a"})) is None
    assert pool.pick(random.Random(0), frozenset({"b"})) is slot
    pool.remove(slot)
    assert pool.size == 0
    assert pool.pick(random.Random(0)) is None


def test_picks_the_least_outstanding_slot() -> None:
    pool = Pool()
    slots = [make_slot(f"w{i}", max_concurrency=8) for i in range(5)]
    for slot in slots:
        pool.add(slot)
    for slot, load in zip(slots, [3, 1, 4, 2, 5], strict=True):
        set_in_flight(pool, slot, load)
    rng = random.Random(0)
    for _ in range(50):
        assert pool.pick(rng) is slots[1]
    set_in_flight(pool, slots[1], 6)
    for _ in range(50):
        assert pool.pick(rng) is slots[3]
    set_in_flight(pool, slots[4], 0)
    assert pool.pick(rng) is slots[4]


def test_least_outstanding_beats_headroom() -> None:
    """The bucket decides first: fewer in flight wins even with much less spare capacity."""
    pool = Pool()
    big = make_slot("big", max_concurrency=200)
    small = make_slot("small", max_concurrency=1)
    pool.add(big)
    pool.add(small)
    set_in_flight(pool, big, 1)
    for seed in range(20):
        assert pool.pick(random.Random(seed)) is small


def test_never_picks_a_full_slot() -> None:
    pool = Pool()
    full = make_slot("full", max_concurrency=1)
    busy = make_slot("busy", max_concurrency=10)
    pool.add(full)
    pool.add(busy)
    set_in_flight(pool, busy, 5)
    set_in_flight(pool, full, 1)  # full at 1 < 5, but full
    assert full.full
    assert pool.size == 2  # full slots stay members
    for seed in range(50):
        assert pool.pick(random.Random(seed)) is busy
    set_in_flight(pool, busy, 10)
    assert pool.pick(random.Random(0)) is None
    assert not pool.available
    set_in_flight(pool, full, 0)
    assert pool.pick(random.Random(0)) is full


def test_a_full_slot_added_later_is_not_picked() -> None:
    pool = Pool()
    slot = make_slot("a", max_concurrency=1)
    slot.in_flight = 1
    pool.add(slot)
    assert pool.size == 1
    assert pool.pick(random.Random(0)) is None
    pool.remove(slot)
    assert pool.size == 0
    assert not pool.available


def test_remove_a_full_slot_leaves_equal_load_neighbours() -> None:
    pool = Pool()
    full = make_slot("full", max_concurrency=2)
    other = make_slot("other", max_concurrency=5)
    pool.add(full)
    pool.add(other)
    set_in_flight(pool, full, 2)
    set_in_flight(pool, other, 2)  # same in-flight count as the full slot
    pool.remove(full)
    assert pool.pick(random.Random(0)) is other


def test_exclusion() -> None:
    pool = Pool()
    a, b, c = (make_slot(w, max_concurrency=4) for w in "abc")
    for slot in (a, b, c):
        pool.add(slot)
    set_in_flight(pool, c, 2)
    for seed in range(30):
        picked = pool.pick(random.Random(seed), frozenset({"a"}))
        assert picked is b
        assert pool.pick(random.Random(seed), frozenset({"a", "b"})) is c
        assert pool.pick(random.Random(seed), frozenset({"a", "b", "c"})) is None
    # Exclusion of an unrelated id changes nothing.
    assert pool.pick(random.Random(0), frozenset({"zzz"})) in (a, b)


def test_exclusion_with_a_large_bucket() -> None:
    """Both random candidates excluded: the bucket is scanned for one that is not."""
    pool = Pool()
    slots = [make_slot(f"w{i}") for i in range(10)]
    for slot in slots:
        pool.add(slot)
    exclude = frozenset(f"w{i}" for i in range(9))
    for seed in range(30):
        assert pool.pick(random.Random(seed), exclude) is slots[9]
    # Scripted: both draws land on excluded slots.
    assert pool.pick(ScriptedRandom([0.0, 0.15, 0.5]), exclude) is slots[9]


def test_exclusion_does_not_break_the_minimum() -> None:
    pool = Pool()
    low = make_slot("low")
    high = make_slot("high")
    pool.add(low)
    pool.add(high)
    set_in_flight(pool, high, 3)
    assert pool.pick(random.Random(0), frozenset({"low"})) is high
    assert pool.pick(random.Random(0)) is low  # the excluded pick did not move the minimum


def test_returns_none_when_all_full_or_excluded() -> None:
    pool = Pool()
    a = make_slot("a", max_concurrency=1)
    b = make_slot("b", max_concurrency=3)
    pool.add(a)
    pool.add(b)
    set_in_flight(pool, a, 1)
    assert pool.pick(random.Random(0), frozenset({"b"})) is None
    set_in_flight(pool, b, 3)
    assert pool.pick(random.Random(0)) is None


def test_minimum_tracks_slots_coming_back() -> None:
    pool = Pool()
    a = make_slot("a", max_concurrency=10)
    pool.add(a)
    set_in_flight(pool, a, 5)
    assert pool.pick(random.Random(0)) is a
    b = make_slot("b", max_concurrency=10)
    pool.add(b)  # joins at 0, below the last minimum
    assert pool.pick(random.Random(0)) is b
    set_in_flight(pool, b, 7)
    assert pool.pick(random.Random(0)) is a
    set_in_flight(pool, a, 0)
    assert pool.pick(random.Random(0)) is a


def test_slots_at_the_concurrency_cap() -> None:
    pool = Pool()
    slot = make_slot("a", max_concurrency=MAX_CONCURRENCY_CAP)
    pool.add(slot)
    set_in_flight(pool, slot, MAX_CONCURRENCY_CAP - 1)
    assert pool.pick(random.Random(0)) is slot
    set_in_flight(pool, slot, MAX_CONCURRENCY_CAP)
    assert pool.pick(random.Random(0)) is None


# --------------------------------------------------------------------------------------------
# Power-of-two tie-breaking


@pytest.mark.parametrize("draws", [[0.0, 0.9], [0.9, 0.0]], ids=["tight-first", "roomy-first"])
def test_tie_break_prefers_more_headroom(draws: list[float]) -> None:
    pool = Pool()
    tight = make_slot("tight", max_concurrency=2)
    roomy = make_slot("roomy", max_concurrency=10)
    pool.add(tight)
    pool.add(roomy)
    assert pool.pick(ScriptedRandom(draws)) is roomy


@pytest.mark.parametrize("draws", [[0.0, 0.9], [0.9, 0.0]], ids=["busy-first", "calm-first"])
def test_tie_break_then_prefers_less_reported_load(draws: list[float]) -> None:
    pool = Pool()
    busy = make_slot("busy", max_concurrency=4, load=3.5)
    calm = make_slot("calm", max_concurrency=4, load=0.2)
    pool.add(busy)
    pool.add(calm)
    assert pool.pick(ScriptedRandom(draws)) is calm


def test_tie_break_skips_an_excluded_candidate() -> None:
    pool = Pool()
    roomy = make_slot("roomy", max_concurrency=10)
    tight = make_slot("tight", max_concurrency=2)
    pool.add(tight)
    pool.add(roomy)
    assert pool.pick(ScriptedRandom([0.0, 0.9]), frozenset({"roomy"})) is tight


def test_tie_break_statistics() -> None:
    """Two candidates drawn with replacement: the roomier slot wins 3 times out of 4."""
    pool = Pool()
    tight = make_slot("tight", max_concurrency=2)
    roomy = make_slot("roomy", max_concurrency=10)
    pool.add(tight)
    pool.add(roomy)
    rng = random.Random(1234)
    wins = sum(pool.pick(rng) is roomy for _ in range(4000))
    assert 0.70 < wins / 4000 < 0.80


def test_tie_break_spreads_over_equals() -> None:
    pool = Pool()
    slots = [make_slot(f"w{i}", max_concurrency=4) for i in range(4)]
    for slot in slots:
        pool.add(slot)
    rng = random.Random(99)
    seen = Counter(pool.pick(rng).worker.worker_id for _ in range(4000))  # type: ignore[union-attr]
    assert set(seen) == {"w0", "w1", "w2", "w3"}
    assert min(seen.values()) > 600


# --------------------------------------------------------------------------------------------
# Randomised comparison against a brute-force oracle


@st.composite
def pool_scenarios(draw: st.DrawFn) -> tuple[list[int], list[tuple[str, int, int]]]:
    caps = draw(st.lists(st.integers(1, 6), min_size=1, max_size=8))
    n = len(caps)
    ops = draw(
        st.lists(
            st.tuples(
                st.sampled_from(["inc", "dec", "toggle", "pick"]),
                st.integers(0, n - 1),
                st.integers(0, (1 << n) - 1),
            ),
            max_size=80,
        )
    )
    return caps, ops


@PROPS
@given(pool_scenarios(), st.randoms(use_true_random=False))
def test_pick_matches_a_brute_force_oracle(
    scenario: tuple[list[int], list[tuple[str, int, int]]], rng: random.Random
) -> None:
    caps, ops = scenario
    slots = [make_slot(f"w{i}", max_concurrency=c, load=i / 10) for i, c in enumerate(caps)]
    pool = Pool()
    member = [True] * len(slots)
    for slot in slots:
        pool.add(slot)
    for op, i, mask in ops:
        slot = slots[i]
        if op == "inc" and slot.in_flight < slot.max_concurrency + 1:
            old = slot.in_flight
            slot.in_flight += 1
            if member[i]:
                pool.move(slot, old)
        elif op == "dec" and slot.in_flight > 0:
            old = slot.in_flight
            slot.in_flight -= 1
            if member[i]:
                pool.move(slot, old)
        elif op == "toggle":
            if member[i]:
                pool.remove(slot)
            else:
                pool.add(slot)
            member[i] = not member[i]
        exclude = frozenset(f"w{j}" for j in range(len(slots)) if mask >> j & 1)
        eligible = [
            s
            for j, s in enumerate(slots)
            if member[j] and not s.full and s.worker.worker_id not in exclude
        ]
        picked = pool.pick(rng, exclude)
        assert pool.size == sum(member)
        if not eligible:
            assert picked is None
            continue
        assert picked is not None
        assert picked in eligible
        assert picked.in_flight == min(s.in_flight for s in eligible)
        unexcluded = [s for j, s in enumerate(slots) if member[j] and not s.full]
        assert pool.available is bool(unexcluded)


# --------------------------------------------------------------------------------------------
# Through the registry: real WorkerRecords and slots


def test_pool_with_real_worker_records() -> None:
    registry = Registry(
        Catalog.load(None), suspect_after_s=15, remove_after_s=60, rng=random.Random(5)
    )
    slots = []
    for i, mc in enumerate([1, 3, 3]):
        req = WorkerRegisterRequest(
            worker_id=f"w{i}",
            worker_type="cpu",
            tunnel_url="http://127.0.0.1:9",
            services=[ServiceOffer(name="echo", max_concurrency=mc)],
        )
        reg = registry.register(req, req.tunnel_url, new_id=lambda: "unused")
        slots.append(reg.worker.slots["echo"])
    pool = registry.pool("echo")
    assert pool is not None
    assert pool.size == 3
    held: list[Any] = []
    for _ in range(7):
        slot = pool.pick(registry.rng)
        assert slot is not None
        loads = [s.in_flight for s in slots if not s.full]
        assert slot.in_flight == min(loads)
        registry.acquire(slot)
        held.append(slot)
    assert [s.in_flight for s in slots] == [1, 3, 3]
    assert pool.pick(registry.rng) is None
    registry.release(slots[1])
    assert pool.pick(registry.rng) is slots[1]
    assert slots[1].worker.in_flight == 2
