"""Backends: SERVICES parsing, Ollama/OpenAI detection over real HTTP, health transitions."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.worker_agent.conftest import Site, agent_settings, free_port, start_site
from worker_agent.backends import Backends, ServicesError, parse_services, probe_ollama

SiteFactory = Callable[..., Awaitable[Site]]


def ollama_app(models: list[str]) -> web.Application:
    async def tags(request: web.Request) -> web.Response:
        return web.json_response(
            {"models": [{"name": m, "model": m, "size": 1} for m in models] + [{"name": 7}]}
        )

    app = web.Application()
    app.router.add_get("/api/tags", tags)
    return app


def openai_app(models: list[str]) -> web.Application:
    async def listing(request: web.Request) -> web.Response:
        return web.json_response(
            {"object": "list", "data": [{"id": m, "object": "model"} for m in models]}
        )

    app = web.Application()
    app.router.add_get("/v1/models", listing)
    return app


def plain_app(status: int = 404) -> web.Application:
    async def anything(request: web.Request) -> web.Response:
        return web.Response(status=status, text="plain")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", anything)
    return app


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def test_parse_services() -> None:
    assert parse_services("") == []
    assert parse_services(
        " llm-inference=http://127.0.0.1:11434/ , ocr=https://ocr.local:8104/base,"
    ) == [
        ("llm-inference", "http://127.0.0.1:11434"),
        ("ocr", "https://ocr.local:8104/base"),
    ]
    for bad, why in [
        ("llm", "not name=url"),
        ("LLM=http://x", "must match"),
        ("echo=http://x", "built in"),
        ("a=http://x,a=http://y", "twice"),
        ("a=ftp://x", "not an http"),
        ("a=http://x?q=1", "query"),
        ("a=http://user:pw@x", "login"),
        ("a=http://x:99999", "a"),
    ]:
        with pytest.raises(ServicesError, match=why):
            parse_services(bad)


async def test_explicit_backends_detect_their_kind_and_models(
    tmp_path: Path, site_factory: SiteFactory, http: aiohttp.ClientSession
) -> None:
    ollama = await site_factory(ollama_app(["llama3:latest", "qwen2.5:7b"]))
    openai = await site_factory(openai_app(["meta-llama/Llama-3.1-8B-Instruct"]))
    plain = await site_factory(plain_app(404))
    settings = agent_settings(
        tmp_path,
        services=f"llm-inference={ollama.url},vllm={openai.url}/v1,ocr={plain.url}",
    )
    backends = Backends(settings)
    assert [b.status for b in backends.by_name.values()] == [
        "ready",
        "starting",
        "starting",
        "starting",
    ]
    await backends.probe_all(http)
    llm, vllm, ocr = backends.get("llm-inference"), backends.get("vllm"), backends.get("ocr")
    assert llm is not None
    assert vllm is not None
    assert ocr is not None
    assert (llm.kind, llm.status, llm.models) == (
        "ollama",
        "ready",
        ["llama3:latest", "qwen2.5:7b"],
    )
    assert (vllm.kind, vllm.status, vllm.models) == (
        "openai",
        "ready",
        ["meta-llama/Llama-3.1-8B-Instruct"],
    )
    assert (ocr.kind, ocr.status, ocr.models) == ("http", "ready", [])
    offers = {o.name: o for o in backends.offers()}
    assert offers["llm-inference"].models == ["llama3:latest", "qwen2.5:7b"]
    assert offers["echo"].status == "ready"
    assert [h.name for h in backends.health()] == ["echo", "llm-inference", "vllm", "ocr"]


async def test_status_starting_ready_unhealthy(tmp_path: Path, http: aiohttp.ClientSession) -> None:
    port = free_port()
    backends = Backends(agent_settings(tmp_path, services=f"svc=http://127.0.0.1:{port}"))
    svc = backends.get("svc")
    assert svc is not None
    await backends.probe(http, svc)
    assert svc.status == "starting"  # a model still loading: never answered yet
    site = await start_site(plain_app(200), port)
    try:
        await backends.probe(http, svc)
        assert svc.status == "ready"
    finally:
        await site.runner.cleanup()
    await backends.probe(http, svc)
    assert svc.status == "unhealthy"
    site = await start_site(plain_app(500), port)
    try:
        await backends.probe(http, svc)
        assert svc.status == "unhealthy"
    finally:
        await site.runner.cleanup()


async def test_autodetect_prefers_ollama_then_openai(
    tmp_path: Path, site_factory: SiteFactory, http: aiohttp.ClientSession
) -> None:
    ollama = await site_factory(ollama_app(["llama3:latest"]))
    openai = await site_factory(openai_app(["gpt-oss-20b"]))
    both = Backends(
        agent_settings(
            tmp_path, auto_detect=True, ollama_url=ollama.url, openai_probe_urls=openai.url
        )
    )
    await both.autodetect(http)
    llm = both.get("llm-inference")
    assert llm is not None
    assert (llm.kind, llm.url, llm.models) == ("ollama", ollama.url, ["llama3:latest"])

    closed = f"http://127.0.0.1:{free_port()}"
    only_openai = Backends(
        agent_settings(
            tmp_path,
            auto_detect=True,
            ollama_url=closed,
            openai_probe_urls=f"{closed},{openai.url}",
            auto_service_name="chat",
        )
    )
    await only_openai.autodetect(http)
    chat = only_openai.get("chat")
    assert chat is not None
    assert (chat.kind, chat.models) == ("openai", ["gpt-oss-20b"])

    nothing = Backends(
        agent_settings(tmp_path, auto_detect=True, ollama_url=closed, openai_probe_urls=closed)
    )
    await nothing.autodetect(http)
    assert list(nothing.by_name) == ["echo"]

    off = Backends(agent_settings(tmp_path, auto_detect=False, ollama_url=ollama.url))
    await off.autodetect(http)
    assert list(off.by_name) == ["echo"]


async def test_explicit_service_is_not_replaced_and_own_gateway_is_not_probed(
    tmp_path: Path, site_factory: SiteFactory, http: aiohttp.ClientSession
) -> None:
    ollama = await site_factory(ollama_app(["a"]))
    explicit = Backends(
        agent_settings(tmp_path, auto_detect=True, services="llm-inference=http://127.0.0.1:1")
    )
    await explicit.autodetect(http)
    llm = explicit.get("llm-inference")
    assert llm is not None
    assert llm.url == "http://127.0.0.1:1"

    own = Backends(
        agent_settings(tmp_path, auto_detect=True, ollama_url=ollama.url, openai_probe_urls=""),
        own_urls=(ollama.url,),
    )
    await own.autodetect(http)
    assert own.get("llm-inference") is None


async def test_echo_can_be_turned_off(tmp_path: Path) -> None:
    backends = Backends(agent_settings(tmp_path, echo_service=False))
    assert backends.offers() == []


async def test_a_model_list_that_arrives_in_pieces_is_read_whole(
    site_factory: SiteFactory, http: aiohttp.ClientSession
) -> None:
    """An Ollama with many models answers /api/tags in several chunks: all of them count."""
    models = [f"model-{i:03d}:latest" for i in range(200)]  # below MAX_MODELS (256)
    body = json.dumps({"models": [{"name": m, "model": m, "size": 1} for m in models]}).encode()

    async def tags(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "application/json"})
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for start in range(0, len(body), 1000):
            await resp.write(body[start : start + 1000])
            await asyncio.sleep(0.001)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get("/api/tags", tags)
    site = await site_factory(app)
    assert await probe_ollama(http, site.url, 5.0) == sorted(models)
