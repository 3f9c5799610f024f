"""Prometheus metrics (``GET /metrics``), one collector registry per coordinator instance."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from coordinator.registry import Registry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class _RegistryCollector(Collector):
    """Gauges computed at scrape time from the registry (no bookkeeping on the hot path)."""

    def __init__(self, registry: Registry, in_flight: Callable[[], int]) -> None:
        self._registry = registry
        self._in_flight = in_flight

    def collect(self) -> Iterator[Metric]:
        by_state = GaugeMetricFamily(
            "rma_workers", "Registered workers by state and type", labels=["state", "type"]
        )
        tally: dict[tuple[str, str], int] = {}
        limit = self._registry.strike_limit
        for record in self._registry:
            key = (record.health(limit), record.worker_type)
            tally[key] = tally.get(key, 0) + 1
        for state in ("active", "suspect", "draining"):
            for wtype in ("gpu", "cpu", "edge"):
                by_state.add_metric([state, wtype], tally.get((state, wtype), 0))
        yield by_state
        ready = GaugeMetricFamily(
            "rma_service_ready_workers", "Ready workers per service", labels=["service"]
        )
        for name, count in self._registry.ready_counts().items():
            ready.add_metric([name], count)
        yield ready
        yield GaugeMetricFamily(
            "rma_proxy_in_flight", "Proxied requests in flight", value=self._in_flight()
        )


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.heartbeats = Counter(
            "rma_heartbeats", "Worker heartbeats by outcome", ["outcome"], registry=self.registry
        )
        self.registrations = Counter(
            "rma_registrations",
            "Worker registrations by outcome",
            ["outcome"],
            registry=self.registry,
        )
        self.removals = Counter(
            "rma_worker_removals", "Workers removed by reason", ["reason"], registry=self.registry
        )
        self.requests = Counter(
            "rma_proxy_requests",
            "Proxied requests by service and worker status code",
            ["service", "status"],
            registry=self.registry,
        )
        self.rejected = Counter(
            "rma_proxy_rejected",
            "Requests answered 503 without a worker",
            ["reason"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "rma_proxy_response_seconds",
            "Time until the worker's response headers arrived",
            ["service"],
            registry=self.registry,
            buckets=(
                0.001,
                0.0025,
                0.005,
                0.01,
                0.025,
                0.05,
                0.1,
                0.25,
                0.5,
                1,
                2.5,
                5,
                10,
                30,
                60,
                120,
                300,
            ),
        )
        self._hb_ok = self.heartbeats.labels("ok")
        self._latency_children: dict[str, Histogram] = {}
        self._request_children: dict[tuple[str, int], Counter] = {}

    def bind(self, registry: Registry, in_flight: Callable[[], int]) -> None:
        self.registry.register(_RegistryCollector(registry, in_flight))

    def heartbeat_ok(self) -> None:
        self._hb_ok.inc()

    def observe_response(self, service: str, seconds: float) -> None:
        child = self._latency_children.get(service)
        if child is None:
            child = self._latency_children[service] = self.latency.labels(service)
        child.observe(seconds)

    def proxied(self, service: str, status: int) -> None:
        key = (service, status)
        child = self._request_children.get(key)
        if child is None:
            child = self._request_children[key] = self.requests.labels(service, str(status))
        child.inc()

    def proxy_rejected(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
