"""Local backends: the ``SERVICES`` list, auto-detected LLM servers, ``echo``, and their health.

A backend is ``starting`` until it first answers, ``ready`` while it answers, and ``unhealthy``
when it stops answering after having been ready. Ollama (``/api/tags``) and OpenAI-compatible
servers (``/v1/models``) report their models, which go into heartbeats. Probes run in their own
task; heartbeats only read the last result, so a slow model load never delays a beat.
"""

from __future__ import annotations

import asyncio
import json
import re
from dataclasses import dataclass, field
from typing import Literal
from urllib.parse import urlsplit

import aiohttp
import structlog

from coordinator.protocol import (
    SERVICE_PATTERN,
    ServiceHealth,
    ServiceOffer,
    ServiceStatus,
)
from worker_agent.replies import read_capped
from worker_agent.settings import WorkerSettings

log = structlog.get_logger("worker_agent.backends")

_SERVICE = re.compile(SERVICE_PATTERN)
ECHO = "echo"
MAX_MODELS = 256
MAX_PROBE_BODY = 1024 * 1024
BackendKind = Literal["echo", "unknown", "http", "ollama", "openai"]


class ServicesError(ValueError):
    """``SERVICES`` does not parse; the message says which entry and why."""


def _backend_url(url: str, name: str) -> str:
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ServicesError(f"service {name!r}: {url!r} is not an http(s) URL")
    if parts.query or parts.fragment or parts.username or parts.password:
        raise ServicesError(f"service {name!r}: the URL must not carry query, fragment or login")
    try:
        parts.port  # noqa: B018 - validates the port
    except ValueError as exc:
        raise ServicesError(f"service {name!r}: {exc}") from None
    return url.rstrip("/")


def parse_services(spec: str) -> list[tuple[str, str]]:
    """``"a=http://h:1,b=http://h:2"`` -> ``[("a", "http://h:1"), ("b", "http://h:2")]``."""
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for raw in spec.split(","):
        entry = raw.strip()
        if not entry:
            continue
        name, sep, url = entry.partition("=")
        name, url = name.strip(), url.strip()
        if not sep or not url:
            raise ServicesError(f"SERVICES entry {entry!r} is not name=url")
        if not _SERVICE.match(name):
            raise ServicesError(f"service name {name!r} must match {SERVICE_PATTERN}")
        if name == ECHO:
            raise ServicesError("'echo' is built in; turn it off with ECHO_SERVICE=false")
        if name in seen:
            raise ServicesError(f"service {name!r} is listed twice")
        seen.add(name)
        out.append((name, _backend_url(url, name)))
    return out


@dataclass
class Backend:
    name: str
    url: str | None
    kind: BackendKind
    max_concurrency: int
    status: ServiceStatus = "starting"
    models: list[str] = field(default_factory=list)
    ever_ready: bool = False
    in_flight: int = 0
    detail: str = ""

    def offer(self) -> ServiceOffer:
        return ServiceOffer(
            name=self.name,
            status=self.status,
            models=self.models,
            max_concurrency=self.max_concurrency,
        )

    def health(self) -> ServiceHealth:
        return ServiceHealth(name=self.name, status=self.status, models=self.models)

    def mark(self, up: bool, detail: str = "") -> None:
        before = self.status
        if up:
            self.status = "ready"
            self.ever_ready = True
        else:
            self.status = "unhealthy" if self.ever_ready else "starting"
        self.detail = detail
        if before != self.status:
            log.info(
                "backend_status",
                service=self.name,
                status=self.status,
                kind=self.kind,
                models=len(self.models),
                detail=detail or None,
            )


def _models(items: object, key: str) -> list[str] | None:
    if not isinstance(items, list):
        return None
    names = []
    for item in items:
        value = item.get(key) if isinstance(item, dict) else None
        if isinstance(value, str) and 0 < len(value) <= 256:
            names.append(value)
    return sorted(set(names))[:MAX_MODELS]


async def _get_json(
    session: aiohttp.ClientSession, url: str, limit_s: float
) -> tuple[int, object | None]:
    async with session.get(
        url, timeout=aiohttp.ClientTimeout(total=limit_s), allow_redirects=False
    ) as resp:
        body = await read_capped(resp, MAX_PROBE_BODY)
        try:
            data: object | None = json.loads(body) if body else None
        except ValueError:
            data = None
        return resp.status, data


async def probe_ollama(
    session: aiohttp.ClientSession, url: str, limit_s: float
) -> list[str] | None:
    """Model names if ``url`` is an Ollama server, else ``None``."""
    status, data = await _get_json(session, f"{url}/api/tags", limit_s)
    if status != 200 or not isinstance(data, dict):
        return None
    return _models(data.get("models"), "name")


