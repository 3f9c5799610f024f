"""Prometheus metrics (``GET /metrics``), one collector registry per coordinator instance.

The per-request figures (proxied requests by service and status, and the latency histogram)
are plain counts kept without locks (the coordinator runs on one event loop thread) and turned
into Prometheus families at scrape time; prometheus-client's own ``Counter``/``Histogram`` take a
lock on every update, which the proxy's hot path does not need.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from coordinator.registry import Registry

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

#: Upper bounds of the latency histogram's buckets, in seconds (``+Inf`` is implied).
LATENCY_BUCKETS = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)
_BUCKET_LABELS = [repr(b) for b in LATENCY_BUCKETS] + ["+Inf"]  # as prometheus-client writes them


class _Latency:
    """One service's histogram: a count per bucket (not cumulative) and the sum."""

    __slots__ = ("counts", "total")

    def __init__(self) -> None:
        self.counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.total = 0.0


class _ProxyCollector(Collector):
    """Proxied requests and latency, from the counts :class:`Metrics` keeps without locks."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def collect(self) -> Iterator[Metric]:
        requests = CounterMetricFamily(
            "rma_proxy_requests",
            "Proxied requests by service and worker status code",
            labels=["service", "status"],
        )
        for (service, status), count in sorted(self._metrics._requests.items()):
            requests.add_metric([service, str(status)], count)
        yield requests
        latency = HistogramMetricFamily(
            "rma_proxy_response_seconds",
            "Time until the worker's response headers arrived",
            labels=["service"],
        )
        for service, hist in sorted(self._metrics._latency.items()):
            cumulative = 0
            buckets: list[tuple[str, float]] = []
            for label, count in zip(_BUCKET_LABELS, hist.counts, strict=True):
                cumulative += count
                buckets.append((label, float(cumulative)))
            latency.add_metric([service], buckets, hist.total)
        yield latency


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
        self.rejected = Counter(
            "rma_proxy_rejected",
            "Requests answered 503 without a worker",
            ["reason"],
            registry=self.registry,
        )
        self._hb_ok = self.heartbeats.labels("ok")
        self._latency: dict[str, _Latency] = {}
        self._requests: dict[tuple[str, int], int] = {}
        self.registry.register(_ProxyCollector(self))

    def bind(self, registry: Registry, in_flight: Callable[[], int]) -> None:
        self.registry.register(_RegistryCollector(registry, in_flight))

    def heartbeat_ok(self) -> None:
        self._hb_ok.inc()

    def observe_response(self, service: str, seconds: float) -> None:
        hist = self._latency.get(service)
        if hist is None:
            hist = self._latency[service] = _Latency()
        hist.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        hist.total += seconds

    def proxied(self, service: str, status: int) -> None:
        key = (service, status)
        self._requests[key] = self._requests.get(key, 0) + 1

    def proxy_rejected(self, reason: str) -> None:
        self.rejected.labels(reason).inc()

    def render(self) -> bytes:
        return generate_latest(self.registry)
