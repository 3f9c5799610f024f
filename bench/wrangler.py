"""The real router on loopback: how `wrangler dev` is started, shared by the benchmarks and tests.

One place knows the command line and environment (no metrics, no `cf` fetch, logs and config
kept in the run's own directory), so the tests and the benchmarks run the same router.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUTER_DIR = ROOT / "router_worker"
WRANGLER = ROUTER_DIR / "node_modules" / ".bin" / "wrangler"


def dev_command(port: int, work: Path, router_vars: dict[str, str]) -> list[str]:
    """``wrangler dev`` on 127.0.0.1:``port``, state persisted under ``work``, with ``--var``s."""
    argv = [
        str(WRANGLER),
        "dev",
        "--ip",
        "127.0.0.1",
        "--port",
        str(port),
        "--inspector-port",
        "0",
        "--persist-to",
        str(work / "state"),
        "--show-interactive-dev-session=false",
        "--log-level",
        "warn",
    ]
    for key, value in router_vars.items():
        argv += ["--var", f"{key}:{value}"]
    return argv


def dev_environment(work: Path) -> dict[str, str]:
    """Variables for ``wrangler dev``: offline, quiet, and writing only under ``work``."""
    return {
        "WRANGLER_SEND_METRICS": "false",
        "CLOUDFLARE_CF_FETCH_ENABLED": "false",
        "WRANGLER_LOG_PATH": str(work / "logs"),
        "XDG_CONFIG_HOME": str(work / "config"),
        "NO_COLOR": "1",
    }
