"""Federation figures: hop latency through the real router, failover, agent footprint.

- ``hops``: sequential small GETs straight to a backend, through coordinator -> worker gateway
  (two hops) and through router (``wrangler dev``) -> coordinator -> gateway (three hops), request
  by request interleaved; added p50/p99 over direct. Time to the first streamed chunk the same way.
- ``failover``: the router, two edge coordinators (each with its own compute worker) and a few
  workers registered through the router. One coordinator is SIGKILLed; the time until the router
  no longer lists it healthy (while requests keep answering 200 from the survivor) and until all
  its workers have re-registered on the survivor, in heartbeat intervals.
- ``footprint``: one idle ``rma-worker run`` (fake quick tunnel) at the default interval: RSS and
  CPU per hour (bench/agent_footprint.py).

Everything runs on loopback as real processes (agents with ``USE_TUNNEL=false`` advertise their
loopback address, which the router accepts under ``DEV_ALLOW_LOOPBACK``). ``wrangler dev`` is
workerd on loopback, not the Cloudflare edge: the router figures are its own CPU and the extra
HTTP hop, without WAN or colo distance. Sections that need the router skip when
router_worker/node_modules is missing.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import statistics
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import agent_footprint, wrangler
from bench.httpclient import Client
from bench.procs import (
    CLIENT_CORE,
    SERVER_CORE,
    BenchError,
    Proc,
    Procs,
    free_port,
    pinned,
    python_argv,
)
from bench.report import Report, Row
from bench.scenarios import Options, log

ROUTER_DIR = wrangler.ROUTER_DIR
WRANGLER = wrangler.WRANGLER
RWORKER = Path(sys.executable).parent / "rma-worker"
NO_ROUTER = "router_worker/node_modules missing (`make router-deps`)"
WRANGLER_NOTE = (
    "Router figures run the real router under `wrangler dev` (workerd on loopback), not the "
    "Cloudflare edge: they include its CPU and one more HTTP hop, not WAN or colo distance."
)


def router_available() -> bool:
    return WRANGLER.exists()


# ------------------------------------------------------------------------------------ processes


def _get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def _wait(what: str, predicate: Any, timeout: float, proc: Proc | None = None) -> float:
    start = time.monotonic()
    while True:
        try:
            if predicate():
                return time.monotonic() - start
        except (OSError, ValueError, KeyError, urllib.error.URLError):
            pass
        if proc is not None and not proc.alive():
            raise BenchError(f"{proc.name} exited:\n{proc.log_tail()}")
        if time.monotonic() - start > timeout:
            tail = f"\n{proc.log_tail()}" if proc is not None else ""
            raise BenchError(f"{what}: not within {timeout:.0f} s{tail}")
        time.sleep(0.05)


@dataclass
class Router:
    proc: Proc
    port: int

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def coordinators(self) -> dict[str, dict[str, Any]]:
        data = _get_json(f"{self.url}/api/coordinators")
        return {c["coordinator_id"]: c for c in data["coordinators"]}


def start_router(procs: Procs, tmp: Path, **router_vars: str) -> Router:
    port = free_port()
    work = tmp / f"router-{port}"
    work.mkdir(parents=True, exist_ok=True)
    argv = wrangler.dev_command(port, work, {"DEV_ALLOW_LOOPBACK": "true", **router_vars})
    env = wrangler.dev_environment(work)
    proc = Proc(f"router-{port}", pinned(argv, SERVER_CORE), log_dir=tmp, env=env, cwd=ROUTER_DIR)
    procs._procs.append(proc)  # stopped with the others (Procs.start has no cwd)
    router = Router(proc, port)
    _wait(
        "wrangler dev /health",
        lambda: _get_json(f"{router.url}/health")["status"] == "ok",
        90,
        proc,
    )
    return router


def stop_router(procs: Procs, router: Router) -> None:
    """Stop wrangler, then its workerd children, which leave the group a moment later."""
    procs.stop(router.proc)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            os.killpg(router.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            return
        time.sleep(0.05)


def agent_env(state: Path, **extra: str) -> dict[str, str]:
    env = {
        "STATE_DIR": str(state),
        "USE_TUNNEL": "false",
        "AUTO_DETECT": "false",
        "DEV_ALLOW_LOOPBACK": "true",
        "CATALOG_ALLOW_UNLISTED": "true",
        "LOG_LEVEL": "warning",
        "LOG_FORMAT": "json",
        "PYTHONUNBUFFERED": "1",
    }
    env.update(extra)
    return env


def start_agent(procs: Procs, tmp: Path, name: str, core: int, **extra: str) -> Proc:
    env = agent_env(tmp / name, **extra)
    return procs.start(name, pinned([str(RWORKER), "run"], core), env=env)


# ------------------------------------------------------------------------------------------ hops


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _interleaved(
    targets: dict[str, tuple[int, str]], n: int, *, first_chunk: bool = False
) -> dict[str, list[float]]:
    """``n`` sequential keep-alive requests per target, one request each in turn (us)."""
    clients = {name: Client(port) for name, (port, _) in targets.items()}
    samples: dict[str, list[float]] = {name: [] for name in targets}
    try:
        for i in range(n + 30):  # the first 30 warm connections and pools
            for name, client in clients.items():
                path = targets[name][1]
                resp = client.request(path)
                if resp.status != 200:
                    raise BenchError(
                        f"{name}: GET {path} answered {resp.status}: {resp.body[:200]!r}"
                    )
                if first_chunk:
                    if resp.first_chunk_us is None or not resp.chunk_ns:
                        raise BenchError(f"{name}: the stream was not chunked")
                    value = resp.first_chunk_us
                else:
                    value = resp.total_us
                if i >= 30:
                    samples[name].append(value)
    finally:
        for client in clients.values():
            client.close()
    return samples


def hops(report: Report, procs: Procs, tmp: Path, opt: Options) -> None:
    metric = "added latency through the router (three hops), p50"
    if not router_available():
        report.skip(metric, NO_ROUTER)
        report.skip("added latency, coordinator -> gateway (two hops), p50", NO_ROUTER)
        return
    report.notes.append(WRANGLER_NOTE)
    backend_port = free_port()
    argv = python_argv("-m", "bench.peers", "backend", "--port", str(backend_port))
    procs.start("hops-backend", pinned(argv, CLIENT_CORE), port=backend_port)
    log("hops: starting the router (wrangler dev), a coordinator, its edge agent and a worker")
    router = start_router(
        procs,
        tmp,
        HEARTBEAT_INTERVAL_S="2",
        SNAPSHOT_TTL_MS="200",
        RATE_LIMIT_PER_MIN="0",
        UPSTREAM_TIMEOUT_MS="10000",
    )
    try:
        _hops(report, procs, tmp, opt, router, backend_port)
    finally:
        stop_router(procs, router)


def _hops(
    report: Report, procs: Procs, tmp: Path, opt: Options, router: Router, backend_port: int
) -> None:
    cport = free_port()
    cenv = agent_env(
        tmp / "hops-coordinator",
        COORDINATOR_HOST="127.0.0.1",
        COORDINATOR_PORT=str(cport),
        COORDINATOR_STATE_DIR=str(tmp / "hops-coordinator"),
        HEARTBEAT_INTERVAL="2",
    )
    argv = pinned(python_argv("-m", "coordinator"), SERVER_CORE)
    coordinator = procs.start("hops-coordinator", argv, env=cenv, port=cport)
    curl = f"http://127.0.0.1:{cport}"
    edge = start_agent(
        procs,
        tmp,
        "hops-edge",
        SERVER_CORE,
        WORKER_TYPE="edge",
        EDGE_WORKER="false",
        LOCAL_COORDINATOR_URL=curl,
        COORDINATOR_URL=router.url,
        REGISTER_BACKOFF_INITIAL="0.1",
        REGISTER_BACKOFF_MAX="1",
    )
    gport = free_port()
    worker = start_agent(
        procs,
        tmp,
        "hops-worker",
        SERVER_CORE,
        COORDINATOR_URL=curl,
        GATEWAY_PORT=str(gport),
        ECHO_SERVICE="false",
        SERVICES=f"bench=http://127.0.0.1:{backend_port}/service/echo",
        SERVICE_MAX_CONCURRENCY="64",
        BACKEND_CHECK_INTERVAL="1",
    )

    def ready() -> bool:
        services = _get_json(f"{router.url}/health")["services"]
        return bool(services.get("bench", 0) >= 1)

    try:
        _wait("the worker's service visible at the router", ready, 60, coordinator)
    except BenchError:
        for proc in (edge, worker, router.proc):
            log(f"{proc.name} log:\n{proc.log_tail(1500)}")
        raise
    n = min(opt.latency_requests, 1000)
    log(f"hops: {n} sequential GETs per path, interleaved")
    path = "/service/echo/hop"
    via = "/service/bench/hop"
    s = _interleaved(
        {"direct": (backend_port, path), "two": (cport, via), "three": (router.port, via)}, n
    )
    p50 = {k: statistics.median(v) for k, v in s.items()}
    p99 = {k: _percentile(v, 0.99) for k, v in s.items()}
    for key, label in (
        ("two", "coordinator -> gateway (two hops)"),
        ("three", "router (wrangler dev) -> coordinator -> gateway (three hops)"),
    ):
        report.add(
            Row(
                f"added latency, {label}, p50",
                p50[key] - p50["direct"],
                "us",
                peer="direct to the backend (p50)",
                peer_value=p50["direct"],
                ratio=p50[key] / p50["direct"],
                note=f"{n} sequential keep-alive GETs per path, interleaved; "
                f"path p50 {p50[key] / 1000:.2f} ms",
            )
        )
        report.add(
            Row(
                f"added latency, {label}, p99",
                p99[key] - p99["direct"],
                "us",
                peer="direct to the backend (p99)",
                peer_value=p99["direct"],
                ratio=p99[key] / p99["direct"],
                note=f"path p99 {p99[key] / 1000:.2f} ms",
            )
        )
    runs = min(opt.ttfb_runs, 200)
    log(f"hops: time to first streamed chunk, {runs} runs per path")
    sse = "/service/echo/sse?chunks=3&gap_ms=2"
    via_sse = "/service/bench/sse?chunks=3&gap_ms=2"
    f = _interleaved(
        {"direct": (backend_port, sse), "two": (cport, via_sse), "three": (router.port, via_sse)},
        runs,
        first_chunk=True,
    )
    first = {k: statistics.median(v) for k, v in f.items()}
    for key, label in (
        ("two", "coordinator + gateway"),
        ("three", "router + coordinator + gateway"),
    ):
        report.add(
            Row(
                f"time to first streamed chunk, added, {label} (p50)",
                first[key] - first["direct"],
                "us",
                peer="direct to the backend (p50)",
                peer_value=first["direct"],
                ratio=first[key] / first["direct"],
                note=f"text/event-stream, chunked; {runs} runs each, interleaved",
            )
        )


# -------------------------------------------------------------------------------------- failover

FAILOVER_INTERVAL = 1.0  # router -> coordinators and coordinators -> workers, seconds
FAILOVER_AFTER = 2  # missed beats before a worker re-registers
FAILOVER_WORKERS = 4


def failover(report: Report, procs: Procs, tmp: Path, opt: Options) -> None:
    a = "failover (a): router stops choosing a SIGKILLed coordinator"
    b = "failover (b): all its workers re-registered on the survivor"
    if not router_available():
        report.skip(a, NO_ROUTER)
        report.skip(b, NO_ROUTER)
        return
    log("failover: router, two edge coordinators, workers registered through the router")
    router = start_router(
        procs,
        tmp,
        HEARTBEAT_INTERVAL_S=str(FAILOVER_INTERVAL),
        EVICT_AFTER_S="60",
        SNAPSHOT_TTL_MS="200",
        RATE_LIMIT_PER_MIN="0",
        UPSTREAM_TIMEOUT_MS="3000",
    )
    try:
        _failover(report, procs, tmp, router, a, b)
    finally:
        stop_router(procs, router)


def _health(url: str) -> dict[str, Any]:
    return _get_json(f"{url}/health", timeout=2)  # type: ignore[no-any-return]


def _failover(report: Report, procs: Procs, tmp: Path, router: Router, a: str, b: str) -> None:
    common = {
        "HEARTBEAT_INTERVAL": str(FAILOVER_INTERVAL),
        "HEARTBEAT_MIN_INTERVAL": "0.05",
        "HTTP_TIMEOUT": "2",
        "REGISTER_BACKOFF_INITIAL": "0.05",
        "REGISTER_BACKOFF_MAX": "0.5",
        "FAILOVER_AFTER": str(FAILOVER_AFTER),
        "SWEEP_INTERVAL": "0.1",
        "DRAIN_TIMEOUT": "1",
    }
    edges: dict[str, Proc] = {}
    urls: dict[str, str] = {}
    for i in range(2):
        port = free_port()
        proc = start_agent(
            procs,
            tmp,
            f"failover-edge-{i}",
            SERVER_CORE,
            WORKER_TYPE="edge",
            EDGE_WORKER="true",
            COORDINATOR_URL=router.url,
            COORDINATOR_PORT=str(port),
            GATEWAY_PORT="0",
            **common,
        )
        url = f"http://127.0.0.1:{port}"
        cid = str(_wait_value(lambda u=url: _health(u)["coordinator_id"], 60, proc))
        edges[cid], urls[cid] = proc, url

    def both_serving() -> bool:
        known = router.coordinators()
        return len(known) == 2 and all(
            c["healthy"] and any(s["name"] == "echo" and s["ready_workers"] for s in c["services"])
            for c in known.values()
        )

    _wait("two edge coordinators serving echo at the router", both_serving, 60)
    for i in range(FAILOVER_WORKERS):
        start_agent(
            procs,
            tmp,
            f"failover-worker-{i}",
            CLIENT_CORE,
            COORDINATOR_URL=router.url,
            GATEWAY_PORT="0",
            **common,
        )

    def counts() -> dict[str, int]:
        return {cid: int(_health(u)["workers"]["total"]) for cid, u in urls.items()}

    # Each edge's own worker, plus every worker, registered somewhere.
    _wait("workers registered", lambda: sum(counts().values()) == 2 + FAILOVER_WORKERS, 60)
    time.sleep(2 * FAILOVER_INTERVAL)  # a few beats everywhere
    before = counts()
    victim = max(before, key=lambda cid: before[cid])
    survivor = next(cid for cid in before if cid != victim)
    moving = before[victim] - 1  # its own edge worker dies with it
    target = before[survivor] + moving
    log(f"failover: SIGKILL {victim} ({moving} workers on it), survivor {survivor}")
    with Client(router.port) as client:
        killed = time.monotonic()
        os.killpg(edges[victim].pid, signal.SIGKILL)
        statuses: dict[int, int] = {}
        served_by_victim = 0
        unhealthy_at: float | None = None
        moved_at: float | None = None
        last_poll = 0.0
        deadline = killed + 30 * FAILOVER_INTERVAL
        while time.monotonic() < deadline and (unhealthy_at is None or moved_at is None):
            try:
                resp = client.request("/service/echo/failover")
                statuses[resp.status] = statuses.get(resp.status, 0) + 1
                if resp.headers.get("x-rma-coordinator") == victim:
                    served_by_victim += 1
            except OSError as exc:
                raise BenchError(f"the router connection failed: {exc}") from exc
            now = time.monotonic()
            if now - last_poll >= 0.05:
                last_poll = now
                with contextlib.suppress(OSError, ValueError, KeyError):
                    known = router.coordinators()
                    if unhealthy_at is None and not known.get(victim, {}).get("healthy", False):
                        unhealthy_at = now - killed
                    survivor_total = int(_health(urls[survivor])["workers"]["total"])
                    if moved_at is None and survivor_total >= target:
                        moved_at = now - killed
            time.sleep(0.01)
    total = sum(statuses.values())
    errors = total - statuses.get(200, 0)
    shown = ", ".join(f"{k}: {v}" for k, v in sorted(statuses.items()))
    report.notes.append(
        f"Failover: router HEARTBEAT_INTERVAL_S={FAILOVER_INTERVAL:g} (coordinator TTL = 3 "
        f"intervals, the default ratio), worker interval {FAILOVER_INTERVAL:g} s, FAILOVER_AFTER="
        f"{FAILOVER_AFTER}; {moving} workers on the victim. Requests through the router during "
        f"the window: {total} ({shown}); {served_by_victim} answered by the victim."
    )
    if unhealthy_at is None:
        report.error(a, "the router still lists the killed coordinator healthy after 30 intervals")
    else:
        report.add(
            Row(
                a,
                unhealthy_at / FAILOVER_INTERVAL,
                "intervals",
                valid=errors == 0,
                note=f"{unhealthy_at:.2f} s until /api/coordinators shows it unhealthy; "
                f"{errors} of {total} requests failed meanwhile, answered by the survivor",
            )
        )
    if moved_at is None:
        report.error(b, f"the survivor did not reach {target} workers within 30 intervals")
    else:
        report.add(
            Row(
                b,
                moved_at / FAILOVER_INTERVAL,
                "intervals",
                note=f"{moved_at:.2f} s for {moving} workers (FAILOVER_AFTER={FAILOVER_AFTER} "
                "missed beats, then registration through the router)",
            )
        )


def _wait_value(get: Any, timeout: float, proc: Proc) -> Any:
    box: list[Any] = []

    def ok() -> bool:
        box.append(get())
        return True

    _wait("value", ok, timeout, proc)
    return box[-1]


# ------------------------------------------------------------------------------------- footprint


def footprint(report: Report, opt: Options, quick: bool = False) -> None:
    window = 20.0 if quick else 45.0
    log(f"footprint: one idle agent at the default 15 s interval, {window:.0f} s window")
    result = asyncio.run(agent_footprint.footprint(window=window))
    idle = result["idle"]
    per_hour = idle["cpu_s"] / idle["window_s"] * 3600
    report.add(
        Row(
            "agent RSS, idle (rma-worker run, fake quick tunnel)",
            idle["rss_mib"],
            "MiB",
            note="the agent process only (the tunnel is a separate process)",
        )
    )
    report.add(
        Row(
            "agent CPU per hour of idle heartbeating (default 15 s interval)",
            per_hour,
            "s",
            note=f"{idle['cpu_s']:.3f} s CPU over {idle['window_s']:.0f} s ({idle['beats']:.0f} "
            "beats, backend probes, tunnel checks), scaled to an hour",
        )
    )
    report.add(
        Row(
            "agent CPU per heartbeat",
            result["per_beat_s"] * 1000,
            "ms",
            note=f"{result['fast_beats']:.0f} beats at 0.05 s minus a no-beat baseline",
        )
    )
