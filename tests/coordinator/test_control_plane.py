"""Registration, heartbeats, unregistration, auth and views, over real HTTP on loopback."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from coordinator.app import heartbeat_reply
from coordinator.protocol import WorkerHealth, WorkerHeartbeatResponse
from tests.conftest import BackendFactory, Fed


async def test_register_heartbeat_and_services(fed: Fed, backend_factory: BackendFactory) -> None:
    backend = await backend_factory()
    reply = await fed.register(backend.url, worker_id="alpha")
    assert reply["worker_id"] == "alpha"
    assert reply["coordinator_id"] == "coord-test"
    assert reply["assigned_services"] == ["echo"]
    assert reply["heartbeat_interval"] == 5.0
    assert reply["coordinator_url"].startswith("http://127.0.0.1:")
    assert len(reply["worker_token"]) >= 32

    resp = await fed.beat(reply, active_requests=2, cpu_pct=12.5)
    assert resp.status == 200
    beat = await resp.json()
    assert beat["state"] == "active"
    assert beat["assigned_services"] == ["echo"]

    services = await (await fed.client.get("/api/services")).json()
    echo = next(s for s in services["services"] if s["name"] == "echo")
    assert echo["ready_workers"] == 1
    assert echo["workers"] == 1
    llm = next(s for s in services["services"] if s["name"] == "llm-inference")
    assert llm["aliases"] == ["llm"]

    health = await (await fed.client.get("/health")).json()
    assert health["coordinator_id"] == "coord-test"
    assert health["workers"]["total"] == 1
    assert health["workers"]["cpu"] == 1
    assert health["services"] == {"echo": 1}


async def test_generated_worker_id_and_alias_canonicalised(
    fed: Fed, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory()
    reply = await fed.register(
        backend.url,
        worker_type="gpu",
        gpus=[{"index": 0, "name": "RTX 4090", "memory_total_mb": 24564, "memory_free_mb": 20000}],
        services=[{"name": "llm", "models": ["llama3:latest"]}, {"name": "echo"}],
    )
    assert reply["worker_id"].startswith("w-")
    assert reply["assigned_services"] == ["llm-inference", "echo"]


async def test_cpu_worker_is_not_assigned_gpu_services(
    fed: Fed, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory()
    reply = await fed.register(backend.url, services=[{"name": "llm-inference"}, {"name": "echo"}])
    assert reply["assigned_services"] == ["echo"]


async def test_join_token_required_when_configured(
    fed_factory: Any, backend_factory: BackendFactory
) -> None:
    fed = await fed_factory(worker_join_token="join-secret-0123456789")
    backend = await backend_factory()
    body = {"worker_type": "cpu", "tunnel_url": backend.url}
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "Basic x"}):
        resp = await fed.client.post("/api/worker/register", json=body, headers=headers)
        assert resp.status == 401
        assert (await resp.json())["error"] == "unauthorized"
        assert resp.headers["WWW-Authenticate"] == "Bearer"
    assert len(fed.coordinator.registry) == 0
    await fed.register(backend.url, headers={"Authorization": "Bearer join-secret-0123456789"})
    assert len(fed.coordinator.registry) == 1


async def test_heartbeat_unknown_and_bad_token(fed: Fed, backend_factory: BackendFactory) -> None:
    backend = await backend_factory()
    reply = await fed.register(backend.url, worker_id="beta")
    resp = await fed.beat({"worker_id": "nobody", "worker_token": reply["worker_token"]})
    assert resp.status == 404
    assert (await resp.json())["error"] == "unknown_worker"
    resp = await fed.beat({"worker_id": "beta", "worker_token": "x" * 43})
    assert resp.status == 401
    resp = await fed.client.post("/api/worker/heartbeat", json={"worker_id": "beta"})
    assert resp.status == 401
    # A beat addressed to another coordinator (misrouted) asks the worker to register again.
    resp = await fed.beat(reply, coordinator_id="coord-other")
    assert resp.status == 404
    resp = await fed.beat(reply, coordinator_id="coord-test")
    assert resp.status == 200


async def test_reregister_requires_token_and_replaces_address(
    fed: Fed, backend_factory: BackendFactory
) -> None:
    old, new = await backend_factory("old"), await backend_factory("new")
    reply = await fed.register(old.url, worker_id="gamma")
    hijack = {"worker_id": "gamma", "worker_type": "cpu", "tunnel_url": new.url}
    resp = await fed.client.post("/api/worker/register", json=hijack)
    assert resp.status == 403
    resp = await fed.client.post("/api/worker/register", json={**hijack, "worker_token": "y" * 43})
    assert resp.status == 403
    # Still routed to the old address.
    assert (await (await fed.client.get("/service/echo/x")).json())["backend"] == "old"

    again = await fed.register(new.url, worker_id="gamma", worker_token=reply["worker_token"])
    assert again["worker_token"] == reply["worker_token"]
    assert (await (await fed.client.get("/service/echo/x")).json())["backend"] == "new"
    assert len(fed.coordinator.registry) == 1


async def test_unregister(fed: Fed, backend_factory: BackendFactory) -> None:
    backend = await backend_factory()
    reply = await fed.register(backend.url, worker_id="delta")
    resp = await fed.client.delete("/api/worker/delta")
    assert resp.status == 401
    resp = await fed.client.delete(
        "/api/worker/delta", headers={"Authorization": f"Bearer {reply['worker_token']}"}
    )
    assert resp.status == 200
    assert (await resp.json()) == {"removed": "delta"}
    resp = await fed.client.delete(
        "/api/worker/delta", headers={"Authorization": f"Bearer {reply['worker_token']}"}
    )
    assert resp.status == 404
    # The token died with the registration: a replayed heartbeat is refused.
    resp = await fed.beat(reply)
    assert resp.status == 404
    resp = await fed.client.delete("/api/worker/bad%20id")
    assert resp.status == 400


async def test_admin_workers_view(fed_factory: Any, backend_factory: BackendFactory) -> None:
    plain = await fed_factory()
    assert (await plain.client.get("/api/workers")).status == 403

    fed = await fed_factory(admin_token="admin-secret-0123456789")
    backend = await backend_factory()
    reply = await fed.register(backend.url, worker_id="eps")
    assert (await fed.client.get("/api/workers")).status == 401
    bad = {"Authorization": "Bearer admin-secret-wrong"}
    assert (await fed.client.get("/api/workers", headers=bad)).status == 401
    good = {"Authorization": "Bearer admin-secret-0123456789"}
    resp = await fed.client.get("/api/workers", headers=good)
    assert resp.status == 200
    text = await resp.text()
    assert reply["worker_token"] not in text
    assert "gateway-key-for-tests" not in text
    workers = (await resp.json())["workers"]
    assert workers[0]["worker_id"] == "eps"
    assert workers[0]["tunnel_url"] == backend.url
    # The admin token can also unregister any worker.
    assert (await fed.client.delete("/api/worker/eps", headers=good)).status == 200


async def test_missed_heartbeats_suspect_then_removed(
    fed_factory: Any, backend_factory: BackendFactory
) -> None:
    fed = await fed_factory(heartbeat_interval=0.1, suspect_after=2, remove_after=0.6)
    backend = await backend_factory()
    reply = await fed.register(backend.url, worker_id="zeta")
    assert (await fed.client.get("/service/echo/a")).status == 200
    await asyncio.sleep(0.35)
    health = await (await fed.client.get("/health")).json()
    assert health["workers"]["suspect"] == 1
    resp = await fed.client.get("/service/echo/a")
    assert resp.status == 503
    assert (await resp.json())["error"] == "no_ready_workers"
    assert resp.headers["Retry-After"] == "1"
    # A beat brings it back.
    assert (await fed.beat(reply)).status == 200
    assert (await fed.client.get("/service/echo/a")).status == 200
    await asyncio.sleep(0.9)
    assert len(fed.coordinator.registry) == 0
    resp = await fed.beat(reply)
    assert resp.status == 404


async def test_draining_worker_gets_no_new_requests(
    fed: Fed, backend_factory: BackendFactory
) -> None:
    backend = await backend_factory()
    reply = await fed.register(backend.url)
    resp = await fed.beat(reply, state="draining")
    assert (await resp.json())["state"] == "draining"
    assert (await fed.client.get("/service/echo/a")).status == 503
    await fed.beat(reply, state="active")
    assert (await fed.client.get("/service/echo/a")).status == 200


async def test_service_status_from_heartbeat(fed: Fed, backend_factory: BackendFactory) -> None:
    backend = await backend_factory()
    reply = await fed.register(backend.url, services=[{"name": "echo", "status": "starting"}])
    assert (await fed.client.get("/service/echo/a")).status == 503
    await fed.beat(reply, services=[{"name": "echo", "status": "ready"}])
    assert (await fed.client.get("/service/echo/a")).status == 200
    await fed.beat(reply, services=[{"name": "echo", "status": "unhealthy"}])
    assert (await fed.client.get("/service/echo/a")).status == 503


async def test_metrics_status_openapi(fed: Fed, backend_factory: BackendFactory) -> None:
    backend = await backend_factory()
    reply = await fed.register(backend.url, worker_id="metrics-w")
    await fed.beat(reply)
    await fed.client.get("/service/echo/m")
    text = await (await fed.client.get("/metrics")).text()
    assert 'rma_workers{state="active",type="cpu"} 1.0' in text
    assert "rma_heartbeats_total" in text
    assert 'rma_proxy_requests_total{service="echo",status="200"} 1.0' in text
    assert "rma_proxy_response_seconds_bucket" in text
    page = await fed.client.get("/status")
    assert page.content_type == "text/html"
    html = await page.text()
    assert "metrics-w" in html
    assert backend.url not in html
    spec = await (await fed.client.get("/openapi.json")).json()
    assert spec["openapi"].startswith("3.")
    assert "/api/worker/register" in spec["paths"]
    assert "WorkerRegisterRequest" in spec["components"]["schemas"]


@pytest.mark.parametrize(
    ("body", "status", "error"),
    [
        (b"{not json", 400, "invalid_json"),
        (b"", 400, "invalid_json"),
        (b'"a string"', 422, "invalid_request"),
        (b"[]", 422, "invalid_request"),
        (b'{"worker_type": "cpu"}', 422, "invalid_request"),
        (b'{"worker_type": "tpu", "tunnel_url": "http://127.0.0.1:1"}', 422, "invalid_request"),
        (
            b'{"worker_type": "cpu", "tunnel_url": "http://127.0.0.1:1", "evil": 1}',
            422,
            "invalid_request",
        ),
        (
            b'{"worker_type": "cpu", "tunnel_url": "http://127.0.0.1:1", "worker_id": "../x"}',
            422,
            "invalid_request",
        ),
        (
            b'{"worker_type": "cpu", "tunnel_url": "http://127.0.0.1:1", "protocol_version": 99}',
            400,
            "unsupported_protocol_version",
        ),
        (
            b'{"worker_type": "cpu", "tunnel_url": "http://169.254.169.254"}',
            422,
            "invalid_tunnel_url",
        ),
        (
            b'{"worker_type": "cpu", "tunnel_url": "https://x.trycloudflare.com.evil.net"}',
            422,
            "invalid_tunnel_url",
        ),
        (
            b'{"worker_type": "cpu", "tunnel_url": "https://a@b.trycloudflare.com"}',
            422,
            "invalid_tunnel_url",
        ),
        (b"\xff\xfe\x00garbage", 400, "invalid_json"),
        (b'{"a":' * 5000, 400, "invalid_json"),
    ],
)
async def test_register_bad_input(fed: Fed, body: bytes, status: int, error: str) -> None:
    resp = await fed.client.post(
        "/api/worker/register", data=body, headers={"Content-Type": "application/json"}
    )
    assert resp.status == status
    data = await resp.json()
    assert data["error"] == error
    assert data["hop"] == "coordinator"
    assert len(fed.coordinator.registry) == 0


async def test_oversized_bodies_are_413(fed: Fed) -> None:
    big = b'{"worker_type": "cpu", "tunnel_url": "' + b"a" * 70_000 + b'"}'
    for path in ("/api/worker/register", "/api/worker/heartbeat"):
        resp = await fed.client.post(path, data=big)
        assert resp.status == 413
        assert (await resp.json())["error"] == "body_too_large"

    async def chunked() -> Any:
        for _ in range(100):
            yield b"x" * 1024

    resp = await fed.client.post("/api/worker/register", data=chunked())
    assert resp.status == 413


async def test_too_many_services_rejected(fed: Fed, backend_factory: BackendFactory) -> None:
    backend = await backend_factory()
    body = {
        "worker_type": "cpu",
        "tunnel_url": backend.url,
        "services": [{"name": f"s{i}"} for i in range(10_000)],
    }
    resp = await fed.client.post("/api/worker/register", json=body)
    assert resp.status in (413, 422)
    assert len(fed.coordinator.registry) == 0


async def test_loopback_urls_refused_outside_dev_mode(fed_factory: Any) -> None:
    fed = await fed_factory(dev_allow_loopback=False)
    resp = await fed.client.post(
        "/api/worker/register", json={"worker_type": "cpu", "tunnel_url": "http://127.0.0.1:9"}
    )
    assert resp.status == 422
    assert "dev mode" in (await resp.json())["detail"]


async def test_unknown_route_and_method_answer_json(fed: Fed) -> None:
    resp = await fed.client.get("/nope")
    assert resp.status == 404
    assert (await resp.json())["error"] == "not_found"
    resp = await fed.client.get("/api/worker/register")
    assert resp.status == 405
    assert (await resp.json())["error"] == "method_not_allowed"
    assert "POST" in resp.headers["Allow"]


async def test_registry_full(fed_factory: Any, backend_factory: BackendFactory) -> None:
    fed = await fed_factory(max_workers=1)
    backend = await backend_factory()
    await fed.register(backend.url)
    resp = await fed.client.post(
        "/api/worker/register", json={"worker_type": "cpu", "tunnel_url": backend.url}
    )
    assert resp.status == 503
    assert (await resp.json())["error"] == "registry_full"


@pytest.mark.parametrize(
    ("state", "assigned", "interval"),
    [
        ("active", ["echo"], 15.0),
        ("suspect", [], 0.1),
        ("draining", ["llm-inference", "vision-ocr", "a.b_c-1"], 1e-05),
        ("active", ["echo"], 3600),
    ],
)
def test_heartbeat_reply_matches_the_model(
    state: WorkerHealth, assigned: list[str], interval: float
) -> None:
    fast = heartbeat_reply("w-1.a_b", "coord-x", state, assigned, interval)
    model = WorkerHeartbeatResponse(
        worker_id="w-1.a_b",
        coordinator_id="coord-x",
        state=state,
        assigned_services=assigned,
        heartbeat_interval=interval,
    )
    assert json.loads(fast) == json.loads(model.model_dump_json())
    assert WorkerHeartbeatResponse.model_validate_json(fast) == model
