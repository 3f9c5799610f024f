"""Schemathesis against the coordinator's own ``GET /openapi.json``, over a fixed seed and budget.

Positive and negative cases for every operation, with and without the admin token, through a
real coordinator and (for ``/service/echo/...``) on to a real worker gateway. Zero 5xx, zero
hangs: each call has a 5 s limit. The only 5xx tolerated is the documented load-shedding 503
(``Retry-After`` plus a JSON code saying no worker is ready), which a known catalog service with
no worker answers by design. Afterwards the legitimate worker is still registered, unchanged.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from coordinator.urls import validate_tunnel_url
from tests.security.conftest import ADMIN, ThreadedFederation

SHEDDING = {"no_ready_workers", "all_workers_busy", "overloaded", "register_busy"}
CASES_PER_OPERATION = 25


def _check(response: requests.Response, where: str) -> None:
    status = response.status_code
    if status >= 500:
        try:
            error = response.json().get("error")
        except ValueError:
            error = None
        allowed = status == 503 and error in SHEDDING and "Retry-After" in response.headers
        assert allowed, f"{where} answered {status}: {response.text[:300]}"
    if status >= 400 and response.headers.get("Content-Type", "").startswith("application/json"):
        body = response.json()
        assert isinstance(body, dict)
        assert "error" in body
        assert "detail" in body


def _operations(base: str) -> list[Any]:
    schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
    ops = [result.ok() for result in schema.get_all_operations()]
    assert len(ops) >= 9
    return ops


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE])
@pytest.mark.parametrize("admin", [False, True])
def test_coordinator_openapi_fuzz(
    threaded_fed: ThreadedFederation, mode: GenerationMode, admin: bool
) -> None:
    base = threaded_fed.fed.url
    before = threaded_fed.snapshot()["w-legit"]
    headers = {"Authorization": f"Bearer {ADMIN}"} if admin else None
    session = requests.Session()
    calls = 0
    skipped: list[str] = []

    for op in _operations(base):
        path_parameters = {"name": "echo"} if op.path.startswith("/service/") and admin else None
        strategy = op.as_strategy(generation_mode=mode, path_parameters=path_parameters)

        @seed(20261125)
        @settings(
            max_examples=CASES_PER_OPERATION,
            deadline=None,
            database=None,
            derandomize=False,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=strategy)
        def run(case: Any) -> None:
            nonlocal calls
            response = case.call(base_url=base, session=session, headers=headers, timeout=5)
            calls += 1
            _check(response, f"{case.method} {case.formatted_path}")

        try:
            run()
        except Unsatisfiable:
            # An operation without parameters or body has no invalid form to generate.
            assert mode is GenerationMode.NEGATIVE, op.label
            skipped.append(op.label)

    fuzzed = {"POST /api/worker/register", "POST /api/worker/heartbeat"}
    assert not fuzzed & set(skipped), skipped
    assert calls >= 9 * 5, calls
    after = threaded_fed.snapshot()
    # Nothing lost or replaced: the worker registered before the fuzz is still there, unchanged.
    assert after["w-legit"]["tunnel_url"] == before["tunnel_url"]
    assert after["w-legit"]["registered_at"] == before["registered_at"]
    # Nothing that breaks the URL policy was registered by the fuzzer.
    for worker in after.values():
        validate_tunnel_url(worker["tunnel_url"], [".trycloudflare.com"], allow_loopback=True)


@seed(20261125)
@settings(max_examples=150, deadline=None, database=None, suppress_health_check=list(HealthCheck))
@given(
    path=st.sampled_from(["/api/worker/register", "/api/worker/heartbeat"]),
    payload=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
        lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
        max_leaves=12,
    )
    | st.fixed_dictionaries(
        {"worker_type": st.sampled_from(["cpu", "gpu", "edge", "x"])},
        optional={
            "tunnel_url": st.text(max_size=40),
            "worker_id": st.text(max_size=70),
            "worker_token": st.text(max_size=40),
            "services": st.lists(st.dictionaries(st.text(max_size=8), st.text(max_size=8))),
            "protocol_version": st.integers(),
        },
    ),
)
def test_arbitrary_json_on_the_control_plane_is_4xx(
    threaded_fed: ThreadedFederation, path: str, payload: Any
) -> None:
    """Hypothesis over the wire models: any JSON a client can send gets a JSON 4xx, never 5xx."""
    response = requests.post(
        threaded_fed.fed.url + path,
        data=json.dumps(payload, allow_nan=True),
        headers={"Content-Type": "application/json", "Authorization": "Bearer x" * 3},
        timeout=5,
    )
    assert 400 <= response.status_code < 500 or response.status_code == 200, response.text
    if response.status_code != 200:
        assert response.json()["error"]
