"""edge-coordinator.yml, run without Docker: every service's command as a local process.

The file is read with PyYAML and interpolated as compose does; each service runs what its image
would run (entrypoint, command and environment from the Dockerfile and the compose file), with
service host names and ports mapped to 127.0.0.1 and free ports, and ``tests/fake_cloudflared``
for the ``cloudflare/cloudflared`` image (same flags, real forwarding). Wiring mistakes in the
compose file (a wrong host name, port, variable or command) therefore fail here.

Only test timings and ``DEV_ALLOW_LOOPBACK`` are added to the file's environment: the fake
tunnel's public URLs are ``http://127.0.0.1:<port>``.

The router: ``ROUTER_URL`` points at the router's edge API on loopback. Until the real router
under ``wrangler dev`` is wired in here, this is the architecture's edge API stand-in from
``tests/worker_agent/conftest.py`` (it checks ``GET <tunnel_url>/health`` names the same
coordinator, returns a per-coordinator secret, takes heartbeats and deletions); the compute
worker then registers at the coordinator's public (tunnel) URL, which is where the router
forwards worker registrations and public requests.
"""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.e2e.conftest import Router, start_router
from tests.packaging.compose_local import (
    FAKE_CLOUDFLARED,
    ROOT,
    VENV_BIN,
    ImageSpec,
    LocalStack,
    build_stack,
    load_compose,
)
from tests.worker_agent.conftest import RouterState, Site, router_app, start_site

pytestmark = pytest.mark.timeout(120)

EDGE = ROOT / "edge-coordinator.yml"


def base_env(tmp_path: Path) -> dict[str, str]:
    """The processes' OS environment: nothing of the developer's shell leaks in."""
    return {
        "PATH": f"{VENV_BIN}{os.pathsep}/usr/local/bin:/usr/bin:/bin",
        "HOME": str(tmp_path / "home"),
        "LANG": "C.UTF-8",
        "FAKE_CLOUDFLARED_STATE": str(tmp_path / "cf"),
    }


TEST_TIMINGS: dict[str, dict[str, str]] = {
    "coordinator": {
        "DEV_ALLOW_LOOPBACK": "true",
        "HEARTBEAT_INTERVAL": "1",
        "SWEEP_INTERVAL": "0.2",
    },
    "edge-registrar": {
        "HTTP_TIMEOUT": "3",
        "REGISTER_BACKOFF_INITIAL": "0.05",
        "REGISTER_BACKOFF_MAX": "0.5",
        "HEARTBEAT_MIN_INTERVAL": "0.05",
        "TUNNEL_POLL_INTERVAL": "0.05",
        "TUNNEL_CHECK_INTERVAL": "0.5",
    },
}


