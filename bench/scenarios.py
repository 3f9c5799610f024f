"""The measurements. Each adds rows to the report; servers are stopped by the caller's ``Procs``."""

from __future__ import annotations

import itertools
import json
import statistics
import subprocess
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench import coord, nginx, wrk
from bench.httpclient import Client, HttpError
from bench.payloads import heartbeat_json, heartbeat_template
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
from bench.report import Report, Row, Target

APT_HINT = "apt-get install -y wrk nginx-light"


@dataclass
class Options:
    duration: float = 6.0
    warmup: float = 2.0
    hb_workers: int = 10_000
    hb_connections: int = 50
    proxy_connections: int = 32
    registry_workers: int = 100_000
    rate_low: int = 1_000
    decisions: int = 100_000
    latency_requests: int = 2_000
    ttfb_runs: int = 200
    rounds: int = 2


def log(msg: str) -> None:
    print(f"[bench] {msg}", flush=True)


# ------------------------------------------------------------------------------------- registry


def _run_json(argv: list[str], timeout: float) -> dict[str, Any]:
    done = subprocess.run(
        pinned(argv, SERVER_CORE), capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise BenchError(f"{' '.join(argv)} failed:\n{done.stdout}\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def registry(report: Report, opt: Options) -> None:
    n = opt.registry_workers
    log(f"registry: {n:,} workers in a fresh interpreter (RSS, decisions, sweeps)")
    argv = ["-m", "bench.registry_bench", "scale", str(n), "--decisions", str(opt.decisions)]
    s = _run_json(python_argv(*argv), timeout=300)
    report.add(
        Row(
            f"registry RSS per worker at {n:,} workers",
            s["rss_per_worker"],
            "B",
            target=Target("value", "<=", 2048, "<= 2 KiB"),
            note="(RSS after - before) / N, registered from JSON",
        )
    )
    report.add(
        Row(
            f"scheduling decision p99 at {n:,} workers",
            s["decision_p99_us"],
            "us",
            target=Target("value", "<=", 50, "<= 50 us"),
            note=f"pick + acquire + release, {s['decisions']:,} decisions, "
            f"p50 {s['decision_p50_us']:.1f} us, max {s['decision_max_us']:.0f} us",
        )
    )
    report.add(
        Row(
            f"expiry sweep, nothing expiring, at {n:,} workers (p99)",
            s["sweep_p99_us"],
            "us",
            target=Target("value", "<=", 1000, "<= 1 ms"),
            note=f"{s['sweeps']:,} sweeps, max {s['sweep_max_us']:.1f} us",
        )
    )
    log(f"registry: register() rate at {opt.rate_low:,} and at {n:,} workers")
    lows: list[dict[str, Any]] = []
    highs: list[dict[str, Any]] = []
    for _ in range(opt.rounds):  # alternate fresh interpreters; the best median of each counts
        lows.append(
            _run_json(python_argv("-m", "bench.registry_bench", "rate", str(opt.rate_low)), 300)
        )
        highs.append(_run_json(python_argv("-m", "bench.registry_bench", "rate", str(n)), 300))
    low = max(lows, key=lambda r: float(r["rate_median"]))
    high = max(highs, key=lambda r: float(r["rate_median"]))
    report.add(
        Row(
            f"Registry.register() rate at {n:,} vs at {opt.rate_low:,} registered",
            high["rate_median"],
            "reg/s",
            peer=f"at {opt.rate_low:,}",
            peer_value=low["rate_median"],
            ratio=high["rate_median"] / low["rate_median"],
            target=Target("ratio", ">=", 0.9, ">= 0.9"),
            note=f"in-process, median of {high['rounds']} batches of {high['batch']:,}, "
            f"best of {len(highs)} fresh interpreters each",
        )
    )
    report.add(
        Row(
            f"registration incl. JSON parse + URL check, building {n:,}",
            s["register_json_per_s"],
            "reg/s",
            note="in-process, average over the whole build",
        )
    )


# ------------------------------------------------------------------------------------ heartbeat


def _post(url: str, body: bytes, token: str) -> tuple[int, bytes]:
    req = urllib.request.Request(
        url,
        data=body,
        headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
        method="POST",
    )
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


def _wrk_row_check(result: wrk.WrkResult, what: str, report: Report) -> bool:
    if not result.clean:
        report.notes.append(
            f"{what}: wrk saw {result.non_2xx} non-2xx answers and "
            f"{result.socket_errors} socket errors; the figure is marked invalid."
        )
    return result.clean


def _cpu(result: wrk.WrkResult) -> str:
    return f"{result.server_cpu * 100:.0f}%" if result.server_cpu is not None else "?"


def heartbeat(report: Report, procs: Procs, tmp: Path, opt: Options) -> None:
    metric = f"heartbeat ingestion, {opt.hb_workers:,} registered workers"
    target = Target("ratio", ">=", 0.75, ">= 0.75")
    if not wrk.available():
        log(f"wrk is not installed: `{APT_HINT}`; skipping the heartbeat comparison")
        report.skip(metric, f"wrk missing (`{APT_HINT}`)", target)
        return
    log("heartbeat: starting the coordinator (uvloop) pinned to the server core")
    c = coord.start(procs, tmp, SERVER_CORE, name="coordinator-heartbeat")
    log(f"heartbeat: registering {opt.hb_workers:,} workers over HTTP")
    reg = coord.register_many(c, opt.hb_workers, "http://127.0.0.1:9", concurrency=32)
    report.add(
        Row(
            f"registration over HTTP, 0 -> {opt.hb_workers:,} workers",
            reg.rate,
            "reg/s",
            note="POST /api/worker/register, 32 concurrent clients on the other core",
        )
    )
    wid, token = reg.credentials[0]
    status, body = _post(f"{c.url}/api/worker/heartbeat", heartbeat_json(wid), token)
    if status != 200:
        raise BenchError(f"a heartbeat answered {status}: {body[:300]!r}")
    prefix, suffix = heartbeat_template()
    script = wrk.heartbeat_script(tmp / "heartbeat.lua", reg.credentials, prefix, suffix)
    loads = {"coordinator": wrk.Load(f"{c.url}/api/worker/heartbeat", c.proc, script)}
    for loop in ("uvloop", "asyncio"):
        port = free_port()
        argv = python_argv("-m", "bench.peers", "bare", "--port", str(port), "--loop", loop)
        proc = procs.start(f"bare-{loop}", pinned(argv, SERVER_CORE), port=port)
        url = f"http://127.0.0.1:{port}/api/worker/heartbeat"
        status, body = _post(url, heartbeat_json(wid), "x")
        if status != 200:
            raise BenchError(f"the bare peer answered {status}: {body[:300]!r}")
        loads[f"bare-{loop}"] = wrk.Load(url, proc, script)
    results = wrk.compare(
        loads,
        rounds=opt.rounds,
        duration=opt.duration,
        warmup=opt.warmup,
        connections=opt.hb_connections,
        on_run=lambda name, i: log(f"heartbeat: wrk against {name} (round {i + 1})"),
    )
    valid = all(_wrk_row_check(r, f"heartbeat ({n})", report) for n, r in results.items())
    workers = coord.health(c).get("workers", {})
    total = workers.get("total") if isinstance(workers, dict) else None
    if total != opt.hb_workers:
        raise BenchError(f"the coordinator holds {total} workers, not {opt.hb_workers}")
    ours, bare, slow = results["coordinator"], results["bare-uvloop"], results["bare-asyncio"]
    report.add(
        Row(
            metric,
            ours.rps,
            "req/s",
            peer="bare aiohttp json.loads handler (uvloop)",
            peer_value=bare.rps,
            ratio=ours.rps / bare.rps,
            target=target,
            valid=valid,
            note=f"wrk -t1 -c{opt.hb_connections}, best of {opt.rounds}; CPU per request "
            f"{_cpu_per_req(ours)} vs {_cpu_per_req(bare)}; p99 {_ms(ours.p99_us)} vs "
            f"{_ms(bare.p99_us)}",
        )
    )
    report.add(
        Row(
            "heartbeat ingestion vs the bare handler on the default asyncio loop",
            ours.rps,
            "req/s",
            peer="bare aiohttp json.loads handler (asyncio)",
            peer_value=slow.rps,
            ratio=ours.rps / slow.rps,
            note=f"CPU per request {_cpu_per_req(slow)}",
        )
    )


def _cpu_per_req(result: wrk.WrkResult) -> str:
    if result.server_cpu is None or result.rps <= 0:
        return "?"
    return f"{result.server_cpu / result.rps * 1e6:.0f} us"


def _ms(us: float | None) -> str:
    return f"{us / 1000:.2f} ms" if us is not None else "?"


# ---------------------------------------------------------------------------------------- proxy


def _sequential(client: Client, path: str, n: int) -> list[float]:
    out = []
    for _ in range(n):
        resp = client.request(path)
        if resp.status != 200:
            raise BenchError(f"GET {path} answered {resp.status}: {resp.body[:200]!r}")
        out.append(resp.total_us)
    return out


def _interleaved_latency(ports: dict[str, int], path: str, n: int) -> dict[str, float]:
    """p50 of ``n`` sequential keep-alive requests per target, interleaved request by request."""
    clients = {name: Client(port) for name, port in ports.items()}
    samples: dict[str, list[float]] = {name: [] for name in ports}
    try:
        for client in clients.values():  # warm the connections (and upstream pools)
            _sequential(client, path, 50)
        for _ in range(n):
            for name, client in clients.items():
                samples[name] += _sequential(client, path, 1)
    finally:
        for client in clients.values():
            client.close()
    return {name: statistics.median(values) for name, values in samples.items()}


def _first_chunk(ports: dict[str, int], path: str, n: int) -> dict[str, float]:
    clients = {name: Client(port) for name, port in ports.items()}
    samples: dict[str, list[float]] = {name: [] for name in ports}
    try:
        for i in range(n + 10):
            for name, client in clients.items():
                resp = client.request(path)
                if resp.status != 200 or resp.first_chunk_us is None:
                    raise BenchError(f"{name}: GET {path} answered {resp.status} without chunks")
                if "chunked" not in resp.headers.get("transfer-encoding", ""):
                    raise BenchError(f"{name}: the stream was not chunked")
                if i >= 10:
                    samples[name].append(resp.first_chunk_us)
    finally:
        for client in clients.values():
            client.close()
    return {name: statistics.median(values) for name, values in samples.items()}


def _stream_gaps(port: int, events: int, gap_ms: float) -> tuple[float, list[float]]:
    """First-event time (ms) and the gaps (ms) between events as received.

    Each event takes the arrival time of the chunk that carried it, so a proxy that buffers
    (and merges chunks) shows gaps near 0 rather than failing the parse.
    """
    with Client(port) as client:
        resp = client.request(f"/service/echo/sse?chunks={events}&gap_ms={gap_ms:g}")
    arrivals: list[int] = []
    for data, at in zip(resp.chunks, resp.chunk_ns, strict=True):
        arrivals += [at] * data.count(b"data: ")
    if resp.status != 200 or len(arrivals) != events:
        raise BenchError(f"stream check: status {resp.status}, {len(arrivals)}/{events} events")
    first = (arrivals[0] - resp.sent_ns) / 1e6
    gaps = [(b - a) / 1e6 for a, b in itertools.pairwise(arrivals)]
    return first, gaps


@dataclass
class _ProxySetup:
    coordinator: coord.Coordinator
    backend: Proc
    backend_port: int
    sse_port: int
    nginx_proxy: Proc | None
    nginx_port: int | None
    worker: tuple[str, str]  # (worker_id, worker_token) registered at the coordinator


THROUGHPUT = "proxy throughput, GET /service/echo/... (small JSON)"
THROUGHPUT_TARGET = Target("ratio", ">=", 0.5, ">= 0.5")
ADDED = "added latency, unloaded (p50, coordinator - direct)"
ADDED_TARGET = Target("value", "<=", 500, "<= 0.5 ms")
FIRST = "time to first streamed chunk, added (p50, coordinator - direct)"
FIRST_TARGET = Target("value", "<=", 1000, "<= 1 ms")
GAPS = "streaming not buffered: worst /chunk gap - 100 ms/ through the coordinator"
GAPS_TARGET = Target("value", "<=", 20, "<= 20 ms")


def _guarded(
    report: Report, metric: str, target: Target | None, step: Any, server: Proc | None = None
) -> None:
    """Run one measurement; a failure of the system under test becomes an ERROR row."""
    try:
        step()
    except (BenchError, HttpError, OSError) as exc:
        why = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        log(f"{metric}: {why}")
        report.error(metric, why, target)
        if server is not None and (crash := _last_exception(server)):
            report.notes.append(f"{metric}: the coordinator logged `{crash}`")


def _last_exception(proc: Proc) -> str | None:
    """The last line of the last exception the coordinator logged (JSON log lines)."""
    found = None
    for line in proc.log_tail(200_000).splitlines():
        if '"exception"' not in line:
            continue
        try:
            event = json.loads(line)
        except ValueError:
            continue
        lines = str(event.get("exception", "")).strip().splitlines()
        if lines:
            where = next((x.strip() for x in reversed(lines) if x.strip().startswith("File")), "")
            found = f"{lines[-1]} ({where})" if where else lines[-1]
    return found


def proxy(report: Report, procs: Procs, tmp: Path, opt: Options) -> None:
    if not nginx.available():
        log(f"nginx is not installed: `{APT_HINT}`; the nginx comparison is skipped")
    if not wrk.available():
        log(f"wrk is not installed: `{APT_HINT}`; throughput figures are skipped")
    setup = _proxy_setup(report, procs, tmp)
    server = setup.coordinator.proc
    _guarded(
        report,
        THROUGHPUT,
        THROUGHPUT_TARGET,
        lambda: _throughput(report, setup, procs, opt),
        server,
    )
    _guarded(report, ADDED, ADDED_TARGET, lambda: _latency(report, setup, opt), server)
    _hotpath(report)
    # Streaming: move the worker to the SSE backend (re-registration with its token).
    wid, token = setup.worker
    sse_url = f"http://127.0.0.1:{setup.sse_port}"
    coord.register_one(setup.coordinator, sse_url, worker_id=wid, worker_token=token)
    _guarded(report, FIRST, FIRST_TARGET, lambda: _first_chunk_row(report, setup, opt), server)
    _guarded(report, GAPS, GAPS_TARGET, lambda: _gaps_rows(report, setup), server)


def _hotpath(report: Report) -> None:
    """The front door's Python time per request, without sockets (bench/hotpath.py)."""
    log("proxy: the front door's hot path in-process (python -m bench.hotpath)")
    result = _run_json(python_argv("-m", "bench.hotpath"), timeout=120)
    report.add(
        Row(
            "front door hot path: Python time per proxied GET (in-process, no sockets)",
            result["us_per_request"],
            "us",
            note="python -m bench.hotpath: parse, route, schedule, forward, relay, metrics; "
            "best of 5 x 40,000, an event-loop turn per request subtracted",
        )
    )
    report.add(
        Row(
            "front door hot path: Python time per heartbeat (in-process, no sockets)",
            result["us_per_heartbeat"],
            "us",
            note="python -m bench.hotpath: parse, read the body in a task, authenticate, "
            "update the registry, answer; loop turns included",
        )
    )


def _proxy_setup(report: Report, procs: Procs, tmp: Path) -> _ProxySetup:
    backend_port = free_port()
    if nginx.available():
        backend = nginx.start_backend(procs, tmp, backend_port, CLIENT_CORE)
        backend_name = "nginx `return 200`"
    else:
        argv = python_argv("-m", "bench.peers", "backend", "--port", str(backend_port))
        backend = procs.start("backend", pinned(argv, CLIENT_CORE), port=backend_port)
        backend_name = "an aiohttp app (uvloop)"
    sse_port = free_port()
    argv = python_argv("-m", "bench.peers", "backend", "--port", str(sse_port))
    procs.start("sse-backend", pinned(argv, CLIENT_CORE), port=sse_port)
    report.notes.append(
        f"Proxy figures: the backend is {backend_name}, on the client core with wrk; the proxy "
        "under test (coordinator or nginx) is alone on the server core. Streaming figures use "
        "an aiohttp text/event-stream backend."
    )
    log("proxy: starting the coordinator and registering one echo worker")
    c = coord.start(procs, tmp, SERVER_CORE, name="coordinator-proxy")
    worker = coord.register_one(c, f"http://127.0.0.1:{backend_port}")
    with Client(c.port) as client:
        resp = client.request("/service/echo/bench")
    if resp.status != 200 or resp.body != b'{"ok":true}':
        raise BenchError(f"the proxy path answered {resp.status}: {resp.body[:300]!r}")
    nginx_proxy: Proc | None = None
    nginx_port: int | None = None
    if nginx.available():
        nginx_port = free_port()
        nginx_proxy = nginx.start_proxy(procs, tmp, nginx_port, backend_port, SERVER_CORE)
    return _ProxySetup(c, backend, backend_port, sse_port, nginx_proxy, nginx_port, worker)


def _throughput(report: Report, s: _ProxySetup, procs: Procs, opt: Options) -> None:
    if not wrk.available():
        report.skip(THROUGHPUT, f"wrk missing (`{APT_HINT}`)", THROUGHPUT_TARGET)
        return
    path = "/service/echo/bench"
    ceiling_port = free_port()
    argv = python_argv("-m", "bench.peers", "bare", "--port", str(ceiling_port))
    ceiling = procs.start("aiohttp-ceiling", pinned(argv, SERVER_CORE), port=ceiling_port)

    def url(port: int) -> str:
        return f"http://127.0.0.1:{port}{path}"

    loads = {
        "coordinator": wrk.Load(url(s.coordinator.port), s.coordinator.proc),
        "backend": wrk.Load(url(s.backend_port), s.backend),
        "aiohttp-ceiling": wrk.Load(url(ceiling_port), ceiling),
    }
    if s.nginx_proxy is not None and s.nginx_port is not None:
        loads["nginx"] = wrk.Load(url(s.nginx_port), s.nginx_proxy)
    results = wrk.compare(
        loads,
        rounds=opt.rounds,
        duration=opt.duration,
        warmup=opt.warmup,
        connections=opt.proxy_connections,
        on_run=lambda name, i: log(f"proxy: wrk against {name} (round {i + 1})"),
    )
    procs.stop(ceiling)
    ours = results["coordinator"]
    valid = _wrk_row_check(ours, "proxy (coordinator)", report)
    top = results["aiohttp-ceiling"]
    peer = results.get("nginx")
    if peer is not None:
        valid = _wrk_row_check(peer, "proxy (nginx)", report) and valid
        report.add(
            Row(
                THROUGHPUT,
                ours.rps,
                "req/s",
                peer="nginx reverse proxy, keep-alive upstream",
                peer_value=peer.rps,
                ratio=ours.rps / peer.rps,
                target=THROUGHPUT_TARGET,
                valid=valid,
                note=f"wrk -t1 -c{opt.proxy_connections}, best of {opt.rounds}; CPU per "
                f"request {_cpu_per_req(ours)} vs {_cpu_per_req(peer)}; p99 "
                f"{_ms(ours.p99_us)} vs {_ms(peer.p99_us)}",
            )
        )
        report.add(
            Row(
                "aiohttp ceiling: GET handler answering the same bytes, no upstream",
                top.rps,
                "req/s",
                peer="nginx reverse proxy",
                peer_value=peer.rps,
                ratio=top.rps / peer.rps,
                note=f"uvloop; CPU per request {_cpu_per_req(top)}; the most an aiohttp-served "
                "proxy could reach",
            )
        )
    else:
        report.skip(THROUGHPUT, f"nginx missing (`{APT_HINT}`)", THROUGHPUT_TARGET)
    report.add(
        Row(
            "proxy throughput vs the aiohttp ceiling",
            ours.rps,
            "req/s",
            peer="aiohttp GET handler, no upstream",
            peer_value=top.rps,
            ratio=ours.rps / top.rps,
            note="share of aiohttp's own per-request cost",
        )
    )
    report.add(
        Row(
            "backend throughput, direct (headroom check)",
            results["backend"].rps,
            "req/s",
            note=f"CPU per request {_cpu_per_req(results['backend'])}",
        )
    )


def _latency(report: Report, s: _ProxySetup, opt: Options) -> None:
    log(f"proxy: unloaded latency, {opt.latency_requests:,} sequential requests per target")
    ports = {"direct": s.backend_port, "coordinator": s.coordinator.port}
    if s.nginx_port is not None:
        ports["nginx"] = s.nginx_port
    p50 = _interleaved_latency(ports, "/service/echo/bench", opt.latency_requests)
    report.add(
        Row(
            ADDED,
            p50["coordinator"] - p50["direct"],
            "us",
            peer="direct to the backend (p50)",
            peer_value=p50["direct"],
            target=ADDED_TARGET,
            note=f"{opt.latency_requests:,} sequential keep-alive GETs each, interleaved",
        )
    )
    if "nginx" in p50:
        report.add(
            Row(
                "added latency, unloaded (p50, nginx - direct)",
                p50["nginx"] - p50["direct"],
                "us",
                peer="direct to the backend (p50)",
                peer_value=p50["direct"],
                note="for scale",
            )
        )


def _first_chunk_row(report: Report, s: _ProxySetup, opt: Options) -> None:
    log(f"proxy: time to first streamed chunk, {opt.ttfb_runs} runs")
    ports = {"direct": s.sse_port, "coordinator": s.coordinator.port}
    first = _first_chunk(ports, "/service/echo/sse?chunks=3&gap_ms=2", opt.ttfb_runs)
    report.add(
        Row(
            FIRST,
            first["coordinator"] - first["direct"],
            "us",
            peer="direct to the backend (p50)",
            peer_value=first["direct"],
            target=FIRST_TARGET,
            note=f"text/event-stream, chunked; {opt.ttfb_runs} runs",
        )
    )


def _gaps_rows(report: Report, s: _ProxySetup) -> None:
    log("proxy: streaming is not buffered (6 chunks, 100 ms apart)")
    worst = 0.0
    worst_first = 0.0
    for _ in range(3):
        first_ms, gaps = _stream_gaps(s.coordinator.port, 6, 100)
        worst = max([worst, *(abs(g - 100.0) for g in gaps)])
        worst_first = max(worst_first, first_ms)
    report.add(
        Row(
            GAPS,
            worst,
            "ms",
            target=GAPS_TARGET,
            note="3 streams of 6 chunks written 100 ms apart by the backend",
        )
    )
    report.add(
        Row(
            "streaming: first chunk of a 100 ms-spaced stream, through the coordinator",
            worst_first,
            "ms",
            target=Target("value", "<=", 50, "<= 50 ms"),
            note="worst of 3; must arrive well before the second chunk is written",
        )
    )
