"""The tunnel against the fake cloudflared: quick, named, external and none; watchdog restarts."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pydantic import SecretStr
from structlog.testing import capture_logs

from tests.worker_agent.conftest import (
    FAKE_CLOUDFLARED,
    Site,
    agent_settings,
    alive,
    free_port,
    pids_in,
    wait_for,
)
from worker_agent.tunnel import (
    CloudflaredNotFound,
    CloudflaredProcess,
    Tunnel,
    TunnelError,
    _tunnel_url_or_none,
    find_cloudflared,
    quicktunnel_hostname,
    url_from_hostname,
)

SiteFactory = Callable[..., Awaitable[Site]]


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def tunnels() -> AsyncIterator[list[Tunnel]]:
    made: list[Tunnel] = []
    yield made
    for tunnel in made:
        await tunnel.stop()


async def _get(http: aiohttp.ClientSession, url: str) -> tuple[int, Any]:
    async with http.get(url) as resp:
        return resp.status, await resp.json()


# ------------------------------------------------------------------------------ binary lookup


def test_cloudflared_lookup_order_and_the_error_names_all_three(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    empty = tmp_path / "empty-bin"
    empty.mkdir()
    monkeypatch.setenv("PATH", str(empty))
    assert find_cloudflared(str(FAKE_CLOUDFLARED), allow_download=False) == str(FAKE_CLOUDFLARED)

    with pytest.raises(CloudflaredNotFound) as info:
        find_cloudflared(str(tmp_path / "missing"), allow_download=False)
    message = str(info.value)
    assert "CLOUDFLARED_PATH" in message
    assert "PATH" in message
    assert "pycloudflared" in message

    def broken_download() -> str:
        raise OSError("no network")

    with pytest.raises(CloudflaredNotFound, match=r"pycloudflared download failed.*no network"):
        find_cloudflared(None, allow_download=True, download=broken_download)
    assert find_cloudflared(None, allow_download=True, download=lambda: "/opt/cf") == "/opt/cf"

    (empty / "cloudflared").symlink_to(FAKE_CLOUDFLARED)
    assert find_cloudflared(None, allow_download=False) == str(empty / "cloudflared")


def test_url_from_hostname() -> None:
    assert url_from_hostname("abc-def.trycloudflare.com") == "https://abc-def.trycloudflare.com"
    assert url_from_hostname("https://x.example.org/") == "https://x.example.org"
    assert url_from_hostname("127.0.0.1:4000") == "http://127.0.0.1:4000"
    assert url_from_hostname("localhost:4000") == "http://localhost:4000"


# ------------------------------------------------------------------------------ quick tunnels


async def test_quick_tunnel_forwards_over_loopback(
    tmp_path: Path,
    site_factory: SiteFactory,
    http: aiohttp.ClientSession,
    tunnels: list[Tunnel],
    cf_state: Path,
) -> None:
    backend = await site_factory()
    tunnel = Tunnel(agent_settings(tmp_path), local_url=backend.url, session=http)
    tunnels.append(tunnel)
    assert tunnel.mode == "quick"
    with capture_logs() as logs:
        url = await tunnel.start()
    assert url.startswith("http://127.0.0.1:")
    assert url != backend.url
    status, body = await _get(http, f"{url}/some/path?x=1")
    assert status == 200
    assert body == {"path": "/some/path", "query": "x=1", "body_bytes": 0}
    # cloudflared's stderr went to the logs, and the URL came from /quicktunnel
    lines = [e["line"] for e in logs if e["event"] == "cloudflared"]
    assert any("Your quick Tunnel has been created" in line for line in lines)
    assert not any(e["event"] == "tunnel_url_from_banner" for e in logs)
    pid = tunnel.process.pid if tunnel.process else None
    assert pid is not None
    await tunnel.stop()
    assert not alive(pid)


async def test_quick_tunnel_url_from_the_banner_when_there_is_no_quicktunnel_route(
    tmp_path: Path,
    site_factory: SiteFactory,
    http: aiohttp.ClientSession,
    tunnels: list[Tunnel],
    cf_state: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_NO_QUICKTUNNEL", "1")
    backend = await site_factory()
    tunnel = Tunnel(agent_settings(tmp_path), local_url=backend.url, session=http)
    tunnels.append(tunnel)
    with capture_logs() as logs:
        url = await tunnel.start()
    assert any(e["event"] == "tunnel_url_from_banner" for e in logs)
    assert (await _get(http, f"{url}/x"))[0] == 200


@pytest.mark.parametrize(
    "hostname",
    ["<html>oops</html>", "abc.trycloudflare.com/path", "two words", "https://x.example"],
)
async def test_a_quicktunnel_answer_that_is_no_hostname_is_never_advertised(
    site_factory: SiteFactory, http: aiohttp.ClientSession, hostname: str
) -> None:
    """An unexpected /quicktunnel answer (a changed or broken metrics server) is ignored, as an
    unexpected banner line is, instead of becoming the URL the agent registers."""

    async def fixed(request: web.Request) -> web.Response:
        return web.json_response({"hostname": hostname})

    app = web.Application()
    app.router.add_get("/quicktunnel", fixed)
    metrics = await site_factory(app)
    with capture_logs() as logs:
        assert await quicktunnel_hostname(http, metrics.url) is None
    assert [e["event"] for e in logs] == ["quicktunnel_hostname_invalid"]


def test_banner_urls_are_bare_origins() -> None:
    assert _tunnel_url_or_none("https://abc-def.trycloudflare.com") == (
        "https://abc-def.trycloudflare.com"
    )
    assert _tunnel_url_or_none("http://127.0.0.1:4567/") == "http://127.0.0.1:4567"
    for bad in ("https://api.trycloudflare.com/tunnel", "https://a.b?x=1", "ftp://a.b", "https://"):
        assert _tunnel_url_or_none(bad) is None


async def test_rate_limited_creation_is_retried_with_backoff(
    tmp_path: Path,
    site_factory: SiteFactory,
    http: aiohttp.ClientSession,
    tunnels: list[Tunnel],
    cf_state: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FAKE_CLOUDFLARED_RATE_LIMIT", "2")
    backend = await site_factory()
    tunnel = Tunnel(agent_settings(tmp_path), local_url=backend.url, session=http)
    tunnels.append(tunnel)
    with capture_logs() as logs:
        url = await tunnel.start()
    retries = [e for e in logs if e["event"] == "tunnel_start_retry"]
    assert [e["error_type"] for e in retries] == ["TunnelRateLimited", "TunnelRateLimited"]
    assert "rate-limited" in retries[0]["error"]
    assert len(pids_in(cf_state / "starts")) == 3
    assert (await _get(http, f"{url}/x"))[0] == 200


async def test_watchdog_restarts_on_failed_ready_checks_and_reports_the_new_url(
    tmp_path: Path,
    site_factory: SiteFactory,
    http: aiohttp.ClientSession,
    tunnels: list[Tunnel],
    cf_state: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    unready = tmp_path / "unready"
    monkeypatch.setenv("FAKE_CLOUDFLARED_UNREADY", str(unready))
    backend = await site_factory()
    changes: list[str] = []

    async def on_change(url: str) -> None:
        changes.append(url)

    tunnel = Tunnel(
        agent_settings(tmp_path), local_url=backend.url, session=http, on_change=on_change
    )
    tunnels.append(tunnel)
    first = await tunnel.start()
    first_pid = tunnel.process.pid if tunnel.process else None
    watchdog = asyncio.create_task(tunnel.watch())
    try:
        await asyncio.sleep(0.5)
        assert tunnel.restarts == 0  # ready: nothing happens
        unready.touch()
        await wait_for(lambda: tunnel.restarts == 1, timeout=3)
        unready.unlink()
        await wait_for(lambda: bool(changes), timeout=5)
        assert changes == [tunnel.url]
        assert tunnel.url != first
        assert first_pid is not None
        assert not alive(first_pid)
        assert (await _get(http, f"{tunnel.url}/x"))[0] == 200
    finally:
        watchdog.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watchdog


async def test_watchdog_survives_a_binary_that_vanished_and_restarts_when_it_is_back(
    tmp_path: Path,
    site_factory: SiteFactory,
    http: aiohttp.ClientSession,
    tunnels: list[Tunnel],
    cf_state: Path,
) -> None:
    """cloudflared dies and its binary is gone for a while (a cleaned download cache, an upgrade
    in progress): the restart is retried with backoff instead of killing the watchdog."""
    binary = tmp_path / "bin" / "cloudflared"
    binary.parent.mkdir()
    binary.write_bytes(FAKE_CLOUDFLARED.read_bytes())
    binary.chmod(0o755)
    backend = await site_factory()
    changes: list[str] = []

    async def on_change(url: str) -> None:
        changes.append(url)

    tunnel = Tunnel(
        agent_settings(tmp_path, cloudflared_path=str(binary)),
        local_url=backend.url,
        session=http,
        on_change=on_change,
    )
    tunnels.append(tunnel)
    await tunnel.start()
    assert tunnel.process is not None
    watchdog = asyncio.create_task(tunnel.watch())
    try:
        aside = binary.with_name("cloudflared.aside")
        binary.rename(aside)
        with capture_logs() as logs:
            await tunnel.process.stop(3.0)
            await wait_for(
                lambda: sum(e["event"] == "tunnel_start_retry" for e in logs) >= 2, timeout=5
            )
        assert not watchdog.done()
        assert "cannot run" in next(e for e in logs if e["event"] == "tunnel_start_retry")["error"]
        aside.rename(binary)
        await wait_for(lambda: bool(changes), timeout=5)
        assert (await _get(http, f"{tunnel.url}/x"))[0] == 200
    finally:
        watchdog.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watchdog


# ------------------------------------------------------------------------------ named tunnels


async def test_named_tunnel_gets_the_token_from_the_environment_only(
    tmp_path: Path,
    site_factory: SiteFactory,
    http: aiohttp.ClientSession,
    tunnels: list[Tunnel],
    cf_state: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    port = free_port()
    monkeypatch.setenv("FAKE_CLOUDFLARED_NAMED_PORT", str(port))
    token = "eyJhIjoiZmFrZS10b2tlbi1mb3ItdGVzdHMifQ-secret"
    backend = await site_factory()
    settings = agent_settings(
        tmp_path, tunnel_token=SecretStr(token), tunnel_url="https://worker.example.org"
    )
    tunnel = Tunnel(settings, local_url=backend.url, session=http)
    tunnels.append(tunnel)
    assert tunnel.mode == "named"
    with capture_logs() as logs:
        url = await tunnel.start()
    assert url == "https://worker.example.org"
    assert tunnel.process is not None
    assert tunnel.process.pid is not None
    cmdline = Path(f"/proc/{tunnel.process.pid}/cmdline").read_bytes()
    assert b"run" in cmdline
    assert token.encode() not in cmdline
    assert token not in repr(logs)
    status, _ = await _get(http, f"http://127.0.0.1:{port}/via-named")
    assert status == 200
    assert backend.seen[-1]["path"] == "/via-named"


async def test_named_tunnel_needs_its_url_and_a_valid_token(
    tmp_path: Path,
    site_factory: SiteFactory,
    http: aiohttp.ClientSession,
    tunnels: list[Tunnel],
    cf_state: Path,
) -> None:
    backend = await site_factory()
    no_url = agent_settings(tmp_path, tunnel_token=SecretStr("x" * 40))
    with pytest.raises(TunnelError, match="TUNNEL_URL"):
        await Tunnel(no_url, local_url=backend.url, session=http).start()

    bad = agent_settings(
        tmp_path, tunnel_token=SecretStr("short"), tunnel_url="https://w.example.org"
    )
    tunnel = Tunnel(bad, local_url=backend.url, session=http)
    tunnels.append(tunnel)
    with capture_logs() as logs, pytest.raises(TimeoutError):
        await asyncio.wait_for(tunnel.start(), 1.5)
    retries = [e for e in logs if e["event"] == "tunnel_start_retry"]
    assert retries
    assert "Provided Tunnel token is not valid" in retries[0]["error"]
    assert all(not alive(pid) for pid in pids_in(cf_state / "starts"))


# ------------------------------------------------------------------------------ other modes


async def test_no_tunnel_advertises_tunnel_url_or_the_local_url(
    tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    local = "http://127.0.0.1:8000"
    plain = Tunnel(agent_settings(tmp_path, use_tunnel=False), local_url=local, session=http)
    assert plain.mode == "none"
    assert await plain.start() == local
    fixed = Tunnel(
        agent_settings(tmp_path, use_tunnel=False, tunnel_url="https://me.example.org"),
        local_url=local,
        session=http,
    )
    assert await fixed.start() == "https://me.example.org"
    await plain.watch()  # returns at once: nothing to watch


async def test_external_cloudflared_hostname_is_followed(
    tmp_path: Path,
    site_factory: SiteFactory,
    http: aiohttp.ClientSession,
    cf_state: Path,
    reap: list[int],
) -> None:
    backend = await site_factory()
    metrics_port = free_port()

    async def sidecar() -> CloudflaredProcess:
        proc = CloudflaredProcess(
            [
                str(FAKE_CLOUDFLARED),
                "tunnel",
                "--no-autoupdate",
                "--url",
                backend.url,
                "--metrics",
                f"127.0.0.1:{metrics_port}",
            ],
            f"127.0.0.1:{metrics_port}",
        )
        await proc.start()
        assert proc.pid is not None
        reap.append(proc.pid)
        await wait_for(lambda: proc.banner_url is not None, timeout=5)
        return proc

    changes: list[str] = []

    async def on_change(url: str) -> None:
        changes.append(url)

    first = await sidecar()
    settings = agent_settings(tmp_path, tunnel_metrics_url=f"http://127.0.0.1:{metrics_port}")
    tunnel = Tunnel(settings, local_url=backend.url, session=http, on_change=on_change)
    assert tunnel.mode == "external"
    url = await tunnel.start()
    assert url == first.banner_url
    watchdog = asyncio.create_task(tunnel.watch())
    try:
        await first.stop(2.0)  # the compose stack's cloudflared restarts: new hostname
        second = await sidecar()
        await wait_for(lambda: bool(changes), timeout=5)
        assert changes == [second.banner_url]
        assert (await _get(http, f"{changes[0]}/x"))[0] == 200
        await second.stop(2.0)
    finally:
        watchdog.cancel()
        with pytest.raises(asyncio.CancelledError):
            await watchdog


async def test_stop_kills_a_process_that_ignores_sigterm(reap: list[int]) -> None:
    proc = CloudflaredProcess(
        [
            sys.executable,
            "-c",
            "import signal, sys, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "sys.stderr.write('ignoring SIGTERM\\n'); sys.stderr.flush()\n"
            "time.sleep(30)\n",
        ],
        "127.0.0.1:9",
    )
    await proc.start()
    assert proc.pid is not None
    reap.append(proc.pid)
    await wait_for(lambda: bool(proc.tail), timeout=5)
    with capture_logs() as logs:
        await proc.stop(0.3)
    assert any(e["event"] == "cloudflared_killed" for e in logs)
    assert not alive(proc.pid)
