"""``rma-worker``: the universal worker agent (``rma-worker --help``).

Commands: ``run`` (default: a compute worker, or an edge coordinator with ``WORKER_TYPE=edge``),
``local`` (a coordinator and this machine as its worker, on loopback), ``detect`` (capabilities
as JSON) and ``status`` (services and, with ``ADMIN_TOKEN``, workers of ``COORDINATOR_URL``).
Every option is an environment variable; the flags mirror them (secrets are environment-only,
so that they never show in a process list) and win over them.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Any

import aiohttp
from pydantic import ValidationError

from coordinator.logs import configure_logging
from coordinator.protocol import HealthResponse, ServicesResponse, WorkersResponse
from worker_agent import __version__
from worker_agent.settings import SECRET_FIELDS, WorkerSettings

COMMANDS = ("run", "local", "detect", "status")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rma-worker",
        description="Universal worker agent of the RMA volunteer-compute federation. Every "
        "option is an environment variable (the upper-case name); flags win. Tokens are read "
        "from the environment only: " + ", ".join(sorted(n.upper() for n in SECRET_FIELDS)) + ".",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=COMMANDS,
        default="run",
        help="run (default), local (coordinator + this worker on 127.0.0.1), detect "
        "(capabilities as JSON), status (services and workers of COORDINATOR_URL)",
    )
    parser.add_argument("--version", action="version", version=f"rma-worker {__version__}")
    for name, info in WorkerSettings.model_fields.items():
        if name in SECRET_FIELDS:
            continue
        parser.add_argument(
            f"--{name.replace('_', '-')}",
            dest=name,
            metavar="VALUE",
            default=None,
            help=f"{name.upper()}: {info.description or ''}",
        )
    return parser


def settings_from_args(args: argparse.Namespace) -> WorkerSettings:
    overrides = {
        name: getattr(args, name)
        for name in WorkerSettings.model_fields
        if name not in SECRET_FIELDS and getattr(args, name, None) is not None
    }
    return WorkerSettings(**overrides)


def _run(factory: Callable[[], Coroutine[Any, Any, int]]) -> int:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - non-CPython or Windows
        return asyncio.run(factory())
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(factory())


# ------------------------------------------------------------------------------------ detect


async def detect_report(settings: WorkerSettings) -> dict[str, Any]:
    from worker_agent.backends import Backends
    from worker_agent.capabilities import GpuMonitor, detect, resolve_worker_type

    gpus = await asyncio.to_thread(GpuMonitor)
    try:
        caps = await asyncio.to_thread(detect, settings.state_dir, gpus)
    finally:
        gpus.close()
    backends = Backends(settings, own_urls=(f"http://127.0.0.1:{settings.gateway_port}",))
    async with aiohttp.ClientSession() as session:
        await backends.autodetect(session)
        await backends.probe_all(session)
    return {
        "agent_version": __version__,
        "worker_type": resolve_worker_type(settings.worker_type, caps),
        "nvml": "ok" if gpus.error is None else gpus.error,
        "capabilities": caps.model_dump(mode="json"),
        "services": [o.model_dump(mode="json") for o in backends.offers()],
    }


# ------------------------------------------------------------------------------------ status


def _table(headers: list[str], rows: list[list[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    return "\n".join(line.rstrip() for line in lines) + "\n"


def render_status(
    url: str,
    health: HealthResponse | None,
    services: ServicesResponse,
    workers: WorkersResponse | None,
) -> str:
    out = []
    if health is not None:
        out.append(
            f"Coordinator {health.coordinator_id} at {url} (version {health.version}, protocol "
            f"{health.protocol_version}, up {health.uptime_s:.0f} s, {health.workers.total} "
            f"workers, {health.in_flight} in flight)\n"
        )
    else:
        out.append(f"{url} (coordinator {services.coordinator_id})\n")
    out.append("\n")
    out.append(
        _table(
            ["SERVICE", "READY", "WORKERS", "MODELS"],
            [
                [
                    s.name,
                    str(s.ready_workers),
                    str(s.workers),
                    ", ".join(s.models[:5]) + (" ..." if len(s.models) > 5 else "") or "-",
                ]
                for s in services.services
            ],
        )
    )
    if workers is not None:
        out.append("\n")
        out.append(
            _table(
                ["WORKER", "TYPE", "STATE", "SERVICES", "IN-FLIGHT", "LAST BEAT", "GPUS"],
                [
                    [
                        w.worker_id,
                        w.worker_type,
                        w.state,
                        ",".join(w.assigned_services) or "-",
                        str(w.in_flight),
                        f"{w.last_heartbeat_age_s:.1f} s ago",
                        ", ".join(g.name for g in w.capabilities.gpus) or "-",
                    ]
                    for w in workers.workers
                ],
            )
        )
    return "".join(out)


async def status(settings: WorkerSettings) -> int:
    from worker_agent.client import ControlClient, ControlError

    url = settings.coordinator_url
    if not url:
        sys.stderr.write("rma-worker status: COORDINATOR_URL is empty\n")
        return 2
    async with aiohttp.ClientSession() as session:
        client = ControlClient(session, settings.http_timeout)
        try:
            services = await client.services(url)
        except ControlError as exc:
            sys.stderr.write(f"rma-worker status: {exc}\n")
            return 1
        health = None
        with contextlib.suppress(ControlError):
            health = await client.health(url)
        workers = None
        if settings.admin_token is not None:
            try:
                workers = await client.workers(url, settings.admin_token.get_secret_value())
            except ControlError as exc:
                sys.stderr.write(f"rma-worker status: workers: {exc}\n")
    sys.stdout.write(render_status(url, health, services, workers))
    return 0


# ------------------------------------------------------------------------------------ run


async def run(settings: WorkerSettings) -> int:
    from worker_agent.agent import Agent, Component, serve
    from worker_agent.tunnel import CloudflaredNotFound, TunnelError

    component: Component
    if settings.worker_type == "edge":
        from worker_agent.edge import EdgeAgent  # loads the coordinator: only when needed

        component = EdgeAgent(settings)
    else:
        component = Agent(settings)
    try:
        await serve(component)
    except CloudflaredNotFound as exc:
        sys.stderr.write(f"rma-worker: {exc}\n")
        return 1
    except TunnelError as exc:
        sys.stderr.write(f"rma-worker: tunnel: {exc}\n")
        return 1
    except OSError as exc:
        sys.stderr.write(f"rma-worker: {exc}\n")
        return 1
    return 0


async def local(settings: WorkerSettings) -> int:
    from worker_agent.agent import serve
    from worker_agent.local import LocalStack

    stack = LocalStack(settings)
    try:
        await serve(stack, on_started=stack.print_banner)
    except TimeoutError as exc:  # an OSError subclass, but not a busy port
        sys.stderr.write(f"rma-worker local: start-up timed out ({exc or 'no detail'}).\n")
        return 1
    except OSError as exc:
        if exc.errno in (errno.EADDRINUSE, errno.EACCES):
            sys.stderr.write(
                f"rma-worker local: cannot listen on 127.0.0.1:{settings.coordinator_port}: "
                f"{exc}. Set COORDINATOR_PORT to a free port.\n"
            )
        else:
            sys.stderr.write(f"rma-worker local: cannot start: {exc}\n")
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from worker_agent.backends import ServicesError, parse_services

    try:
        settings = settings_from_args(args)
        parse_services(settings.services)
        settings.probe_urls  # noqa: B018 - validates OPENAI_PROBE_URLS
    except (ValidationError, ServicesError, ValueError) as exc:
        sys.stderr.write(f"rma-worker: invalid configuration:\n{exc}\n")
        return 2
    command: str = args.command
    if command in ("detect", "status"):
        configure_logging("warning" if settings.log_level == "info" else settings.log_level)
    else:
        configure_logging(settings.log_level, settings.log_format)
    if command == "detect":

        async def report() -> int:
            data = await detect_report(settings)
            sys.stdout.write(json.dumps(data, indent=2) + "\n")
            return 0

        return _run(report)
    if command == "status":
        return _run(lambda: status(settings))
    if command == "local":
        return _run(lambda: local(settings))
    return _run(lambda: run(settings))


if __name__ == "__main__":
    raise SystemExit(main())
