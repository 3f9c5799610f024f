"""The router is restarted: ``wrangler dev`` is stopped and a new one starts on the same port and
persist directory, so its Durable Object reloads the coordinators from SQLite.

Two edge coordinators (``rma-worker`` in edge mode, each with its own compute worker serving
``echo``, behind the fake cloudflared) keep beating while the router is down. They are told never
to re-register because the router is unreachable (``FAILOVER_AFTER`` high), so after the restart
only a reloaded row can accept their beats: an unknown id would get 404 and a re-registration,
which this test rules out.

Checks: right after the restart ``/api/coordinators`` lists both coordinators; within one router
heartbeat interval (+ slack for a loaded machine) both report their services again and a request
through the router reaches a worker; no beat was refused and nobody re-registered.
"""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import pytest

from tests.e2e.conftest import Router, start_router
from tests.e2e.federation import Edge, coordinators, wait_until

ROUTER_INTERVAL = 1.0  # the edge coordinators beat the router this often
SLACK = 2.0  # a loaded 2-core machine; the measured figure is printed

pytestmark = pytest.mark.timeout(150)


def registrations(edge: Edge) -> int:
    return edge.text().count('"edge_registered"')


async def test_router_restart_keeps_coordinators_and_rebuilds_liveness(
    tmp_path: Path, cf_state: Path
) -> None:
    routers: list[Router] = []
    edges: list[Edge] = []
    try:
        router = start_router(
            tmp_path,
            HEARTBEAT_INTERVAL_S=str(ROUTER_INTERVAL),
            COORDINATOR_TTL_S="6",
            EVICT_AFTER_S="60",
            SNAPSHOT_TTL_MS="100",
            UPSTREAM_TIMEOUT_MS="3000",
            RATE_LIMIT_PER_MIN="0",
        )
        routers.append(router)
        edges = [
            Edge(tmp_path, f"edge-{i}", router, cf_state, failover_after=1000) for i in range(2)
        ]

        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http:

            async def serving(r: Router) -> bool:
                """Both coordinators offer echo at ``r``, and a request reaches a worker."""
                known = coordinators(r)
                if len(known) != 2 or not all(
                    c["healthy"]
                    and any(s["name"] == "echo" and s["ready_workers"] for s in c["services"])
                    for c in known.values()
                ):
                    return False
                async with http.get(f"{r.url}/service/echo/restart") as resp:
                    return resp.status == 200 and resp.headers["X-Rma-Coordinator"] in known

            try:
                await wait_until("two edge coordinators serving echo", lambda: serving(router), 45)
            except AssertionError:
                for e in edges:
                    print(e.text()[-3000:])
                print(router.tail())
                raise
            before = set(coordinators(router))
            registered = [registrations(e) for e in edges]
            assert registered == [1, 1]

            router.stop()
            restarted = start_router(tmp_path, port=router.port, **router.vars)
            routers.append(restarted)
            up = time.monotonic()
            # Known at once, from the reloaded SQLite rows (beats never create a row).
            assert set(coordinators(restarted)) == before

            try:
                await wait_until("liveness rebuilt", lambda: serving(restarted), 20)
            except AssertionError:
                print(restarted.tail())
                raise
            took = time.monotonic() - up
            print(f"router restart: liveness rebuilt {took:.2f} s after it answered /health")
            assert took <= ROUTER_INTERVAL + SLACK, took

        for e, count in zip(edges, registered, strict=True):
            log = e.text()
            assert '"edge_heartbeat_failed"' in log  # the router really was down while it beat
            assert '"edge_heartbeat_refused"' not in log  # and its beats were accepted after
            assert registrations(e) == count
    finally:
        for e in edges:
            e.stop()
        for r in routers:
            r.stop()
