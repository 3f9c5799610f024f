"""Coordinator configuration: every knob is an environment variable with a working default."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from coordinator.forwarding import DEFAULT_TRUSTED_PROXIES, Network, parse_networks


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class CoordinatorSettings(BaseSettings):
    """Read from the environment (names are the upper-case field names, no prefix)."""

    model_config = SettingsConfigDict(env_prefix="", case_sensitive=False, extra="ignore")

    # Identity and listening address
    coordinator_id: str | None = Field(
        default=None, description="Stable id; generated and persisted in the state dir if unset"
    )
    coordinator_host: str = Field(default="0.0.0.0", description="Listen address")
    coordinator_port: int = Field(default=8080, ge=0, le=65535, description="Listen port")
    coordinator_public_url: str | None = Field(
        default=None,
        description="URL workers use for heartbeats; derived from the request when unset",
    )
    coordinator_state_dir: Path = Field(
        default=Path("~/.local/state/rma-coordinator"),
        description="Where the generated coordinator id is persisted",
    )

    # Timings (seconds)
    heartbeat_interval: float = Field(
        default=15.0, gt=0, le=3600, description="Interval workers are told to beat at"
    )
    suspect_after: float = Field(
        default=3.0, gt=0, description="Missed intervals before a worker leaves routing"
    )
    remove_after: float = Field(
        default=120.0, gt=0, description="Seconds without a beat before a worker is removed"
    )
    sweep_interval: float = Field(default=1.0, gt=0, description="Expiry sweep period")

    # Auth
    worker_join_token: SecretStr | None = Field(
        default=None, description="Required (Bearer) to register a new worker when set"
    )
    admin_token: SecretStr | None = Field(
        default=None, description="Bearer token for admin endpoints (GET /api/workers)"
    )

    # Tunnel URL policy
    allowed_tunnel_suffixes: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: [".trycloudflare.com"],
        description="Comma-separated host suffixes a worker tunnel_url may use",
    )
    dev_allow_loopback: bool = Field(
        default=False, description="Accept http://127.0.0.1:<port> tunnel URLs (local dev only)"
    )

    # Limits
    max_control_body: int = Field(
        default=64 * 1024, ge=1024, description="Max bytes of a register/heartbeat body"
    )
    max_model_sniff_body: int = Field(
        default=1024 * 1024, ge=0, description="JSON bodies up to this size are read for 'model'"
    )
    client_read_timeout: float = Field(
        default=60.0,
        gt=0,
        le=3600,
        description="Slowloris bound: seconds a client may take to send its request headers "
        "(or a control-plane body), and may idle on a keep-alive connection",
    )
    max_workers: int = Field(default=200_000, ge=1, description="Registry capacity")
    register_rate_limit: float = Field(
        default=0.0,
        ge=0,
        description="Registrations per second accepted (burst of one second's worth); beyond, "
        "503 + Retry-After sheds a thundering herd (0: unlimited)",
    )
    max_inflight: int = Field(
        default=180, ge=1, description="Proxied requests in flight, all workers together"
    )
    max_services_per_worker: int = Field(
        default=8, ge=1, le=64, description="Services assigned to one worker at most"
    )

    # Proxy
    proxy_connect_timeout: float = Field(default=5.0, gt=0, description="Connect to a worker")
    proxy_ttfb_timeout: float = Field(
        default=300.0, gt=0, description="Wait for response headers, and max gap in a stream"
    )
    proxy_retries: int = Field(default=1, ge=0, le=5, description="Retries on another worker")
    strike_limit: int = Field(
        default=3, ge=1, description="Failed connections before a worker is suspect"
    )
    retry_after: int = Field(default=1, ge=1, description="Retry-After seconds on 503")

    trusted_proxies: Annotated[tuple[Network, ...], NoDecode] = Field(
        default_factory=lambda: parse_networks(DEFAULT_TRUSTED_PROXIES.split(",")),
        description="Comma-separated IPs/CIDRs of the peers (cloudflared) whose CF-Connecting-IP "
        "and CF-Ray are believed; from any other peer they are ignored (empty: trust nobody)",
    )

    # Service catalog
    service_catalog_file: Path | None = Field(
        default=None, description="JSON file replacing the built-in service catalog"
    )
    catalog_allow_unlisted: bool = Field(
        default=False, description="Assign offered services that the catalog does not list"
    )

    # Logging
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["auto", "json", "console"] = "auto"

    @field_validator("allowed_tunnel_suffixes", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("trusted_proxies", mode="before")
    @classmethod
    def _networks(cls, value: object) -> object:
        value = _split_csv(value)
        if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
            return parse_networks(value)
        return value

    @property
    def suspect_after_s(self) -> float:
        return self.suspect_after * self.heartbeat_interval
