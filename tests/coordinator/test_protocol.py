"""The wire contract: round trips, identifier patterns, strictness, bounds and schema drift."""

from __future__ import annotations

import copy
import json
import re
from typing import Any

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from coordinator import protocol
from coordinator.protocol import (
    EXPORTED,
    ID_PATTERN,
    MAX_CONCURRENCY_CAP,
    PROTOCOL_VERSION,
    SCHEMA_DIR,
    SERVICE_PATTERN,
    Capabilities,
    EdgeHeartbeatRequest,
    EdgeRegisterRequest,
    EdgeRegisterResponse,
    EdgeServiceSummary,
    ErrorResponse,
    GpuInfo,
    GpuLoad,
    HealthResponse,
    ServiceHealth,
    ServiceOffer,
    ServicesResponse,
    ServiceSummary,
    WorkerCounts,
    WorkerHeartbeatRequest,
    WorkerHeartbeatResponse,
    WorkerRecordView,
    WorkerRegisterRequest,
    WorkerRegisterResponse,
    json_schemas,
    render_schema,
)

PROPS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# Oracles written independently of the regex engine pydantic uses (fullmatch: no "$\n" slack).
ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
SERVICE_RE = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")

SECRET = "s" * 32
URL = "https://abc-def.trycloudflare.com"

# --------------------------------------------------------------------------------------------
# Strategies

ids = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}", fullmatch=True)
service_names = st.from_regex(r"[a-z0-9][a-z0-9._-]{0,63}", fullmatch=True)
short_text = st.text(max_size=256)
model_names = st.text(min_size=1, max_size=256)
secrets_ = st.text(min_size=16, max_size=256)
urls = st.text(min_size=8, max_size=300) | st.text(min_size=2040, max_size=2048)
finite = st.floats(allow_nan=False, allow_infinity=False)
mb = st.integers(0, 16_777_216)
big_mb = st.integers(0, 1 << 40)


