"""``rma-coordinator``: run an edge coordinator (``rma-coordinator --help``)."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

from aiohttp import web

from coordinator.logs import configure_logging
from coordinator.settings import CoordinatorSettings


def _install_uvloop() -> None:
    try:
        import uvloop
    except ImportError:  # pragma: no cover - non-CPython or Windows
        return
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="rma-coordinator",
        description="Edge coordinator of the RMA volunteer-compute federation. Every option "
        "is also an environment variable (upper-case name); flags win.",
    )
    parser.add_argument(
        "command",
        nargs="?",
        choices=["serve", "demo"],
        default="serve",
        help="serve (default), or demo: a loopback coordinator with an echo worker registered",
    )
    parser.add_argument("--host", help="COORDINATOR_HOST (default 0.0.0.0)")
    parser.add_argument("--port", type=int, help="COORDINATOR_PORT (default 8080)")
    parser.add_argument("--coordinator-id", help="COORDINATOR_ID")
    parser.add_argument("--heartbeat-interval", type=float, help="HEARTBEAT_INTERVAL (s)")
    parser.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    parser.add_argument("--log-format", choices=["auto", "json", "console"])
    return parser


def settings_from_args(args: argparse.Namespace) -> CoordinatorSettings:
    overrides = {
        "coordinator_host": args.host,
        "coordinator_port": args.port,
        "coordinator_id": args.coordinator_id,
        "heartbeat_interval": args.heartbeat_interval,
        "log_level": args.log_level,
        "log_format": args.log_format,
    }
    if args.command == "demo":
        overrides.setdefault("coordinator_host", None)
        overrides["coordinator_host"] = args.host or "127.0.0.1"
        overrides["dev_allow_loopback"] = True
    return CoordinatorSettings(**{k: v for k, v in overrides.items() if v is not None})


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = settings_from_args(args)
    except ValueError as exc:
        sys.stderr.write(f"rma-coordinator: invalid configuration:\n{exc}\n")
        return 2
    configure_logging(settings.log_level, settings.log_format)
    _install_uvloop()
    if args.command == "demo":
        from coordinator.demo import run_demo

        return run_demo(settings)
    from coordinator.app import create_app

    asyncio.run(serve(create_app(settings), settings.coordinator_host, settings.coordinator_port))
    return 0


async def serve(app: web.Application, host: str, port: int) -> None:
    """Serve ``app`` behind the front door until SIGINT or SIGTERM, then shut down gracefully."""
    from coordinator.frontdoor import FrontRunner

    runner = FrontRunner(app, access_log=None, shutdown_timeout=30)
    await runner.setup()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await web.TCPSite(runner, host, port).start()
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    raise SystemExit(main())
