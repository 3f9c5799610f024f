"""In-process registry figures, each in a fresh interpreter (``python -m bench.registry_bench``).

- ``scale N``: RSS per worker with N workers registered from JSON the way the HTTP handler does
  it (parse, validate the tunnel URL, register), then the cost of a scheduling decision
  (``Pool.pick`` + ``acquire``, plus the ``release`` of an earlier request) and of an expiry
  sweep in which nothing expires.
- ``rate LEVEL``: ``Registry.register`` calls per second with LEVEL workers already registered,
  with the request objects built beforehand so that only ``register()`` is timed.

Each prints one JSON object on its last stdout line.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import statistics
import time
from collections import deque

import psutil

from bench.payloads import register_json, register_request
from coordinator.catalog import Catalog
from coordinator.protocol import WorkerRegisterRequest
from coordinator.registry import Registry
from coordinator.urls import validate_tunnel_url

TUNNEL_URL = "http://127.0.0.1:9"
#: Same timings as the HTTP figures (HEARTBEAT_INTERVAL=3600): nothing expires during a run.
SUSPECT_AFTER_S = 3 * 3600.0
REMOVE_AFTER_S = 100_000.0
#: Requests kept in flight while timing decisions (just under the default MAX_INFLIGHT).
OUTSTANDING = 150


def new_registry() -> Registry:
    return Registry(
        Catalog.load(None),
        suspect_after_s=SUSPECT_AFTER_S,
        remove_after_s=REMOVE_AFTER_S,
        max_workers=1_000_000,
    )


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(pct / 100.0 * (len(ordered) - 1))))
    return ordered[k]


def rss() -> int:
    return int(psutil.Process().memory_info().rss)


def scale(n: int, decisions: int, sweeps: int) -> dict[str, float]:
    template = register_json(0, TUNNEL_URL)
    marker = b"volunteer-host-000000"
    assert template.count(marker) == 1
    registry = new_registry()
    counter = itertools.count()

    def new_id() -> str:
        return f"w-{next(counter):012x}"

    allowed = [".trycloudflare.com"]
    gc.collect()
    before = rss()
    started = time.perf_counter()
    for i in range(n):
        body = template.replace(marker, b"volunteer-host-%06d" % i)
        req = WorkerRegisterRequest.model_validate_json(body)
        url = validate_tunnel_url(req.tunnel_url, allowed, allow_loopback=True)
        registry.register(req, url, new_id=new_id)
    build_s = time.perf_counter() - started
    del req, body
    gc.collect()
    after = rss()
    assert len(registry) == n

    # Sweep with nothing expiring.
    suspected, removed = registry.sweep()
    if suspected or removed:
        raise RuntimeError("workers expired during the bench")
    sweep_ns: list[int] = []
    for _ in range(sweeps):
        t0 = time.perf_counter_ns()
        registry.sweep()
        sweep_ns.append(time.perf_counter_ns() - t0)

    # Scheduling decisions with OUTSTANDING requests in flight.
    pool = registry.pool("echo")
    assert pool is not None
    assert pool.size == n
    rng = registry.rng
    ring: deque[object] = deque()
    pick = pool.pick
    acquire = registry.acquire
    release = registry.release
    perf = time.perf_counter_ns
    decision_ns: list[int] = []
    for _ in range(decisions):
        t0 = perf()
        slot = pick(rng)
        assert slot is not None
        acquire(slot)
        if len(ring) >= OUTSTANDING:
            release(ring.popleft())  # type: ignore[arg-type]
        t1 = perf()
        ring.append(slot)
        decision_ns.append(t1 - t0)
    while ring:
        release(ring.popleft())  # type: ignore[arg-type]
    overhead = min(_timer_overhead_ns() for _ in range(3))
    decision_us = [max(0, d - overhead) / 1000.0 for d in decision_ns]
    sweep_us = [max(0, d - overhead) / 1000.0 for d in sweep_ns]
    return {
        "workers": n,
        "build_s": build_s,
        "register_json_per_s": n / build_s,
        "rss_before": before,
        "rss_after": after,
        "rss_per_worker": (after - before) / n,
        "decision_p50_us": percentile(decision_us, 50),
        "decision_p99_us": percentile(decision_us, 99),
        "decision_max_us": max(decision_us),
        "decisions": decisions,
        "sweep_p50_us": percentile(sweep_us, 50),
        "sweep_p99_us": percentile(sweep_us, 99),
        "sweep_max_us": max(sweep_us),
        "sweeps": sweeps,
    }


def _timer_overhead_ns() -> int:
    perf = time.perf_counter_ns
    samples = []
    for _ in range(10_000):
        t0 = perf()
        samples.append(perf() - t0)
    return sorted(samples)[len(samples) // 2]


def rate(level: int, batch: int, rounds: int) -> dict[str, float]:
    registry = new_registry()
    counter = itertools.count()

    def new_id() -> str:
        return f"w-{next(counter):012x}"

    for i in range(level):
        registry.register(register_request(i, TUNNEL_URL), TUNNEL_URL, new_id=new_id)
    reqs = [register_request(level + i, TUNNEL_URL) for i in range(batch)]
    gc.collect()
    rates: list[float] = []
    for _ in range(rounds):
        ids: list[str] = []
        t0 = time.perf_counter()
        for req in reqs:
            ids.append(registry.register(req, TUNNEL_URL, new_id=new_id).worker.worker_id)
        elapsed = time.perf_counter() - t0
        rates.append(batch / elapsed)
        for wid in ids:
            registry.remove(wid, "bench")
        assert len(registry) == level
    return {
        "level": level,
        "batch": batch,
        "rounds": rounds,
        "rate_median": statistics.median(rates),
        "rate_best": max(rates),
        "rates": rates,  # type: ignore[dict-item]
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.registry_bench")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p_scale = sub.add_parser("scale")
    p_scale.add_argument("workers", type=int)
    p_scale.add_argument("--decisions", type=int, default=100_000)
    p_scale.add_argument("--sweeps", type=int, default=2_000)
    p_rate = sub.add_parser("rate")
    p_rate.add_argument("level", type=int)
    p_rate.add_argument("--batch", type=int, default=2_000)
    p_rate.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args(argv)
    if args.cmd == "scale":
        out = scale(args.workers, args.decisions, args.sweeps)
    else:
        out = rate(args.level, args.batch, args.rounds)
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