async def wait_until(predicate: Any, what: str, timeout: float = 30.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        await asyncio.sleep(0.1)


@pytest.fixture
async def router() -> AsyncIterator[tuple[Site, RouterState]]:
    state = RouterState()
    site = await start_site(router_app(state))
    yield site, state
    await site.runner.cleanup()


@pytest.fixture
async def stacks() -> AsyncIterator[list[LocalStack]]:
    """Every local stack a test builds is taken down at the end, whatever happened."""
    started: list[LocalStack] = []
    yield started
    for stack in started:
        await asyncio.to_thread(stack.down)


def compute_worker_env(tmp_path: Path, coordinator_url: str) -> dict[str, str]:
    """A contributor's `docker run rma-worker`: the image's environment plus its -e flags."""
    env = base_env(tmp_path)
    env.update(ImageSpec.from_dockerfile(ROOT / "docker" / "worker.Dockerfile").env)
    env.update(
        {
            "COORDINATOR_URL": coordinator_url,
            "STATE_DIR": str(tmp_path / "worker-state"),
            "CLOUDFLARED_PATH": str(FAKE_CLOUDFLARED),
            "GATEWAY_PORT": "0",
            "AUTO_DETECT": "false",
            "HTTP_TIMEOUT": "3",
            "REGISTER_BACKOFF_INITIAL": "0.05",
            "REGISTER_BACKOFF_MAX": "0.5",
            "HEARTBEAT_MIN_INTERVAL": "0.05",
            "TUNNEL_CHECK_INTERVAL": "0.5",
            "DRAIN_TIMEOUT": "2",
        }
    )
    return env


async def test_edge_coordinator_stack_registers_and_serves(
    tmp_path: Path,
    router: tuple[Site, RouterState],
    stacks: list[LocalStack],
) -> None:
    site, state = router
    compose = load_compose(EDGE, {"ROUTER_URL": site.url})
    (tmp_path / "home").mkdir()
    stack = build_stack(compose, tmp_path, extra_env=TEST_TIMINGS, base_env=base_env(tmp_path))
    stacks.append(stack)

    # compose up: coordinator, then (once its healthcheck passes) tunnel, then the registrar.
    assert stack.order == ["coordinator", "tunnel", "edge-registrar"]
    await asyncio.to_thread(stack.start, "coordinator")
    await asyncio.to_thread(stack.start, "tunnel")
    await asyncio.to_thread(stack.start, "edge-registrar")
    coordinator, tunnel, registrar = (stack[n] for n in stack.order)

    # The registrar read the tunnel's public URL from the tunnel's metrics server, and the
    # router reached the coordinator through it (the stand-in checks GET <tunnel_url>/health).
    await wait_until(lambda: state.rows, "coordinator registered at the router")
    (coordinator_id, row) = next(iter(state.rows.items()))
    public_url = row["tunnel_url"]
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
        async with session.get(f"{tunnel.url(20241)}/quicktunnel") as resp:
            hostname = (await resp.json())["hostname"]
        assert public_url == f"http://{hostname}"
        assert hostname != f"127.0.0.1:{coordinator.ports[8080]}", "tunnelled, not direct"
        async with session.get(f"{coordinator.url(8080)}/health") as resp:
            assert (await resp.json())["coordinator_id"] == coordinator_id
        events = [e.get("event") for e in registrar.json_events()]
        assert "edge_registered" in events, registrar.log()[-2000:]
        # The registrar beats the router with the coordinator's summary.
        await wait_until(lambda: len(state.heartbeats) >= 2, "edge heartbeats")
        assert state.heartbeats[-1]["coordinator_id"] == coordinator_id

        # A contributor's worker joins (where the router forwards registrations: the
        # coordinator's public URL), opens its own tunnel, and serves echo.
        worker_env = compute_worker_env(tmp_path, public_url)
        worker = await asyncio.create_subprocess_exec(
            str(VENV_BIN / "rma-worker"),
            "run",
            env=worker_env,
            stdout=(tmp_path / "worker.log").open("wb"),
            stderr=asyncio.subprocess.STDOUT,
            start_new_session=True,
        )
        try:
            ready = 0

            async def echo_ready() -> bool:
                async with session.get(f"{public_url}/api/services") as resp:
                    data = await resp.json()
                return any(
                    s["name"] == "echo" and s["ready_workers"] >= 1 for s in data["services"]
                )

            for _ in range(300):
                if await echo_ready():
                    ready = 1
                    break
                assert worker.returncode is None, (tmp_path / "worker.log").read_text()
                await asyncio.sleep(0.1)
            assert ready, (tmp_path / "worker.log").read_text()[-3000:]

            # A public request: through the coordinator's tunnel, the coordinator, the worker's
            # tunnel and gateway, to the echo backend, and back.
            async with session.post(
                f"{public_url}/service/echo/v1/hello?x=1",
                data=b"payload",
                headers={"X-Request-Id": "req-packaging-1"},
            ) as resp:
                body = await resp.json()
                assert resp.status == 200, body
            assert body["service"] == "echo"
            assert body["path"] == "v1/hello" or body["path"].endswith("v1/hello")
            assert body["query"] == "x=1"
            assert body["body_bytes"] == len(b"payload")
            assert body["request_id"] == "req-packaging-1"

            # The router hears about the worker's service in the coordinator's summary.
            await wait_until(
                lambda: any(
                    s["name"] == "echo" and s["ready_workers"] >= 1
                    for s in state.heartbeats[-1]["services"]
                ),
                "echo in the edge heartbeat",
            )
        finally:
            if worker.returncode is None:
                worker.terminate()
                try:
                    await asyncio.wait_for(worker.wait(), 15)
                except TimeoutError:
                    worker.kill()
                    await worker.wait()

    # docker compose stop: SIGTERM; the registrar deregisters and exits cleanly.
    code = await asyncio.to_thread(stack.stop, "edge-registrar")
    assert code == 0, registrar.log()[-2000:]
    assert state.deleted == [coordinator_id]
    assert await asyncio.to_thread(stack.stop, "tunnel") == 0
    assert await asyncio.to_thread(stack.stop, "coordinator") == 0


async def test_named_tunnel_variant(
    tmp_path: Path,
    router: tuple[Site, RouterState],
    stacks: list[LocalStack],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With TUNNEL_TOKEN and PUBLIC_URL set, the same file runs a named tunnel: `run` with the
    token in the environment, and the registrar advertises PUBLIC_URL."""
    site, state = router
    from tests.packaging.compose_local import free_port

    named_port = free_port()
    public_url = f"http://127.0.0.1:{named_port}"
    token = "named-tunnel-token-0123456789abcdef"
    compose = load_compose(
        EDGE, {"ROUTER_URL": site.url, "TUNNEL_TOKEN": token, "PUBLIC_URL": public_url}
    )
    (tmp_path / "home").mkdir()
    extra = {k: dict(v) for k, v in TEST_TIMINGS.items()}
    extra["tunnel"] = {"FAKE_CLOUDFLARED_NAMED_PORT": str(named_port)}
    stack = build_stack(compose, tmp_path, extra_env=extra, base_env=base_env(tmp_path))
    stacks.append(stack)
    assert stack["tunnel"].argv[-1] == "run"
    assert token not in " ".join(stack["tunnel"].argv)
    await asyncio.to_thread(stack.up)
    await wait_until(lambda: state.rows, "coordinator registered through the named tunnel")
    row = next(iter(state.rows.values()))
    assert row["tunnel_url"] == public_url
    assert token not in stack["tunnel"].log()
    assert token not in stack["edge-registrar"].log()
    await asyncio.to_thread(stack.down)


async def _poll_json(
    session: aiohttp.ClientSession, url: str, token: str | None = None
) -> tuple[int, Any]:
    """GET a JSON document, retrying while the process behind ``url`` is still starting."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    for _ in range(100):
        try:
            async with session.get(url, headers=headers) as resp:
                return resp.status, await resp.json(content_type=None)
        except aiohttp.ClientConnectionError:
            await asyncio.sleep(0.1)
    raise AssertionError(f"{url} never answered")


@pytest.mark.timeout(240)
async def test_edge_coordinator_stack_behind_the_real_router(
    tmp_path: Path, stacks: list[LocalStack]
) -> None:
    """The whole path: the file's stack registers at the router under `wrangler dev`, a worker
    joins through the router, and a public request through the router reaches it."""
    join, admin = "federation-join-token-0123456789", "admin-token-0123456789abcdef"
    router: Router = await asyncio.to_thread(
        start_router,
        tmp_path,
        HEARTBEAT_INTERVAL_S="1",
        SNAPSHOT_TTL_MS="200",
        FEDERATION_JOIN_TOKEN=join,
        ADMIN_TOKEN=admin,
    )
    worker: asyncio.subprocess.Process | None = None
    try:
        compose = load_compose(EDGE, {"ROUTER_URL": router.url, "FEDERATION_JOIN_TOKEN": join})
        (tmp_path / "home").mkdir()
        stack = build_stack(compose, tmp_path, extra_env=TEST_TIMINGS, base_env=base_env(tmp_path))
        stacks.append(stack)
        await asyncio.to_thread(stack.up)
        tunnel = stack["tunnel"]
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
            _, quick = await _poll_json(session, f"{tunnel.url(20241)}/quicktunnel")
            public_url = f"http://{quick['hostname']}"
            _, health = await _poll_json(session, f"{stack['coordinator'].url(8080)}/health")
            coordinator_id = health["coordinator_id"]

            # Registered at the router, under its tunnel URL, and healthy (beating).
            loop = asyncio.get_running_loop()
            deadline = loop.time() + 60
            while True:
                _, listing = await _poll_json(session, f"{router.url}/api/coordinators", admin)
                rows = [c for c in listing["coordinators"] if c["coordinator_id"] == coordinator_id]
                if rows and rows[0]["healthy"]:
                    break
                assert loop.time() < deadline, (
                    f"not registered: {listing}\n{stack['edge-registrar'].log()[-3000:]}"
                    f"\n{router.tail()}"
                )
                await asyncio.sleep(0.2)
            assert rows[0]["tunnel_url"] == public_url

            # A contributor's worker registers through the router.
            worker = await asyncio.create_subprocess_exec(
                str(VENV_BIN / "rma-worker"),
                "run",
                env=compute_worker_env(tmp_path, router.url),
                stdout=(tmp_path / "worker.log").open("wb"),
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )
            # A public request through the router reaches it (once the coordinator's beat has
            # told the router that echo has a ready worker).
            deadline = loop.time() + 60
            while True:
                async with session.post(
                    f"{router.url}/service/echo/v1/hello?x=1",
                    data=b"payload",
                    headers={"X-Request-Id": "req-packaging-router"},
                ) as resp:
                    status, body = resp.status, await resp.json(content_type=None)
                if status == 200:
                    break
                assert worker.returncode is None, (tmp_path / "worker.log").read_text()
                assert loop.time() < deadline, (
                    f"{status} {body}\n{(tmp_path / 'worker.log').read_text()[-3000:]}"
                    f"\n{router.tail()}"
                )
                await asyncio.sleep(0.3)
            assert body["service"] == "echo"
            assert body["query"] == "x=1"
            assert body["body_bytes"] == len(b"payload")
            assert body["request_id"] == "req-packaging-router"

            # docker compose stop: the registrar deregisters the coordinator at the router.
            worker.terminate()
            await asyncio.wait_for(worker.wait(), 15)
            assert await asyncio.to_thread(stack.stop, "edge-registrar") == 0
            _, listing = await _poll_json(session, f"{router.url}/api/coordinators", admin)
            ids = [c["coordinator_id"] for c in listing["coordinators"]]
            assert coordinator_id not in ids
    finally:
        if worker is not None and worker.returncode is None:
            worker.kill()
            await worker.wait()
        for stack in stacks:
            await asyncio.to_thread(stack.down)
        await asyncio.to_thread(router.stop)


def test_stack_uses_this_interpreter() -> None:
    """The local stand-ins run from this venv (the images' /opt/venv)."""
    assert (VENV_BIN / "rma-coordinator").exists()
    assert (VENV_BIN / "rma-worker").exists()
    assert Path(sys.executable).parent == VENV_BIN
