"""Realistic wire payloads, built from the real contract (``coordinator.protocol``)."""

from __future__ import annotations

from coordinator.protocol import (
    Capabilities,
    ServiceHealth,
    ServiceOffer,
    WorkerHeartbeatRequest,
    WorkerRegisterRequest,
)

GATEWAY_KEY = "bench-gateway-key-0123456789abcdef"
_ID_SENTINEL = "WORKERIDSENTINEL"


def register_request(i: int, tunnel_url: str) -> WorkerRegisterRequest:
    """Worker ``i``: a CPU worker offering ``echo``, as a worker agent would describe itself."""
    return WorkerRegisterRequest(
        worker_type="cpu",
        tunnel_url=tunnel_url,
        gateway_key=GATEWAY_KEY,
        capabilities=Capabilities(
            cpu_cores=16,
            cpu_physical_cores=8,
            cpu_usable=16.0,
            cpu_model="AMD Ryzen 7 5800X 8-Core Processor",
            ram_total_mb=32_012,
            ram_available_mb=24_310 + i % 997,
            disk_free_mb=412_000 + i % 9973,
            os="Linux",
            arch="x86_64",
            hostname=f"volunteer-host-{i:06d}",
        ),
        services=[ServiceOffer(name="echo", max_concurrency=200)],
        agent_version="0.1.0",
    )


def register_json(i: int, tunnel_url: str) -> bytes:
    return register_request(i, tunnel_url).model_dump_json(exclude_none=True).encode()


def heartbeat_request(worker_id: str) -> WorkerHeartbeatRequest:
    return WorkerHeartbeatRequest(
        worker_id=worker_id,
        state="active",
        active_requests=0,
        cpu_pct=12.5,
        ram_available_mb=24_310,
        services=[ServiceHealth(name="echo", status="ready")],
    )


def heartbeat_json(worker_id: str) -> bytes:
    return heartbeat_request(worker_id).model_dump_json(exclude_none=True).encode()


def heartbeat_template() -> tuple[str, str]:
    """A heartbeat body split around the worker id: ``prefix + worker_id + suffix``."""
    text = heartbeat_json(_ID_SENTINEL).decode()
    prefix, sep, suffix = text.partition(_ID_SENTINEL)
    if not sep or _ID_SENTINEL in suffix:
        raise AssertionError("the heartbeat body template is ambiguous")
    return prefix, suffix
