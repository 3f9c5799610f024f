"""``python -m worker_agent.healthcheck``: the container's health check (standard library only).

A running agent writes the URL of what it serves (its gateway, or in edge mode its coordinator)
to ``STATE_DIR/health-url`` once it listens; the gateway may have moved to a free port because
``GATEWAY_PORT`` was taken (``--network host`` beside vLLM, say). This checks that URL, falling
back to ``GATEWAY_PORT``. Exit status 0: healthy; 1: not.
"""

from __future__ import annotations

import os
import sys
import urllib.request
from pathlib import Path

FILE_NAME = "health-url"


def health_url(environ: dict[str, str]) -> str:
    state = Path(environ.get("STATE_DIR") or "~/.local/state/rma-worker").expanduser()
    try:
        url = (state / FILE_NAME).read_text(encoding="ascii").strip()
    except (OSError, UnicodeError):
        url = ""
    if url.startswith("http://127.0.0.1:") and url.endswith("/health"):
        return url
    return f"http://127.0.0.1:{environ.get('GATEWAY_PORT') or '8000'}/health"


def main() -> int:
    url = health_url(dict(os.environ))
    try:
        with urllib.request.urlopen(url, timeout=4) as resp:  # noqa: S310 (loopback, checked)
            healthy = resp.status == 200
    except (OSError, ValueError) as exc:
        sys.stderr.write(f"unhealthy: {url}: {exc}\n")
        return 1
    return 0 if healthy else 1


def write_health_url(state_dir: Path, port: int) -> None:
    """Record where this agent answers ``/health`` (best effort: the state dir may be read-only)."""
    path = state_dir.expanduser() / FILE_NAME
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(f"http://127.0.0.1:{port}/health\n", encoding="ascii")
        tmp.replace(path)
    except OSError:
        pass


if __name__ == "__main__":
    sys.exit(main())
