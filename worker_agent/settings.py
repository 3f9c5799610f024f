"""Worker agent configuration: every knob is an environment variable with a working default.

Names are the upper-case field names, without a prefix (``WORKER_TYPE``, ``COORDINATOR_URL``,
``SERVICES`` ...). ``python -m worker_agent.settings`` prints the README configuration table.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from coordinator.protocol import ID_PATTERN, MAX_CONCURRENCY_CAP, SERVICE_PATTERN

DEFAULT_COORDINATOR_URL = "https://api.rmatool.org.uk"
AgentRole = Literal["auto", "gpu", "cpu", "edge"]


def _check_http_url(value: str, what: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"{what} must be an http(s) URL, got {value!r}")
    if parts.username or parts.password:
        raise ValueError(f"{what} must not carry credentials")
    return value.rstrip("/")


class WorkerSettings(BaseSettings):
    """Read from the environment (names are the upper-case field names, no prefix)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # Role and identity
    worker_type: AgentRole = Field(
        default="auto", description="auto (gpu when a GPU is found, else cpu), gpu, cpu or edge"
    )
    worker_id: str | None = Field(
        default=None,
        pattern=ID_PATTERN,
        description="Stable worker id; generated on first start and kept in STATE_DIR if unset",
    )
    state_dir: Path = Field(
        default=Path("~/.local/state/rma-worker"),
        description="Where the identity (ids and tokens, mode 0600) is persisted",
    )
    coordinator_url: str = Field(
        default=DEFAULT_COORDINATOR_URL,
        description="Router (or coordinator) to register at; in edge mode the router "
        "(empty: standalone)",
    )
    worker_join_token: SecretStr | None = Field(
        default=None, description="Bearer token sent at registration when the federation needs one"
    )
    admin_token: SecretStr | None = Field(
        default=None, description="Admin token: `rma-worker status` lists workers with it"
    )
    federation_join_token: SecretStr | None = Field(
        default=None, description="Bearer token for registering an edge coordinator at the router"
    )

    # Local service gateway
    gateway_host: str = Field(default="127.0.0.1", description="Gateway listen address")
    gateway_port: int = Field(
        default=8000, ge=0, le=65535, description="Gateway port (a free one when busy, tunnelled)"
    )
    gateway_max_inflight: int = Field(
        default=190, ge=1, le=10_000, description="Requests in flight at the gateway (503 beyond)"
    )

    gateway_read_timeout: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Slowloris bound: seconds a client may take to send request headers to the "
        "gateway, and may idle on a keep-alive connection",
    )

    # Services
    services: str = Field(
        default="",
        description="Backends as name=url pairs, comma-separated "
        "(`llm-inference=http://127.0.0.1:11434,ocr=http://127.0.0.1:8104`)",
    )
    echo_service: bool = Field(default=True, description="Offer the built-in `echo` service")
    auto_detect: bool = Field(
        default=True, description="Probe for a local Ollama and OpenAI-compatible server"
    )
    ollama_url: str = Field(
        default="http://127.0.0.1:11434", description="Where to look for Ollama (`/api/tags`)"
    )
    openai_probe_urls: str = Field(
        default="http://127.0.0.1:8001,http://127.0.0.1:1234",
        description="Comma-separated URLs probed for an OpenAI-compatible server (`/v1/models`)",
    )
    auto_service_name: str = Field(
        default="llm-inference",
        pattern=SERVICE_PATTERN,
        description="Service name an auto-detected LLM server is offered as",
    )
    service_max_concurrency: int = Field(
        default=16,
        ge=1,
        le=MAX_CONCURRENCY_CAP,
        description="Concurrent requests per service (503 beyond)",
    )

    # Tunnel
    use_tunnel: bool = Field(default=True, description="Open a Cloudflare tunnel to the gateway")
    tunnel_token: SecretStr | None = Field(
        default=None, description="Named tunnel token (with TUNNEL_URL); quick tunnel when unset"
    )
    tunnel_url: str | None = Field(
        default=None,
        description="Public URL of a named tunnel, or the URL advertised with USE_TUNNEL=false",
    )
    cloudflared_path: str | None = Field(
        default=None, description="cloudflared binary; else `cloudflared` on PATH, else download"
    )
    cloudflared_download: bool = Field(
        default=True, description="Let pycloudflared download cloudflared when none is found"
    )
    tunnel_metrics_url: str | None = Field(
        default=None,
        description="Edge: read the quick-tunnel hostname from this cloudflared metrics server",
    )

    # Heartbeats and lifecycle
    heartbeat_via: Literal["direct", "router"] = Field(
        default="direct", description="Beat `coordinator_url` directly, or through the router"
    )
    failover_after: int = Field(
        default=3, ge=1, le=1000, description="Failed beats in a row before re-registering"
    )
    drain_timeout: float = Field(
        default=30.0, ge=0, le=3600, description="Seconds to finish in-flight requests on SIGTERM"
    )

    # Edge mode
    coordinator_port: int = Field(
        default=8080, ge=0, le=65535, description="Edge/local: port of the in-process coordinator"
    )
    local_coordinator_url: str | None = Field(
        default=None, description="Edge: front this coordinator instead of running one in-process"
    )
    edge_worker: bool = Field(
        default=False, description="Edge: also serve as a compute worker of its own coordinator"
    )

    # Timings (seconds)
    http_timeout: float = Field(
        default=10.0, gt=0, le=300, description="Timeout of one control-plane call"
    )
    register_backoff_initial: float = Field(
        default=1.0, gt=0, le=600, description="First retry delay when registration fails"
    )
    register_backoff_max: float = Field(
        default=60.0, gt=0, le=3600, description="Longest retry delay when registration fails"
    )
    heartbeat_min_interval: float = Field(
        default=1.0, gt=0, le=3600, description="Floor on the heartbeat interval a reply sets"
    )
    backend_check_interval: float = Field(
        default=10.0, gt=0, le=3600, description="Seconds between backend health probes"
    )
    backend_probe_timeout: float = Field(
        default=2.0, gt=0, le=120, description="Timeout of one backend health probe"
    )
    backend_connect_timeout: float = Field(
        default=5.0, gt=0, le=120, description="Gateway: connect to a backend"
    )
    backend_read_timeout: float = Field(
        default=300.0, gt=0, le=86_400, description="Gateway: longest wait for backend bytes"
    )
    tunnel_start_timeout: float = Field(
        default=60.0, gt=0, le=600, description="Wait for a tunnel's URL and readiness"
    )
    tunnel_poll_interval: float = Field(
        default=0.1, gt=0, le=60, description="Poll cadence while a tunnel starts"
    )
    tunnel_metrics_timeout: float = Field(
        default=2.0, gt=0, le=60, description="Timeout of one call to cloudflared's metrics server"
    )
    tunnel_check_interval: float = Field(
        default=5.0, gt=0, le=600, description="Seconds between tunnel watchdog checks"
    )
    tunnel_ready_failures: int = Field(
        default=3, ge=1, le=1000, description="Failed `/ready` checks in a row before a restart"
    )
    tunnel_backoff_initial: float = Field(
        default=1.0, gt=0, le=600, description="First delay before restarting a failed tunnel"
    )
    tunnel_backoff_max: float = Field(
        default=60.0, gt=0, le=3600, description="Longest delay before restarting a tunnel"
    )
    tunnel_stop_timeout: float = Field(
        default=5.0, gt=0, le=120, description="Wait for cloudflared to exit before killing it"
    )

    # Logging
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator("coordinator_url")
    @classmethod
    def _coordinator_url(cls, value: str) -> str:
        if not value.strip():
            return ""
        return _check_http_url(value.strip(), "COORDINATOR_URL")

    @field_validator("local_coordinator_url", "tunnel_metrics_url", "tunnel_url", "ollama_url")
    @classmethod
    def _optional_url(cls, value: str | None) -> str | None:
        if value is None or not value.strip():
            return None
        return _check_http_url(value.strip(), "URL setting")

    @field_validator(
        "worker_id",
        "worker_join_token",
        "admin_token",
        "federation_join_token",
        "tunnel_token",
        mode="before",
    )
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if isinstance(value, str) and not value.strip() else value

    def beat_interval(self, offered: float) -> float:
        """The heartbeat interval to use when a reply offers ``offered`` seconds (bounded)."""
        return min(max(offered, self.heartbeat_min_interval), 3600.0)

    @property
    def probe_urls(self) -> list[str]:
        urls = []
        for part in self.openai_probe_urls.split(","):
            if part.strip():
                urls.append(_check_http_url(part.strip(), "OPENAI_PROBE_URLS"))
        return urls


SECRET_FIELDS = frozenset(
    name
    for name, info in WorkerSettings.model_fields.items()
    if info.annotation == SecretStr | None
)


def _default_text(name: str) -> str:
    info = WorkerSettings.model_fields[name]
    default = info.default
    if default is None:
        return "unset"
    if isinstance(default, bool):
        return "true" if default else "false"
    if default == "":
        return "empty"
    return f"`{default}`"


def markdown_table() -> str:
    """The README configuration table of the worker agent."""
    rows = ["| variable | default | meaning |", "|---|---|---|"]
    for name, info in WorkerSettings.model_fields.items():
        meaning = info.description or {
            "log_level": "`debug`, `info`, `warning` or `error`",
            "log_format": "`json`, `console`, or `auto` (JSON unless stderr is a TTY)",
        }.get(name, "")
        rows.append(f"| `{name.upper()}` | {_default_text(name)} | {meaning} |")
    return "\n".join(rows) + "\n"


if __name__ == "__main__":
    sys.stdout.write(markdown_table())