async def probe_openai(
    session: aiohttp.ClientSession, url: str, limit_s: float
) -> list[str] | None:
    """Model ids if ``url`` is an OpenAI-compatible server, else ``None``."""
    base = url[: -len("/v1")] if url.endswith("/v1") else url
    status, data = await _get_json(session, f"{base}/v1/models", limit_s)
    if status != 200 or not isinstance(data, dict):
        return None
    return _models(data.get("data"), "id")


class Backends:
    """The services this worker offers, by name."""

    def __init__(self, settings: WorkerSettings, *, own_urls: tuple[str, ...] = ()) -> None:
        self.settings = settings
        self.own_urls = own_urls
        self.by_name: dict[str, Backend] = {}
        if settings.echo_service:
            self.by_name[ECHO] = Backend(ECHO, None, "echo", settings.service_max_concurrency)
            self.by_name[ECHO].mark(True)
        for name, url in parse_services(settings.services):
            self.by_name[name] = Backend(name, url, "unknown", settings.service_max_concurrency)

    def get(self, name: str) -> Backend | None:
        return self.by_name.get(name)

    def offers(self) -> list[ServiceOffer]:
        return [b.offer() for b in self.by_name.values()]

    def health(self) -> list[ServiceHealth]:
        return [b.health() for b in self.by_name.values()]

    async def autodetect(self, session: aiohttp.ClientSession) -> None:
        """Offer a local Ollama or OpenAI-compatible server as ``AUTO_SERVICE_NAME``."""
        name = self.settings.auto_service_name
        if not self.settings.auto_detect or name in self.by_name:
            return
        timeout = self.settings.backend_probe_timeout
        taken = {b.url for b in self.by_name.values() if b.url} | set(self.own_urls)
        candidates: list[tuple[BackendKind, str]] = []
        if self.settings.ollama_url and self.settings.ollama_url not in taken:
            candidates.append(("ollama", self.settings.ollama_url))
        candidates += [("openai", u) for u in self.settings.probe_urls if u not in taken]

        async def attempt(kind: BackendKind, url: str) -> list[str] | None:
            try:
                if kind == "ollama":
                    return await probe_ollama(session, url, timeout)
                return await probe_openai(session, url, timeout)
            except (aiohttp.ClientError, TimeoutError, UnicodeError):
                return None

        results = await asyncio.gather(*(attempt(k, u) for k, u in candidates))
        for (kind, url), models in zip(candidates, results, strict=True):
            if models is None:
                continue
            backend = Backend(name, url, kind, self.settings.service_max_concurrency)
            backend.models = models
            self.by_name[name] = backend
            log.info("backend_detected", service=name, kind=kind, url=url, models=models[:20])
            backend.mark(True)
            return
        log.info("no_llm_backend_detected", probed=[u for _, u in candidates])

    async def probe(self, session: aiohttp.ClientSession, backend: Backend) -> None:
        """Update one backend's status (and models) from a probe."""
        if backend.url is None:
            return
        timeout = self.settings.backend_probe_timeout
        url = backend.url
        try:
            if backend.kind in ("unknown", "ollama"):
                models = await probe_ollama(session, url, timeout)
                if models is not None:
                    backend.kind, backend.models = "ollama", models
                    backend.mark(True)
                    return
                if backend.kind == "ollama":
                    backend.mark(False, "/api/tags did not answer 200")
                    return
            if backend.kind in ("unknown", "openai"):
                models = await probe_openai(session, url, timeout)
                if models is not None:
                    backend.kind, backend.models = "openai", models
                    backend.mark(True)
                    return
                if backend.kind == "openai":
                    backend.mark(False, "/v1/models did not answer 200")
                    return
            status, _ = await _get_json(session, url + "/", timeout)
            if backend.kind == "unknown":
                backend.kind = "http"
            backend.mark(status < 500, f"HTTP {status}" if status >= 500 else "")
        except (aiohttp.ClientError, TimeoutError, UnicodeError) as exc:
            backend.mark(False, f"{type(exc).__name__}: {exc}"[:200])

    async def probe_all(self, session: aiohttp.ClientSession) -> None:
        await asyncio.gather(*(self.probe(session, b) for b in list(self.by_name.values())))

    async def watch(self, session: aiohttp.ClientSession) -> None:
        """Probe every backend every ``BACKEND_CHECK_INTERVAL`` seconds, forever."""
        while True:
            await asyncio.sleep(self.settings.backend_check_interval)
            await self.probe_all(session)
