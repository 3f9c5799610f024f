"""Configuration: every option an environment variable with a working default."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from worker_agent.settings import DEFAULT_COORDINATOR_URL, WorkerSettings
from worker_agent.tunnel import Tunnel


def test_defaults_work_with_an_empty_environment() -> None:
    s = WorkerSettings()
    assert s.worker_type == "auto"
    assert s.coordinator_url == DEFAULT_COORDINATOR_URL == "https://api.rmatool.org.uk"
    assert s.state_dir == Path("~/.local/state/rma-worker")
    assert (s.gateway_host, s.gateway_port) == ("127.0.0.1", 8000)
    assert s.use_tunnel is True
    assert Tunnel.mode_for(s) == "quick"
    assert s.heartbeat_via == "direct"
    assert s.failover_after == 3
    assert s.drain_timeout == 30
    assert s.coordinator_port == 8080
    assert s.register_backoff_initial == 1
    assert s.register_backoff_max == 60
    assert s.echo_service is True
    assert s.worker_id is None
    assert s.tunnel_token is None


def test_environment_names_have_no_prefix(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {
        "WORKER_TYPE": "gpu",
        "COORDINATOR_URL": "http://127.0.0.1:8080/",
        "STATE_DIR": "/var/lib/rma",
        "SERVICES": "llm-inference=http://127.0.0.1:11434",
        "USE_TUNNEL": "false",
        "TUNNEL_URL": "https://w.example.org",
        "CLOUDFLARED_PATH": "/usr/local/bin/cloudflared",
        "HEARTBEAT_VIA": "router",
        "FAILOVER_AFTER": "5",
        "DRAIN_TIMEOUT": "2.5",
        "COORDINATOR_PORT": "9090",
        "LOCAL_COORDINATOR_URL": "http://coordinator:8080",
        "TUNNEL_METRICS_URL": "http://cloudflared:2000",
        "WORKER_JOIN_TOKEN": "join-0123456789abcdef",
        "ADMIN_TOKEN": "admin-0123456789abcdef",
        "WORKER_ID": "gpu-box-7",
        "GATEWAY_PORT": "8100",
    }
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    s = WorkerSettings()
    assert s.worker_type == "gpu"
    assert s.coordinator_url == "http://127.0.0.1:8080"
    assert s.state_dir == Path("/var/lib/rma")
    assert s.use_tunnel is False
    assert Tunnel.mode_for(s) == "none"
    assert s.heartbeat_via == "router"
    assert s.failover_after == 5
    assert s.drain_timeout == 2.5
    assert s.coordinator_port == 9090
    assert s.local_coordinator_url == "http://coordinator:8080"
    assert s.worker_id == "gpu-box-7"
    assert s.gateway_port == 8100
    assert s.worker_join_token is not None
    assert s.worker_join_token.get_secret_value() == "join-0123456789abcdef"
    assert "join-0123" not in repr(s)
    assert "admin-0123" not in repr(s)


def test_tunnel_modes(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TUNNEL_TOKEN", "t" * 40)
    assert Tunnel.mode_for(WorkerSettings()) == "named"
    monkeypatch.setenv("TUNNEL_METRICS_URL", "http://cloudflared:2000")
    assert Tunnel.mode_for(WorkerSettings()) == "external"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("WORKER_TYPE", "quantum"),
        ("COORDINATOR_URL", "ftp://example.org"),
        ("COORDINATOR_URL", "https://user:pw@example.org"),
        ("WORKER_ID", "../etc/passwd"),
        ("FAILOVER_AFTER", "0"),
        ("GATEWAY_PORT", "70000"),
        ("HEARTBEAT_VIA", "carrier-pigeon"),
        ("TUNNEL_URL", "not a url"),
        ("SERVICE_MAX_CONCURRENCY", "500"),
    ],
)
def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch, name: str, value: str) -> None:
    monkeypatch.setenv(name, value)
    with pytest.raises(ValidationError):
        WorkerSettings()


def test_empty_values_mean_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COORDINATOR_URL", "")
    monkeypatch.setenv("WORKER_ID", "")
    monkeypatch.setenv("TUNNEL_URL", " ")
    for secret in ("TUNNEL_TOKEN", "WORKER_JOIN_TOKEN", "ADMIN_TOKEN", "FEDERATION_JOIN_TOKEN"):
        monkeypatch.setenv(secret, "")  # compose's `${TUNNEL_TOKEN:-}` and `TUNNEL_TOKEN=` lines
    s = WorkerSettings()
    assert s.coordinator_url == ""  # edge mode: standalone, no router
    assert s.worker_id is None
    assert s.tunnel_url is None
    assert (s.tunnel_token, s.worker_join_token, s.admin_token) == (None, None, None)
    assert s.federation_join_token is None
    assert Tunnel.mode_for(s) == "quick"


def test_probe_urls_are_checked(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_PROBE_URLS", "http://127.0.0.1:8001, ,http://127.0.0.1:1234/")
    assert WorkerSettings().probe_urls == ["http://127.0.0.1:8001", "http://127.0.0.1:1234"]
    monkeypatch.setenv("OPENAI_PROBE_URLS", "gopher://x")
    with pytest.raises(ValueError, match="OPENAI_PROBE_URLS"):
        _ = WorkerSettings().probe_urls
