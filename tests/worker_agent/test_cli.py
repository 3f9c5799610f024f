"""``rma-worker`` as a real process: detect, status, local, run + SIGTERM drain, bad config."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.worker_agent.conftest import (
    VENV_BIN,
    CoordinatorServer,
    Site,
    agent_env,
    alive,
    free_port,
    pids_in,
    read_json_lines,
    wait_for,
)
from worker_agent.__main__ import build_parser, main, render_status, settings_from_args
from worker_agent.settings import SECRET_FIELDS, WorkerSettings, markdown_table

RMA_WORKER = str(VENV_BIN / "rma-worker")
CoordinatorFactory = Callable[..., Awaitable[CoordinatorServer]]
SiteFactory = Callable[..., Awaitable[Site]]


async def run_cli(*args: str, env: dict[str, str], timeout: float = 20) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        RMA_WORKER,
        *args,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_detect_prints_capabilities_as_json(tmp_path: Path) -> None:
    code, out, _ = await run_cli("detect", env=agent_env(tmp_path))
    assert code == 0
    data = json.loads(out)
    assert data["worker_type"] == "cpu"
    assert data["nvml"].startswith("NVMLError")  # no NVIDIA driver on this machine
    caps = data["capabilities"]
    assert caps["gpus"] == []
    assert caps["cpu_cores"] >= 1
    assert isinstance(caps["ram_total_mb"], int)
    assert [s["name"] for s in data["services"]] == ["echo"]


async def test_invalid_configuration_exits_2_with_the_reason(tmp_path: Path) -> None:
    code, out, err = await run_cli("run", env=agent_env(tmp_path, SERVICES="llm=nope"))
    assert code == 2
    assert "invalid configuration" in err
    assert "is not an http(s) URL" in err
    assert out == ""


@pytest.mark.parametrize(
    "env",
    [
        {"WORKER_TYPE": "quantum"},
        {"COORDINATOR_URL": "ftp://x"},
        {"FAILOVER_AFTER": "0"},
        {"OPENAI_PROBE_URLS": "gopher://x"},
    ],
)
def test_invalid_settings_exit_2(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert main(["run"]) == 2
    assert "invalid configuration" in capsys.readouterr().err


def test_flags_mirror_every_setting_except_secrets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORKER_TYPE", "cpu")
    monkeypatch.setenv("GATEWAY_PORT", "9000")
    args = build_parser().parse_args(["run", "--worker-type", "gpu", "--failover-after", "5"])
    settings = settings_from_args(args)
    assert settings.worker_type == "gpu"  # the flag wins
    assert settings.failover_after == 5
    assert settings.gateway_port == 9000  # the environment still applies
    options = {a.dest for a in build_parser()._actions}
    for name in WorkerSettings.model_fields:
        assert (name in options) == (name not in SECRET_FIELDS), name
    assert {"tunnel_token", "worker_join_token", "admin_token"} <= SECRET_FIELDS
    table = markdown_table()
    for name in WorkerSettings.model_fields:
        assert f"| `{name.upper()}` |" in table


async def test_status_prints_services_and_workers(
    tmp_path: Path, coordinator_factory: CoordinatorFactory, agents: list[Any]
) -> None:
    from tests.worker_agent.conftest import agent_settings
    from worker_agent.agent import Agent

    coord = await coordinator_factory(admin_token="admin-token-0123456789")
    agent = Agent(agent_settings(tmp_path, coordinator_url=coord.url, use_tunnel=False))
    agents.append(agent)
    await agent.start()
    await asyncio.wait_for(agent.registered.wait(), 5)

    env = agent_env(tmp_path, COORDINATOR_URL=coord.url, ADMIN_TOKEN="admin-token-0123456789")
    code, out, _ = await run_cli("status", env=env)
    assert code == 0
    assert "Coordinator coord-test" in out
    assert "SERVICE" in out
    echo_line = next(line for line in out.splitlines() if line.startswith("echo "))
    assert echo_line.split()[1:3] == ["1", "1"]
    assert agent.worker_id in out
    assert "admin-token" not in out

    # without the admin token: services only
    code, out, _ = await run_cli("status", env=agent_env(tmp_path, COORDINATOR_URL=coord.url))
    assert code == 0
    assert agent.worker_id not in out

    code, _, err = await run_cli(
        "status", env=agent_env(tmp_path, COORDINATOR_URL=f"http://127.0.0.1:{free_port()}")
    )
    assert code == 1
    assert "rma-worker status" in err


def test_render_status_without_health() -> None:
    from coordinator.protocol import ServicesResponse, ServiceSummary

    text = render_status(
        "http://x",
        None,
        ServicesResponse(
            coordinator_id="c1",
            services=[
                ServiceSummary(name="llm", ready_workers=2, workers=3, models=list("abcdef"))
            ],
        ),
        None,
    )
    assert "coordinator c1" in text
    assert "a, b, c, d, e ..." in text


async def test_local_on_a_busy_port_says_which_setting_to_change(
    tmp_path: Path, reap: list[int]
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = await asyncio.create_subprocess_exec(
            RMA_WORKER,
            "local",
            env=agent_env(tmp_path, COORDINATOR_PORT=str(port)),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        reap.append(proc.pid)
        _, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{port}" in err.decode()
    assert "Set COORDINATOR_PORT to a free port" in err.decode()


async def test_local_runs_a_whole_federation_in_one_process(
    tmp_path: Path, reap: list[int]
) -> None:
    port = free_port()
    env = agent_env(tmp_path, COORDINATOR_PORT=str(port))
    proc = await asyncio.create_subprocess_exec(
        RMA_WORKER,
        "local",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    reap.append(proc.pid)
    assert proc.stdout is not None
    banner = b""
    try:
        async with asyncio.timeout(15):
            while b"Stop with Ctrl-C" not in banner:
                line = await proc.stdout.readline()
                assert line, "rma-worker local exited early"
                banner += line
        text = banner.decode()
        assert f"curl http://127.0.0.1:{port}/service/echo/hello" in text
        assert "echo" in text
        async with (
            aiohttp.ClientSession() as http,
            http.get(f"http://127.0.0.1:{port}/service/echo/hello?x=1") as resp,
        ):
            assert resp.status == 200
            echo = await resp.json()
        assert echo["path"] == "/hello"
        assert echo["query"] == "x=1"
        assert echo["worker_id"].startswith("w-")
    finally:
        proc.send_signal(signal.SIGTERM)
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    assert proc.returncode == 0, err.decode()[-2000:]
    events = [e["event"] for e in read_json_lines(err.decode())]
    assert "unregistered" in events
    assert "coordinator_stopped" in events


async def test_sigterm_drains_an_in_flight_stream_then_unregisters_and_stops_the_tunnel(
    tmp_path: Path,
    coordinator_factory: CoordinatorFactory,
    site_factory: SiteFactory,
    cf_state: Path,
    reap: list[int],
) -> None:
    coord = await coordinator_factory(heartbeat_interval=0.2)
    backend = await site_factory()
    env = agent_env(
        tmp_path,
        COORDINATOR_URL=coord.url,
        SERVICES=f"stream={backend.url}",
        FAKE_CLOUDFLARED_STATE=str(cf_state),
        LOG_LEVEL="info",
    )
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        RMA_WORKER, "run", env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    reap.append(proc.pid)
    registry = coord.coordinator.registry
    try:
        await wait_for(lambda: len(registry) == 1, timeout=15)
        record = next(iter(registry))
        assert time.monotonic() - started < 10
        [cf_pid] = pids_in(cf_state / "starts")
        assert alive(cf_pid)

        chunks: list[bytes] = []
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"{coord.url}/service/stream/stream?n=5&gap=0.3", json={"stream": True}
            ) as resp,
        ):
            assert resp.status == 200
            first = await resp.content.readany()
            chunks.append(first)
            os.kill(proc.pid, signal.SIGTERM)  # mid-stream
            await wait_for(lambda: record.state == "draining", timeout=2)
            async for chunk in resp.content.iter_any():
                chunks.append(chunk)
        body = b"".join(chunks)
        assert body == b"".join(f"data: token-{i}\n\n".encode() for i in range(5))
        _, err = await asyncio.wait_for(proc.communicate(), 10)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode == 0
    assert len(registry) == 0  # unregistered
    assert not alive(cf_pid)  # the tunnel was stopped
    logs = read_json_lines(err.decode())
    events = [e["event"] for e in logs]
    assert events.index("draining") < events.index("unregistered") < events.index("agent_stopped")
    assert "cloudflared_stopped" in events
    # secrets never reach the logs
    identity = json.loads((tmp_path / "agent-state" / "identity.json").read_text())
    text = err.decode()
    assert identity["worker_token"] not in text
    assert record.gateway_key is not None
    assert record.gateway_key not in text


async def test_no_cloudflared_anywhere_is_a_clear_error(tmp_path: Path) -> None:
    env = agent_env(
        tmp_path, CLOUDFLARED_PATH=str(tmp_path / "nope"), PATH=str(tmp_path), LOG_LEVEL="error"
    )
    code, _, err = await run_cli("run", env=env)
    assert code == 1
    assert "CLOUDFLARED_PATH" in err
    assert "no `cloudflared` on PATH" in err
    assert "pycloudflared" in err
    assert "USE_TUNNEL=false" in err
