"""The wire contract of the federation, defined once.

Every payload that crosses a process boundary (worker agent <-> coordinator <-> router) is a
pydantic model in this module. The worker agent imports these models; the router validates
against the JSON Schemas exported from them (``python -m coordinator.protocol --export DIR``).
A test fails when the committed schemas drift from the models.

Requests are strict (``extra="forbid"``, bounded lengths and counts); responses are lenient on
read (``extra="ignore"``) so that a newer coordinator can add fields without breaking older agents.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints

PROTOCOL_VERSION = 1

#: Header carrying the per-worker gateway key from the coordinator to the worker's gateway.
GATEWAY_KEY_HEADER = "X-RMA-Gateway-Key"
#: Header carried end to end on every proxied request.
REQUEST_ID_HEADER = "X-Request-Id"
#: Prefix of headers that only the federation itself may set; clients' copies are stripped.
INTERNAL_HEADER_PREFIX = "x-rma-"

ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$"
SERVICE_PATTERN = r"^[a-z0-9][a-z0-9._-]{0,63}$"

Identifier = Annotated[str, StringConstraints(pattern=ID_PATTERN)]
ServiceName = Annotated[str, StringConstraints(pattern=SERVICE_PATTERN)]
ModelName = Annotated[str, StringConstraints(min_length=1, max_length=256)]
ShortText = Annotated[str, StringConstraints(max_length=256)]
Url = Annotated[str, StringConstraints(min_length=8, max_length=2048)]
Secret = Annotated[str, StringConstraints(min_length=16, max_length=256)]

WorkerType = Literal["gpu", "cpu", "edge"]
ServiceStatus = Literal["starting", "ready", "unhealthy"]
WorkerState = Literal["active", "draining"]
#: States as the coordinator reports them (``suspect``: missed beats or strikes, out of routing).
WorkerHealth = Literal["active", "suspect", "draining"]

MAX_CONCURRENCY_CAP = 200  # a quick tunnel allows 200 in-flight requests


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=False)


class _Response(BaseModel):
    model_config = ConfigDict(extra="ignore")


# --------------------------------------------------------------------------------------------
# Capabilities (sent at registration)


class GpuInfo(_Request):
    index: int = Field(ge=0, le=255)
    name: ShortText
    uuid: ShortText = ""
    memory_total_mb: int = Field(ge=0, le=16_777_216)
    memory_free_mb: int = Field(ge=0, le=16_777_216)
    utilization_pct: float | None = Field(default=None, ge=0, le=100)
    temperature_c: float | None = Field(default=None, ge=-50, le=200)
    driver_version: ShortText | None = None
    cuda_driver_version: ShortText | None = None
    compute_capability: Annotated[str, StringConstraints(max_length=16)] | None = None


class Capabilities(_Request):
    gpus: list[GpuInfo] = Field(default_factory=list, max_length=64)
    cpu_cores: int = Field(default=1, ge=1, le=65_536)
    cpu_physical_cores: int | None = Field(default=None, ge=1, le=65_536)
    cpu_usable: float | None = Field(default=None, gt=0, le=65_536)
    cpu_model: ShortText = ""
    ram_total_mb: int = Field(default=0, ge=0, le=1 << 40)
    ram_available_mb: int = Field(default=0, ge=0, le=1 << 40)
    disk_free_mb: int = Field(default=0, ge=0, le=1 << 50)
    os: ShortText = ""
    arch: ShortText = ""
    hostname: ShortText = ""

    @property
    def max_vram_mb(self) -> int:
        return max((g.memory_total_mb for g in self.gpus), default=0)


class ServiceOffer(_Request):
    """A service the worker offers through its gateway."""

    name: ServiceName
    status: ServiceStatus = "ready"
    models: list[ModelName] = Field(default_factory=list, max_length=256)
    max_concurrency: int = Field(default=16, ge=1, le=MAX_CONCURRENCY_CAP)


# --------------------------------------------------------------------------------------------
# Worker <-> coordinator


class WorkerRegisterRequest(_Request):
    """``POST /api/worker/register``.

    ``Authorization: Bearer <WORKER_JOIN_TOKEN>`` when the coordinator requires one.
    Re-registering an existing ``worker_id`` needs its ``worker_token``.
    """

    protocol_version: int = PROTOCOL_VERSION
    worker_id: Identifier | None = None
    worker_token: Secret | None = None
    worker_type: WorkerType
    tunnel_url: Url
    gateway_key: Secret | None = None
    capabilities: Capabilities = Field(default_factory=Capabilities)
    services: list[ServiceOffer] = Field(default_factory=list, max_length=64)
    agent_version: ShortText | None = None


class WorkerRegisterResponse(_Response):
    protocol_version: int = PROTOCOL_VERSION
    worker_id: Identifier
    worker_token: Secret
    coordinator_id: Identifier
    coordinator_url: str
    assigned_services: list[ServiceName]
    heartbeat_interval: float


class GpuLoad(_Request):
    index: int = Field(ge=0, le=255)
    utilization_pct: float | None = Field(default=None, ge=0, le=100)
    memory_free_mb: int | None = Field(default=None, ge=0, le=16_777_216)


class ServiceHealth(_Request):
    name: ServiceName
    status: ServiceStatus
    models: list[ModelName] | None = Field(default=None, max_length=256)


class WorkerHeartbeatRequest(_Request):
    """``POST /api/worker/heartbeat`` with ``Authorization: Bearer <worker_token>``.

    ``coordinator_id`` (from the registration reply) lets the router route a heartbeat sent
    through it; a coordinator answers 404 to a beat addressed to another coordinator.
    """

    protocol_version: int = PROTOCOL_VERSION
    worker_id: Identifier
    coordinator_id: Identifier | None = None
    state: WorkerState = "active"
    active_requests: int = Field(default=0, ge=0, le=1_000_000)
    cpu_pct: float | None = Field(default=None, ge=0, le=100)
    ram_available_mb: int | None = Field(default=None, ge=0, le=1 << 40)
    gpus: list[GpuLoad] = Field(default_factory=list, max_length=64)
    services: list[ServiceHealth] = Field(default_factory=list, max_length=64)


class WorkerHeartbeatResponse(_Response):
    ok: bool = True
    worker_id: Identifier
    coordinator_id: Identifier
    state: WorkerHealth
    assigned_services: list[ServiceName]
    heartbeat_interval: float


# --------------------------------------------------------------------------------------------
# Public and admin views


class ServiceSummary(_Response):
    name: ServiceName
    ready_workers: int
    workers: int
    models: list[str]
    aliases: list[str] = Field(default_factory=list)


class ServicesResponse(_Response):
    coordinator_id: Identifier
    services: list[ServiceSummary]


class WorkerCounts(_Response):
    total: int = 0
    active: int = 0
    suspect: int = 0
    draining: int = 0
    gpu: int = 0
    cpu: int = 0
    edge: int = 0


class HealthResponse(_Response):
    status: Literal["ok"] = "ok"
    coordinator_id: Identifier
    protocol_version: int = PROTOCOL_VERSION
    version: str
    uptime_s: float
    workers: WorkerCounts
    in_flight: int
    services: dict[str, int] = Field(description="ready workers per service")


class WorkerRecordView(_Response):
    """A worker as ``GET /api/workers`` shows it to an admin (never any secret)."""

    worker_id: Identifier
    worker_type: WorkerType
    state: WorkerHealth
    tunnel_url: str
    capabilities: Capabilities
    services: list[ServiceOffer]
    assigned_services: list[ServiceName]
    in_flight: int
    reported_active_requests: int
    cpu_pct: float | None
    strikes: int
    registered_at: float
    last_heartbeat_age_s: float
    agent_version: str | None


class WorkersResponse(_Response):
    coordinator_id: Identifier
    workers: list[WorkerRecordView]


class ErrorResponse(_Response):
    """Every 4xx/5xx answer of every hop: ``{"error": code, "detail": ...}``."""

    error: str
    detail: Any = None
    hop: str | None = None
    worker_id: str | None = None


# --------------------------------------------------------------------------------------------
# Coordinator <-> router


class EdgeServiceSummary(_Request):
    name: ServiceName
    ready_workers: int = Field(ge=0, le=1_000_000)
    models: list[ModelName] = Field(default_factory=list, max_length=512)
    #: Other names the coordinator resolves to this service (``llm`` for ``llm-inference``), so
    #: that the router routes ``/service/llm/...`` to coordinators that have ``llm-inference``.
    aliases: list[ServiceName] = Field(default_factory=list, max_length=16)


class EdgeRegisterRequest(_Request):
    """``POST router/api/edge/register`` (``Authorization: Bearer <FEDERATION_JOIN_TOKEN>``)."""

    protocol_version: int = PROTOCOL_VERSION
    coordinator_id: Identifier
    tunnel_url: Url
    coordinator_secret: Secret | None = None
    version: ShortText | None = None


class EdgeRegisterResponse(_Response):
    coordinator_id: Identifier
    coordinator_secret: Secret
    heartbeat_interval: float


class EdgeHeartbeatRequest(_Request):
    """``POST router/api/edge/heartbeat`` with ``Authorization: Bearer <coordinator_secret>``."""

    protocol_version: int = PROTOCOL_VERSION
    coordinator_id: Identifier
    state: WorkerState = "active"
    workers: int = Field(default=0, ge=0, le=10_000_000)
    services: list[EdgeServiceSummary] = Field(default_factory=list, max_length=512)
    load: float = Field(default=0.0, ge=0, le=1)
    in_flight: int = Field(default=0, ge=0, le=10_000_000)


#: Models exported as JSON Schema files, by file stem.
EXPORTED: dict[str, type[BaseModel]] = {
    "worker_register_request": WorkerRegisterRequest,
    "worker_register_response": WorkerRegisterResponse,
    "worker_heartbeat_request": WorkerHeartbeatRequest,
    "worker_heartbeat_response": WorkerHeartbeatResponse,
    "services_response": ServicesResponse,
    "health_response": HealthResponse,
    "error_response": ErrorResponse,
    "edge_register_request": EdgeRegisterRequest,
    "edge_register_response": EdgeRegisterResponse,
    "edge_heartbeat_request": EdgeHeartbeatRequest,
}

SCHEMA_DIR = Path(__file__).parent / "schemas"


def json_schemas() -> dict[str, dict[str, Any]]:
    """The JSON Schema of every exported model, by file stem."""
    out: dict[str, dict[str, Any]] = {}
    for stem, model in EXPORTED.items():
        schema = model.model_json_schema(mode="validation")
        schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
        schema["$id"] = f"https://api.rmatool.org.uk/schemas/v{PROTOCOL_VERSION}/{stem}.json"
        out[stem] = schema
    return out


def render_schema(schema: dict[str, Any]) -> str:
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def export(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for stem, schema in json_schemas().items():
        path = directory / f"{stem}.json"
        path.write_text(render_schema(schema), encoding="utf-8")
        written.append(path)
    return written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m coordinator.protocol")
    parser.add_argument(
        "--export", metavar="DIR", type=Path, default=None, help="write JSON Schemas to DIR"
    )
    args = parser.parse_args(argv)
    target: Path = args.export or SCHEMA_DIR
    for path in export(target):
        sys.stdout.write(f"{path}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
