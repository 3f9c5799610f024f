"""``GET /openapi.json``, generated from the wire models in :mod:`coordinator.protocol`."""

from __future__ import annotations

from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema

from coordinator import protocol as p

_REF = "#/components/schemas/{model}"


def _ref(model: type[BaseModel]) -> dict[str, str]:
    return {"$ref": _REF.format(model=model.__name__)}


def _json_body(model: type[BaseModel]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": _ref(model)}}}


def _answer(description: str, model: type[BaseModel] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {"description": description}
    if model is not None:
        out["content"] = {"application/json": {"schema": _ref(model)}}
    return out


def _errors(*codes: int) -> dict[str, Any]:
    return {str(code): _answer("error", p.ErrorResponse) for code in codes}


_BEARER: list[dict[str, list[str]]] = [{"bearer": []}]


@cache
def openapi_document(version: str) -> dict[str, Any]:
    models: list[type[BaseModel]] = [
        p.WorkerRegisterRequest,
        p.WorkerRegisterResponse,
        p.WorkerHeartbeatRequest,
        p.WorkerHeartbeatResponse,
        p.ServicesResponse,
        p.WorkersResponse,
        p.HealthResponse,
        p.ErrorResponse,
    ]
    _, schemas = models_json_schema([(m, "validation") for m in models], ref_template=_REF)
    service_params = [
        {"name": "name", "in": "path", "required": True, "schema": {"type": "string"}},
        {"name": "tail", "in": "path", "required": True, "schema": {"type": "string"}},
    ]
    proxied = {
        "summary": "Proxy to the least-loaded ready worker of the service",
        "parameters": service_params,
        "responses": {"200": {"description": "the worker's answer"}}
        | _errors(400, 404, 502, 503, 504),
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "RMA edge coordinator",
            "version": version,
            "description": f"Wire protocol version {p.PROTOCOL_VERSION}",
        },
        "components": {
            "schemas": schemas.get("$defs", {}),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "paths": {
            "/api/worker/register": {
                "post": {
                    "summary": "Register a worker (join token as Bearer when configured)",
                    "security": _BEARER,
                    "requestBody": _json_body(p.WorkerRegisterRequest),
                    "responses": {"200": _answer("registered", p.WorkerRegisterResponse)}
                    | _errors(400, 401, 403, 413, 422, 503),
                }
            },
            "/api/worker/heartbeat": {
                "post": {
                    "summary": "Worker heartbeat (worker token as Bearer)",
                    "security": _BEARER,
                    "requestBody": _json_body(p.WorkerHeartbeatRequest),
                    "responses": {"200": _answer("recorded", p.WorkerHeartbeatResponse)}
                    | _errors(400, 401, 404, 413, 422),
                }
            },
            "/api/worker/{worker_id}": {
                "delete": {
                    "summary": "Unregister a worker (its token or the admin token)",
                    "security": _BEARER,
                    "parameters": [
                        {
                            "name": "worker_id",
                            "in": "path",
                            "required": True,
                            "schema": {"type": "string", "pattern": p.ID_PATTERN},
                        }
                    ],
                    "responses": {"200": _answer("removed")} | _errors(400, 401, 404),
                }
            },
            "/api/services": {
                "get": {
                    "summary": "Services with ready worker counts and models",
                    "responses": {"200": _answer("services", p.ServicesResponse)},
                }
            },
            "/api/workers": {
                "get": {
                    "summary": "Full worker records (admin token)",
                    "security": _BEARER,
                    "responses": {"200": _answer("workers", p.WorkersResponse)} | _errors(401, 403),
                }
            },
            "/health": {
                "get": {
                    "summary": "Liveness, identity and counts",
                    "responses": {"200": _answer("healthy", p.HealthResponse)},
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "responses": {"200": {"description": "text exposition format"}},
                }
            },
            "/status": {
                "get": {
                    "summary": "Human status page",
                    "responses": {"200": {"description": "HTML"}},
                }
            },
            "/service/{name}/{tail}": {
                method: dict(proxied) for method in ("get", "post", "put", "patch", "delete")
            },
        },
    }