def optional(strategy: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    return st.none() | strategy


gpu_infos = st.builds(
    GpuInfo,
    index=st.integers(0, 255),
    name=short_text,
    uuid=short_text,
    memory_total_mb=mb,
    memory_free_mb=mb,
    utilization_pct=optional(st.floats(0, 100)),
    temperature_c=optional(st.floats(-50, 200)),
    driver_version=optional(short_text),
    cuda_driver_version=optional(short_text),
    compute_capability=optional(st.text(max_size=16)),
)

capabilities = st.builds(
    Capabilities,
    gpus=st.lists(gpu_infos, max_size=3),
    cpu_cores=st.integers(1, 65_536),
    cpu_physical_cores=optional(st.integers(1, 65_536)),
    cpu_usable=optional(st.floats(0, 65_536, exclude_min=True)),
    cpu_model=short_text,
    ram_total_mb=big_mb,
    ram_available_mb=big_mb,
    disk_free_mb=st.integers(0, 1 << 50),
    os=short_text,
    arch=short_text,
    hostname=short_text,
)

statuses = st.sampled_from(["starting", "ready", "unhealthy"])

service_offers = st.builds(
    ServiceOffer,
    name=service_names,
    status=statuses,
    models=st.lists(model_names, max_size=4),
    max_concurrency=st.integers(1, MAX_CONCURRENCY_CAP),
)

worker_register_requests = st.builds(
    WorkerRegisterRequest,
    protocol_version=st.integers(-(2**31), 2**31),
    worker_id=optional(ids),
    worker_token=optional(secrets_),
    worker_type=st.sampled_from(["gpu", "cpu", "edge"]),
    tunnel_url=urls,
    gateway_key=optional(secrets_),
    capabilities=capabilities,
    services=st.lists(service_offers, max_size=4),
    agent_version=optional(short_text),
)

gpu_loads = st.builds(
    GpuLoad,
    index=st.integers(0, 255),
    utilization_pct=optional(st.floats(0, 100)),
    memory_free_mb=optional(mb),
)

service_healths = st.builds(
    ServiceHealth,
    name=service_names,
    status=statuses,
    models=optional(st.lists(model_names, max_size=4)),
)

worker_heartbeat_requests = st.builds(
    WorkerHeartbeatRequest,
    worker_id=ids,
    coordinator_id=optional(ids),
    state=st.sampled_from(["active", "draining"]),
    active_requests=st.integers(0, 1_000_000),
    cpu_pct=optional(st.floats(0, 100)),
    ram_available_mb=optional(big_mb),
    gpus=st.lists(gpu_loads, max_size=4),
    services=st.lists(service_healths, max_size=4),
)

edge_service_summaries = st.builds(
    EdgeServiceSummary,
    name=service_names,
    ready_workers=st.integers(0, 1_000_000),
    models=st.lists(model_names, max_size=4),
)

edge_register_requests = st.builds(
    EdgeRegisterRequest,
    coordinator_id=ids,
    tunnel_url=urls,
    coordinator_secret=optional(secrets_),
    version=optional(short_text),
)

edge_heartbeat_requests = st.builds(
    EdgeHeartbeatRequest,
    coordinator_id=ids,
    state=st.sampled_from(["active", "draining"]),
    workers=st.integers(0, 10_000_000),
    services=st.lists(edge_service_summaries, max_size=4),
    load=st.floats(0, 1),
    in_flight=st.integers(0, 10_000_000),
)

worker_register_responses = st.builds(
    WorkerRegisterResponse,
    worker_id=ids,
    worker_token=secrets_,
    coordinator_id=ids,
    coordinator_url=st.text(max_size=100),
    assigned_services=st.lists(service_names, max_size=4),
    heartbeat_interval=finite,
)

worker_heartbeat_responses = st.builds(
    WorkerHeartbeatResponse,
    ok=st.booleans(),
    worker_id=ids,
    coordinator_id=ids,
    state=st.sampled_from(["active", "suspect", "draining"]),
    assigned_services=st.lists(service_names, max_size=4),
    heartbeat_interval=finite,
)

counts = st.integers(0, 10**9)

service_summaries = st.builds(
    ServiceSummary,
    name=service_names,
    ready_workers=counts,
    workers=counts,
    models=st.lists(st.text(max_size=40), max_size=4),
    aliases=st.lists(st.text(max_size=40), max_size=4),
)

services_responses = st.builds(
    ServicesResponse,
    coordinator_id=ids,
    services=st.lists(service_summaries, max_size=4),
)

worker_counts = st.builds(
    WorkerCounts,
    total=counts,
    active=counts,
    suspect=counts,
    draining=counts,
    gpu=counts,
    cpu=counts,
    edge=counts,
)

health_responses = st.builds(
    HealthResponse,
    coordinator_id=ids,
    version=st.text(max_size=40),
    uptime_s=finite,
    workers=worker_counts,
    in_flight=counts,
    services=st.dictionaries(st.text(max_size=40), counts, max_size=4),
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | finite | st.text(max_size=40),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)

error_responses = st.builds(
    ErrorResponse,
    error=st.text(max_size=60),
    detail=json_values,
    hop=optional(st.text(max_size=20)),
    worker_id=optional(st.text(max_size=64)),
)

edge_register_responses = st.builds(
    EdgeRegisterResponse,
    coordinator_id=ids,
    coordinator_secret=secrets_,
    heartbeat_interval=finite,
)

worker_record_views = st.builds(
    WorkerRecordView,
    worker_id=ids,
    worker_type=st.sampled_from(["gpu", "cpu", "edge"]),
    state=st.sampled_from(["active", "suspect", "draining"]),
    tunnel_url=st.text(max_size=100),
    capabilities=capabilities,
    services=st.lists(service_offers, max_size=3),
    assigned_services=st.lists(service_names, max_size=3),
    in_flight=counts,
    reported_active_requests=counts,
    cpu_pct=optional(st.floats(0, 100)),
    strikes=counts,
    registered_at=finite,
    last_heartbeat_age_s=finite,
    agent_version=optional(st.text(max_size=40)),
)

ANY_MODEL = st.one_of(
    gpu_infos,
    capabilities,
    service_offers,
    worker_register_requests,
    gpu_loads,
    service_healths,
    worker_heartbeat_requests,
    edge_service_summaries,
    edge_register_requests,
    edge_heartbeat_requests,
    worker_register_responses,
    worker_heartbeat_responses,
    service_summaries,
    services_responses,
    worker_counts,
    health_responses,
    error_responses,
    edge_register_responses,
    worker_record_views,
)

# Minimal valid payloads for every request model (the extra-field and bounds tests start here).
MINIMAL: dict[type[BaseModel], dict[str, Any]] = {
    GpuInfo: {"index": 0, "name": "RTX", "memory_total_mb": 8000, "memory_free_mb": 7000},
    Capabilities: {},
    ServiceOffer: {"name": "echo"},
    WorkerRegisterRequest: {"worker_type": "cpu", "tunnel_url": URL},
    GpuLoad: {"index": 0},
    ServiceHealth: {"name": "echo", "status": "ready"},
    WorkerHeartbeatRequest: {"worker_id": "w-1"},
    EdgeServiceSummary: {"name": "echo", "ready_workers": 1},
    EdgeRegisterRequest: {"coordinator_id": "coord-1", "tunnel_url": URL},
    EdgeHeartbeatRequest: {"coordinator_id": "coord-1"},
}
REQUEST_MODELS = list(MINIMAL)

REQUEST_SCHEMAS = [
    "worker_register_request",
    "worker_heartbeat_request",
    "edge_register_request",
    "edge_heartbeat_request",
]
RESPONSE_SCHEMAS = [stem for stem in EXPORTED if stem not in REQUEST_SCHEMAS]


def validator(stem: str) -> jsonschema.protocols.Validator:
    schema = json.loads((SCHEMA_DIR / f"{stem}.json").read_text(encoding="utf-8"))
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


VALIDATORS = {stem: validator(stem) for stem in EXPORTED}
STEM_OF = {model: stem for stem, model in EXPORTED.items()}


# --------------------------------------------------------------------------------------------
# Round trips


@PROPS
@given(ANY_MODEL)
def test_valid_instances_round_trip_through_json(instance: BaseModel) -> None:
    cls = type(instance)
    text = instance.model_dump_json()
    again = cls.model_validate_json(text)
    assert again == instance
    assert again.model_dump_json() == text
    # The python dump round-trips too (what the agent builds before sending).
    assert cls.model_validate(instance.model_dump()) == instance


@PROPS
@given(
    st.one_of(
        worker_register_requests,
        worker_heartbeat_requests,
        edge_register_requests,
        edge_heartbeat_requests,
        worker_register_responses,
        worker_heartbeat_responses,
        services_responses,
        health_responses,
        error_responses,
        edge_register_responses,
    )
)
def test_valid_instances_satisfy_the_exported_schema(instance: BaseModel) -> None:
    """What the models emit, the router's schema validation accepts."""
    VALIDATORS[STEM_OF[type(instance)]].validate(json.loads(instance.model_dump_json()))


def test_defaults_and_protocol_version() -> None:
    req = WorkerRegisterRequest(worker_type="gpu", tunnel_url=URL)
    assert req.protocol_version == PROTOCOL_VERSION == 1
    assert req.capabilities == Capabilities()
    assert req.services == []
    assert req.worker_id is None
    assert ServiceOffer(name="echo").max_concurrency == 16
    assert ServiceOffer(name="echo").status == "ready"
    beat = WorkerHeartbeatRequest(worker_id="w")
    assert (beat.state, beat.active_requests, beat.gpus, beat.services) == ("active", 0, [], [])


def test_max_vram_is_the_largest_gpu() -> None:
    assert Capabilities().max_vram_mb == 0
    gpus = [
        GpuInfo(index=i, name="g", memory_total_mb=m, memory_free_mb=0)
        for i, m in enumerate([4000, 24000, 8000])
    ]
    assert Capabilities(gpus=gpus).max_vram_mb == 24000


# --------------------------------------------------------------------------------------------
# Identifier and service-name patterns


@pytest.mark.parametrize(
    ("value", "ok"),
    [
        ("a", True),
        ("A", True),
        ("0", True),
        ("worker-1", True),
        ("w.orker_1-x", True),
        ("a" * 64, True),
        ("a" * 65, False),
        ("", False),
        ("-a", False),
        (".a", False),
        ("_a", False),
        ("a b", False),
        ("a/b", False),
        ("a\n", False),
        ("\na", False),
        ("a\x00", False),
        ("é", False),
        ("aé", False),
        ("a:b", False),
        ("a@b", False),
        ("a+b", False),
        ("\uff41", False),  # fullwidth a
        ("\u0661", False),  # Arabic-Indic digit one
    ],
)
def test_identifier_examples(value: str, ok: bool) -> None:
    assert bool(ID_RE.fullmatch(value)) is ok
    for build in (
        lambda v: WorkerHeartbeatRequest(worker_id=v),
        lambda v: EdgeRegisterRequest(coordinator_id=v, tunnel_url=URL),
        lambda v: WorkerRegisterRequest(worker_id=v, worker_type="cpu", tunnel_url=URL),
    ):
        if ok:
            build(value)
        else:
            with pytest.raises(ValidationError):
                build(value)


@PROPS
@given(ids)
def test_ids_matching_the_pattern_are_accepted(value: str) -> None:
    assert re.fullmatch(ID_PATTERN.removeprefix("^").removesuffix("$"), value)
    assert WorkerHeartbeatRequest(worker_id=value).worker_id == value
    loaded = WorkerHeartbeatRequest.model_validate_json(json.dumps({"worker_id": value}))
    assert loaded.worker_id == value


@PROPS
@given(st.text(max_size=80) | st.from_regex(ID_PATTERN))
def test_ids_are_accepted_exactly_when_they_match(value: str) -> None:
    ok = ID_RE.fullmatch(value) is not None
    try:
        WorkerHeartbeatRequest.model_validate_json(json.dumps({"worker_id": value}))
    except ValidationError:
        accepted = False
    else:
        accepted = True
    assert accepted is ok, value


@PROPS
@given(st.text(max_size=80) | st.from_regex(SERVICE_PATTERN))
def test_service_names_are_accepted_exactly_when_they_match(value: str) -> None:
    ok = SERVICE_RE.fullmatch(value) is not None
    for cls, extra in ((ServiceOffer, {}), (ServiceHealth, {"status": "ready"})):
        try:
            cls.model_validate({"name": value, **extra})
        except ValidationError:
            accepted = False
        else:
            accepted = True
        assert accepted is ok, value


@pytest.mark.parametrize("name", ["Echo", "LLM", "-echo", "echo/x", "echo ", "a" * 65, ""])
def test_service_names_are_lowercase_and_bounded(name: str) -> None:
    with pytest.raises(ValidationError):
        ServiceOffer(name=name)


# --------------------------------------------------------------------------------------------
# Strict requests, lenient responses


@pytest.mark.parametrize("model", REQUEST_MODELS, ids=lambda m: m.__name__)
def test_request_models_accept_their_minimal_payload(model: type[BaseModel]) -> None:
    model.model_validate(MINIMAL[model])
    model.model_validate_json(json.dumps(MINIMAL[model]))


@pytest.mark.parametrize("model", REQUEST_MODELS, ids=lambda m: m.__name__)
def test_request_models_reject_extra_fields(model: type[BaseModel]) -> None:
    with pytest.raises(ValidationError) as info:
        model.model_validate_json(json.dumps({**MINIMAL[model], "unexpected": 1}))
    assert info.value.errors()[0]["type"] == "extra_forbidden"


@PROPS
@given(
    st.sampled_from(REQUEST_MODELS),
    st.text(min_size=1, max_size=20),
    json_values,
)
def test_any_unknown_key_is_rejected_on_requests(
    model: type[BaseModel], key: str, value: Any
) -> None:
    if key in model.model_fields:
        return
    with pytest.raises(ValidationError):
        model.model_validate({**MINIMAL[model], key: value})


@pytest.mark.parametrize(
    "payload",
    [
        {"capabilities": {"gpus": [{**MINIMAL[GpuInfo], "extra": 1}]}},
        {"capabilities": {"cpu_cores": 2, "extra": 1}},
        {"services": [{"name": "echo", "extra": 1}]},
    ],
)
def test_nested_extra_fields_are_rejected(payload: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        WorkerRegisterRequest.model_validate({**MINIMAL[WorkerRegisterRequest], **payload})


def test_nested_heartbeat_extra_fields_are_rejected() -> None:
    with pytest.raises(ValidationError):
        WorkerHeartbeatRequest.model_validate({"worker_id": "w", "gpus": [{"index": 0, "x": 1}]})
    with pytest.raises(ValidationError):
        WorkerHeartbeatRequest.model_validate(
            {"worker_id": "w", "services": [{"name": "echo", "status": "ready", "x": 1}]}
        )
    with pytest.raises(ValidationError):
        EdgeHeartbeatRequest.model_validate(
            {"coordinator_id": "c", "services": [{"name": "e", "ready_workers": 0, "x": 1}]}
        )


def test_responses_ignore_unknown_fields() -> None:
    body = {
        "worker_id": "w",
        "worker_token": SECRET,
        "coordinator_id": "c",
        "coordinator_url": URL,
        "assigned_services": ["echo"],
        "heartbeat_interval": 5.0,
        "added_in_a_newer_coordinator": {"x": 1},
    }
    reply = WorkerRegisterResponse.model_validate_json(json.dumps(body))
    assert reply.worker_id == "w"
    assert "added_in_a_newer_coordinator" not in reply.model_dump()
    err = ErrorResponse.model_validate({"error": "x", "request_id": "r"})
    assert err.error == "x"


def test_enumerations_are_closed() -> None:
    with pytest.raises(ValidationError):
        WorkerRegisterRequest(worker_type="tpu", tunnel_url=URL)  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        WorkerHeartbeatRequest(worker_id="w", state="suspect")  # type: ignore[arg-type]
    with pytest.raises(ValidationError):
        ServiceOffer(name="echo", status="up")  # type: ignore[arg-type]


# --------------------------------------------------------------------------------------------
# Bounds


@PROPS
@given(st.integers(-1000, 1000))
def test_max_concurrency_bounds(value: int) -> None:
    if 1 <= value <= MAX_CONCURRENCY_CAP:
        assert ServiceOffer(name="echo", max_concurrency=value).max_concurrency == value
    else:
        with pytest.raises(ValidationError):
            ServiceOffer(name="echo", max_concurrency=value)


@pytest.mark.parametrize(("value", "ok"), [(0, False), (1, True), (200, True), (201, False)])
def test_max_concurrency_edges(value: int, ok: bool) -> None:
    payload = json.dumps({"name": "echo", "max_concurrency": value})
    if ok:
        ServiceOffer.model_validate_json(payload)
    else:
        with pytest.raises(ValidationError):
            ServiceOffer.model_validate_json(payload)


def _offers(n: int) -> list[dict[str, Any]]:
    return [{"name": f"svc-{i}"} for i in range(n)]


def _gpus(n: int) -> list[dict[str, Any]]:
    return [{**MINIMAL[GpuInfo], "index": i % 256} for i in range(n)]


# (model, base payload, field, function building a value of size n, max allowed size)
LIST_CAPS: list[tuple[type[BaseModel], dict[str, Any], str, Any, int]] = [
    (WorkerRegisterRequest, MINIMAL[WorkerRegisterRequest], "services", _offers, 64),
    (Capabilities, {}, "gpus", _gpus, 64),
    (ServiceOffer, {"name": "echo"}, "models", lambda n: [f"m{i}" for i in range(n)], 256),
    (
        ServiceHealth,
        {"name": "echo", "status": "ready"},
        "models",
        lambda n: [f"m{i}" for i in range(n)],
        256,
    ),
    (WorkerHeartbeatRequest, {"worker_id": "w"}, "gpus", lambda n: [{"index": 0}] * n, 64),
    (
        WorkerHeartbeatRequest,
        {"worker_id": "w"},
        "services",
        lambda n: [{"name": "echo", "status": "ready"}] * n,
        64,
    ),
    (
        EdgeHeartbeatRequest,
        {"coordinator_id": "c"},
        "services",
        lambda n: [{"name": "echo", "ready_workers": 0}] * n,
        512,
    ),
    (
        EdgeServiceSummary,
        {"name": "echo", "ready_workers": 0},
        "models",
        lambda n: [f"m{i}" for i in range(n)],
        512,
    ),
]


@pytest.mark.parametrize(
    ("model", "base", "field", "make", "cap"),
    LIST_CAPS,
    ids=[f"{m.__name__}.{f}" for m, _, f, _, _ in LIST_CAPS],
)
def test_list_length_caps(
    model: type[BaseModel], base: dict[str, Any], field: str, make: Any, cap: int
) -> None:
    model.model_validate_json(json.dumps({**base, field: make(cap)}))
    with pytest.raises(ValidationError) as info:
        model.model_validate_json(json.dumps({**base, field: make(cap + 1)}))
    assert any(e["type"] == "too_long" for e in info.value.errors())


# (model, base payload, field, min length, max length)
STRING_CAPS: list[tuple[type[BaseModel], dict[str, Any], str, int, int]] = [
    (WorkerRegisterRequest, MINIMAL[WorkerRegisterRequest], "tunnel_url", 8, 2048),
    (WorkerRegisterRequest, MINIMAL[WorkerRegisterRequest], "worker_token", 16, 256),
    (WorkerRegisterRequest, MINIMAL[WorkerRegisterRequest], "gateway_key", 16, 256),
    (WorkerRegisterRequest, MINIMAL[WorkerRegisterRequest], "agent_version", 0, 256),
    (EdgeRegisterRequest, MINIMAL[EdgeRegisterRequest], "tunnel_url", 8, 2048),
    (EdgeRegisterRequest, MINIMAL[EdgeRegisterRequest], "coordinator_secret", 16, 256),
    (EdgeRegisterRequest, MINIMAL[EdgeRegisterRequest], "version", 0, 256),
    (Capabilities, {}, "cpu_model", 0, 256),
    (Capabilities, {}, "hostname", 0, 256),
    (Capabilities, {}, "os", 0, 256),
    (Capabilities, {}, "arch", 0, 256),
    (GpuInfo, MINIMAL[GpuInfo], "name", 0, 256),
    (GpuInfo, MINIMAL[GpuInfo], "uuid", 0, 256),
    (GpuInfo, MINIMAL[GpuInfo], "driver_version", 0, 256),
    (GpuInfo, MINIMAL[GpuInfo], "compute_capability", 0, 16),
]


@pytest.mark.parametrize(
    ("model", "base", "field", "low", "high"),
    STRING_CAPS,
    ids=[f"{m.__name__}.{f}" for m, _, f, _, _ in STRING_CAPS],
)
def test_string_length_caps(
    model: type[BaseModel], base: dict[str, Any], field: str, low: int, high: int
) -> None:
    def check(n: int, ok: bool, char: str = "x") -> None:
        payload = json.dumps({**base, field: char * n})
        if ok:
            model.model_validate_json(payload)
        else:
            with pytest.raises(ValidationError):
                model.model_validate_json(payload)

    check(low, True)
    check(high, True)
    check(high, True, "é")  # lengths count characters, not bytes
    check(high + 1, False)
    check(high * 10, False)
    if low > 0:
        check(low - 1, False)


@pytest.mark.parametrize("name", ["", "m" * 257], ids=["empty", "too-long"])
def test_model_names_are_bounded(name: str) -> None:
    with pytest.raises(ValidationError):
        ServiceOffer(name="echo", models=[name])
    with pytest.raises(ValidationError):
        ServiceHealth(name="echo", status="ready", models=[name])
    assert ServiceOffer(name="echo", models=["m" * 256]).models == ["m" * 256]


@pytest.mark.parametrize(
    ("model", "base", "field", "low", "high"),
    [
        (GpuInfo, MINIMAL[GpuInfo], "index", 0, 255),
        (GpuInfo, MINIMAL[GpuInfo], "memory_total_mb", 0, 16_777_216),
        (GpuInfo, MINIMAL[GpuInfo], "utilization_pct", 0, 100),
        (GpuInfo, MINIMAL[GpuInfo], "temperature_c", -50, 200),
        (Capabilities, {}, "cpu_cores", 1, 65_536),
        (Capabilities, {}, "ram_total_mb", 0, 1 << 40),
        (GpuLoad, {}, "index", 0, 255),
        (GpuLoad, {"index": 0}, "utilization_pct", 0, 100),
        (WorkerHeartbeatRequest, {"worker_id": "w"}, "active_requests", 0, 1_000_000),
        (WorkerHeartbeatRequest, {"worker_id": "w"}, "cpu_pct", 0, 100),
        (EdgeServiceSummary, {"name": "e"}, "ready_workers", 0, 1_000_000),
        (EdgeHeartbeatRequest, {"coordinator_id": "c"}, "load", 0, 1),
        (EdgeHeartbeatRequest, {"coordinator_id": "c"}, "workers", 0, 10_000_000),
        (EdgeHeartbeatRequest, {"coordinator_id": "c"}, "in_flight", 0, 10_000_000),
    ],
)
def test_numeric_bounds(
    model: type[BaseModel], base: dict[str, Any], field: str, low: int, high: int
) -> None:
    model.model_validate({**base, field: low})
    model.model_validate({**base, field: high})
    for bad in (low - 1, high + 1):
        with pytest.raises(ValidationError):
            model.model_validate({**base, field: bad})


def test_cpu_usable_must_be_positive() -> None:
    assert Capabilities(cpu_usable=0.5).cpu_usable == 0.5
    with pytest.raises(ValidationError):
        Capabilities(cpu_usable=0)


@pytest.mark.parametrize("bad", ["NaN", "Infinity", "-Infinity"])
def test_bounded_floats_reject_non_finite(bad: str) -> None:
    with pytest.raises(ValidationError):
        WorkerHeartbeatRequest.model_validate_json(f'{{"worker_id": "w", "cpu_pct": {bad}}}')


# --------------------------------------------------------------------------------------------
# Exported JSON Schemas


def test_committed_schemas_match_the_models() -> None:
    """The drift test: edit a model, run `make schemas`, commit the result."""
    generated = json_schemas()
    committed = {p.stem for p in SCHEMA_DIR.glob("*.json")}
    assert committed == set(generated) == set(EXPORTED)
    for stem, schema in generated.items():
        on_disk = (SCHEMA_DIR / f"{stem}.json").read_text(encoding="utf-8")
        assert on_disk == render_schema(schema), f"{stem}.json is stale: run `make schemas`"


def test_drift_is_detected(monkeypatch: pytest.MonkeyPatch) -> None:
    """The comparison above is sensitive: a changed model yields a different rendering."""

    class Changed(WorkerHeartbeatRequest):
        new_field: int = 0

    monkeypatch.setitem(protocol.EXPORTED, "worker_heartbeat_request", Changed)
    changed = render_schema(json_schemas()["worker_heartbeat_request"])
    on_disk = (SCHEMA_DIR / "worker_heartbeat_request.json").read_text(encoding="utf-8")
    assert changed != on_disk


def test_schemas_carry_id_and_dialect() -> None:
    for stem, schema in json_schemas().items():
        assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
        assert (
            schema["$id"] == f"https://api.rmatool.org.uk/schemas/v{PROTOCOL_VERSION}/{stem}.json"
        )


def test_render_schema_is_stable() -> None:
    schema = json_schemas()["worker_register_request"]
    text = render_schema(schema)
    assert text.endswith("}\n")
    assert render_schema(json.loads(text)) == text


def test_export_writes_every_schema(tmp_path: Any) -> None:
    written = protocol.export(tmp_path / "out")
    assert {p.stem for p in written} == set(EXPORTED)
    for path in written:
        assert path.read_text(encoding="utf-8") == (SCHEMA_DIR / path.name).read_text(
            encoding="utf-8"
        )


def test_main_exports_to_a_directory(tmp_path: Any, capsys: pytest.CaptureFixture[str]) -> None:
    assert protocol.main(["--export", str(tmp_path)]) == 0
    assert len(capsys.readouterr().out.splitlines()) == len(EXPORTED)
    assert {p.stem for p in tmp_path.iterdir()} == set(EXPORTED)


VALID_EXAMPLES: dict[str, dict[str, Any]] = {
    "worker_register_request": {
        "protocol_version": 1,
        "worker_id": "worker-1",
        "worker_token": SECRET,
        "worker_type": "gpu",
        "tunnel_url": URL,
        "gateway_key": SECRET,
        "capabilities": {
            "gpus": [
                {
                    "index": 0,
                    "name": "NVIDIA H100",
                    "uuid": "GPU-1",
                    "memory_total_mb": 81559,
                    "memory_free_mb": 80000,
                    "utilization_pct": 3.5,
                    "temperature_c": 41,
                    "driver_version": "550.54",
                    "cuda_driver_version": "12.4",
                    "compute_capability": "9.0",
                }
            ],
            "cpu_cores": 16,
            "cpu_physical_cores": 8,
            "cpu_usable": 15.5,
            "cpu_model": "EPYC",
            "ram_total_mb": 131072,
            "ram_available_mb": 120000,
            "disk_free_mb": 65536,
            "os": "Linux",
            "arch": "x86_64",
            "hostname": "box",
        },
        "services": [
            {
                "name": "llm-inference",
                "status": "ready",
                "models": ["llama3:latest"],
                "max_concurrency": 8,
            },
            {"name": "echo"},
        ],
        "agent_version": "0.1.0",
    },
    "worker_heartbeat_request": {
        "protocol_version": 1,
        "worker_id": "worker-1",
        "state": "draining",
        "active_requests": 3,
        "cpu_pct": 12.5,
        "ram_available_mb": 1000,
        "gpus": [{"index": 0, "utilization_pct": 50, "memory_free_mb": 1000}],
        "services": [{"name": "llm-inference", "status": "ready", "models": ["llama3"]}],
    },
    "edge_register_request": {
        "protocol_version": 1,
        "coordinator_id": "coord-1",
        "tunnel_url": URL,
        "coordinator_secret": SECRET,
        "version": "0.1.0",
    },
    "edge_heartbeat_request": {
        "protocol_version": 1,
        "coordinator_id": "coord-1",
        "state": "active",
        "workers": 10,
        "services": [{"name": "echo", "ready_workers": 2, "models": ["m"]}],
        "load": 0.25,
        "in_flight": 4,
    },
}


def _set_path(doc: dict[str, Any], path: tuple[Any, ...], key: str, value: Any) -> None:
    target: Any = doc
    for step in path:
        target = target[step]
    target[key] = value


# (stem, path to the object that gets an extra key)
EXTRA_PLACES = [
    ("worker_register_request", ()),
    ("worker_register_request", ("capabilities",)),
    ("worker_register_request", ("capabilities", "gpus", 0)),
    ("worker_register_request", ("services", 0)),
    ("worker_heartbeat_request", ()),
    ("worker_heartbeat_request", ("gpus", 0)),
    ("worker_heartbeat_request", ("services", 0)),
    ("edge_register_request", ()),
    ("edge_heartbeat_request", ()),
    ("edge_heartbeat_request", ("services", 0)),
]


@pytest.mark.parametrize("stem", REQUEST_SCHEMAS)
def test_request_schema_accepts_a_valid_example(stem: str) -> None:
    example = VALID_EXAMPLES[stem]
    VALIDATORS[stem].validate(example)
    EXPORTED[stem].model_validate_json(json.dumps(example))  # the model agrees


@pytest.mark.parametrize("stem", REQUEST_SCHEMAS)
def test_request_schema_accepts_a_minimal_example(stem: str) -> None:
    model = EXPORTED[stem]
    VALIDATORS[stem].validate(MINIMAL[model])


@pytest.mark.parametrize(("stem", "path"), EXTRA_PLACES)
def test_request_schema_rejects_extra_fields(stem: str, path: tuple[Any, ...]) -> None:
    doc = copy.deepcopy(VALID_EXAMPLES[stem])
    _set_path(doc, path, "sneaky", True)
    with pytest.raises(jsonschema.ValidationError):
        VALIDATORS[stem].validate(doc)
    with pytest.raises(ValidationError):
        EXPORTED[stem].model_validate_json(json.dumps(doc))


# (stem, path, key, bad value): the schema and the model reject the same things.
SCHEMA_REJECTS = [
    ("worker_register_request", (), "worker_id", "-starts-with-dash"),
    ("worker_register_request", (), "worker_id", "x" * 65),
    ("worker_register_request", (), "worker_type", "tpu"),
    ("worker_register_request", (), "tunnel_url", "short"),
    ("worker_register_request", (), "tunnel_url", "h" * 2049),
    ("worker_register_request", (), "worker_token", "too-short"),
    ("worker_register_request", (), "services", [{"name": "echo"}] * 65),
    ("worker_register_request", ("services", 0), "max_concurrency", 0),
    ("worker_register_request", ("services", 0), "max_concurrency", 201),
    ("worker_register_request", ("services", 0), "name", "Upper"),
    ("worker_register_request", ("services", 0), "models", [""]),
    ("worker_register_request", ("capabilities",), "cpu_cores", 0),
    ("worker_register_request", ("capabilities",), "hostname", "h" * 257),
    ("worker_register_request", ("capabilities", "gpus", 0), "index", 256),
    ("worker_heartbeat_request", (), "state", "suspect"),
    ("worker_heartbeat_request", (), "cpu_pct", 100.5),
    ("worker_heartbeat_request", (), "active_requests", -1),
    ("edge_register_request", (), "coordinator_id", "bad id"),
    ("edge_heartbeat_request", (), "load", 1.5),
    ("edge_heartbeat_request", (), "services", [{"name": "e", "ready_workers": 0}] * 513),
]


@pytest.mark.parametrize(("stem", "path", "key", "value"), SCHEMA_REJECTS)
def test_schema_and_model_reject_out_of_bounds_values(
    stem: str, path: tuple[Any, ...], key: str, value: Any
) -> None:
    doc = copy.deepcopy(VALID_EXAMPLES[stem])
    _set_path(doc, path, key, value)
    with pytest.raises(jsonschema.ValidationError):
        VALIDATORS[stem].validate(doc)
    with pytest.raises(ValidationError):
        EXPORTED[stem].model_validate_json(json.dumps(doc))


@pytest.mark.parametrize("stem", REQUEST_SCHEMAS)
def test_request_schemas_forbid_additional_properties_everywhere(stem: str) -> None:
    schema = json_schemas()[stem]
    objects = [schema, *schema.get("$defs", {}).values()]
    for obj in objects:
        assert obj.get("type") == "object"
        assert obj.get("additionalProperties") is False, obj.get("title")


@pytest.mark.parametrize("stem", RESPONSE_SCHEMAS)
def test_response_schemas_allow_additional_properties(stem: str) -> None:
    schema = json_schemas()[stem]
    assert schema.get("additionalProperties") is not False
