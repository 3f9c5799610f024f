"""Figures for the worker agent: idle RSS, start → registered, heartbeat CPU cost.

    .venv/bin/python -m bench.agent_footprint [--idle-window 60] [--fast-window 15]

``make bench`` reports :func:`footprint` (section ``footprint`` of bench/run.py).

Runs a real coordinator in this process and ``rma-worker run`` as a subprocess with the fake
cloudflared (quick-tunnel mode, so the tunnel process, its watchdog and the gateway are all up).
The agent's CPU time is read from ``/proc/<pid>/stat`` (its own process only: the coordinator runs
here and the fake cloudflared is a separate process).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from coordinator.app import COORDINATOR, create_app
from coordinator.logs import configure_logging
from coordinator.settings import CoordinatorSettings

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def run_once(state: Path, interval: float, window: float) -> dict[str, float]:
    app = create_app(
        CoordinatorSettings(
            dev_allow_loopback=True,
            coordinator_state_dir=state / "coord",
            heartbeat_interval=interval,
            log_level="warning",
        ),
        coordinator_id="coord-measure",
    )
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    port = runner.addresses[0][1]
    registry = app[COORDINATOR].registry
    env = {
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "HOME": os.environ.get("HOME", "/tmp"),
        "COORDINATOR_URL": f"http://127.0.0.1:{port}",
        "STATE_DIR": str(state / "agent"),
        "GATEWAY_PORT": "0",
        "CLOUDFLARED_PATH": str(ROOT / "tests" / "fake_cloudflared"),
        "CLOUDFLARED_DOWNLOAD": "false",
        "AUTO_DETECT": "false",
        "HEARTBEAT_MIN_INTERVAL": str(min(interval, 1.0)),
        "LOG_LEVEL": "warning",
        "LOG_FORMAT": "json",
    }
    started = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        str(BIN / "rma-worker"),
        "run",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        while len(registry) == 0:
            await asyncio.sleep(0.005)
        registered_s = time.monotonic() - started
        record = next(iter(registry))
        await asyncio.sleep(2.0)  # settle: imports done, first probes and beats sent
        beats_before = record.last_beat
        cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
        beats = 0
        deadline = t0 + window
        last = beats_before
        while time.monotonic() < deadline:
            await asyncio.sleep(min(interval / 2, 0.5))
            if record.last_beat != last:
                beats += 1
                last = record.last_beat
        cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
        return {
            "registered_s": registered_s,
            "rss_mib": rss_mib(proc.pid),
            "cpu_s": cpu1 - cpu0,
            "window_s": t1 - t0,
            "beats": float(beats),
        }
    finally:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        await proc.wait()
        await runner.cleanup()


async def footprint(
    window: float = 45.0, fast_interval: float = 0.05, fast_window: float = 8.0
) -> dict[str, Any]:
    """Idle agent at the default 15 s interval over ``window`` s, and CPU per heartbeat."""
    with tempfile.TemporaryDirectory(prefix="rma-footprint-") as tmp:
        idle = await run_once(Path(tmp) / "idle", 15.0, window)
        fast = await run_once(Path(tmp) / "fast", fast_interval, fast_window)
        base = await run_once(Path(tmp) / "base", 3600.0, fast_window)
    per_beat = (fast["cpu_s"] / fast["window_s"] - base["cpu_s"] / base["window_s"]) * (
        fast["window_s"] / max(fast["beats"], 1)
    )
    return {"idle": idle, "per_beat_s": per_beat, "fast_beats": fast["beats"]}


async def main() -> None:
    configure_logging("warning")
    parser = argparse.ArgumentParser()
    parser.add_argument("--idle-window", type=float, default=60.0)
    parser.add_argument("--fast-interval", type=float, default=0.05)
    parser.add_argument("--fast-window", type=float, default=15.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        starts = [await run_once(Path(tmp) / f"s{i}", 15.0, 0.0) for i in range(5)]
        idle = await run_once(Path(tmp) / "idle", 15.0, args.idle_window)
        fast = await run_once(Path(tmp) / "fast", args.fast_interval, args.fast_window)
        base = await run_once(Path(tmp) / "base", 3600.0, args.fast_window)
    reg = sorted(s["registered_s"] for s in starts)
    per_beat = (fast["cpu_s"] / fast["window_s"] - base["cpu_s"] / base["window_s"]) * (
        fast["window_s"] / max(fast["beats"], 1)
    )
    sys.stdout.write(
        f"start -> registered (fake quick tunnel), 5 runs: median {reg[2] * 1000:.0f} ms, "
        f"min {reg[0] * 1000:.0f} ms, max {reg[-1] * 1000:.0f} ms\n"
        f"agent RSS at idle: {idle['rss_mib']:.1f} MiB\n"
        f"idle agent CPU at the default 15 s interval: {idle['cpu_s']:.3f} s CPU over "
        f"{idle['window_s']:.0f} s ({idle['beats']:.0f} beats) = "
        f"{idle['cpu_s'] / idle['window_s'] * 60 * 1000:.0f} ms CPU per minute "
        f"(beats + backend probes every 10 s + tunnel checks every 5 s)\n"
        f"one heartbeat: {per_beat * 1000:.2f} ms CPU ({fast['beats']:.0f} beats at "
        f"{args.fast_interval} s minus a no-beat baseline) -> "
        f"{per_beat * 4 * 1000:.1f} ms CPU per minute at 15 s\n"
    )


if __name__ == "__main__":
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(main())
