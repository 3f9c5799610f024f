"""`bench/swarm.py` cannot rot: 20 simulated workers for seconds against a real coordinator."""

from __future__ import annotations

from typing import Any

from bench.swarm import run_swarm


async def test_swarm_smoke(coordinator_factory: Any) -> None:
    coord = await coordinator_factory(heartbeat_interval=0.5)
    result = await run_swarm(
        ["--n", "20", "--duration", "2", "--churn", "300", "--rps", "20", "--target", coord.url]
    )
    assert result["workers"] == 20
    assert result["register_failed"] == 0
    assert result["heartbeat_interval_s"] == 0.5
    assert result["heartbeats_per_s"] > 10  # 20 workers at 0.5 s: about 40 per second
    assert result["requests"] > 10
    assert result["request_success_rate"] >= 0.9, result["errors"]
    assert sum(result["churn"].values()) > 0
    assert len(coord.coordinator.registry) >= 20
