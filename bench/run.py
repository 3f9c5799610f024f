"""``python -m bench.run`` (``make bench``): every figure in one run, written to bench/results.md.

Each figure is a ratio to a peer measured in the same run (or an absolute bound where there is
no peer): the coordinator's heartbeat endpoint against a bare aiohttp JSON handler, the registry
at 100,000 workers against 1,000, and the proxy against nginx on the same backend. Servers under
test are pinned to core 1 and load generators/backends to core 0. Nothing is installed here:
when ``wrk`` or ``nginx`` is missing, the comparisons that need them are skipped with the
``apt-get`` command that provides them.
"""

from __future__ import annotations

import argparse
import datetime as dt
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import FrameType

import aiohttp
import psutil
import pydantic

from bench import federation, nginx, scenarios, wrk
from bench.procs import CLIENT_CORE, SERVER_CORE, Procs, can_pin, cores, pin_self
from bench.report import Report
from bench.scenarios import APT_HINT, Options, log

RESULTS = Path(__file__).with_name("results.md")
SECTIONS = ("registry", "heartbeat", "proxy", "hops", "failover", "footprint")


def _version(argv: list[str]) -> str:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except OSError:
        return "missing"
    text = (done.stdout + done.stderr).strip().splitlines()
    return text[0] if text else "?"


def environment() -> list[str]:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = psutil.virtual_memory().total / 2**30
    pin = (
        f"servers under test on core {SERVER_CORE}, load generators and backends on core "
        f"{CLIENT_CORE} (taskset)"
        if can_pin()
        else "NOT pinned (taskset missing or fewer than 2 cores): ratios are less reliable"
    )
    return [
        f"date: {dt.datetime.now(dt.UTC).strftime('%Y-%m-%d %H:%M UTC')}",
        f"machine: {cpu}, {cores()} usable cores, {mem:.0f} GiB RAM",
        f"python {platform.python_version()}, aiohttp {aiohttp.__version__}, "
        f"pydantic {pydantic.VERSION}",
        f"wrk: {_version(['wrk', '--version']) if wrk.available() else 'missing'}; "
        f"nginx: {_version(['nginx', '-v']) if nginx.available() else 'missing'}",
        f"pinning: {pin}",
    ]


def background_load(seconds: float = 1.0) -> list[float]:
    """Busy share of each core before the bench starts anything (other people's work)."""
    per_cpu = psutil.cpu_percent(interval=seconds, percpu=True)
    return [per_cpu[c] for c in (CLIENT_CORE, SERVER_CORE) if c < len(per_cpu)]


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    parser.add_argument("--only", default=",".join(SECTIONS), help="comma-separated sections")
    parser.add_argument("--duration", type=float, default=6.0, help="seconds per wrk run")
    parser.add_argument("--rounds", type=int, default=2, help="alternating wrk rounds")
    parser.add_argument("--warmup", type=float, default=2.0, help="seconds of wrk warm-up")
    parser.add_argument("--quick", action="store_true", help="short runs, for a smoke test")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if unknown := only - set(SECTIONS):
        parser.error(f"unknown sections: {sorted(unknown)}")

    opt = Options(duration=args.duration, warmup=args.warmup, rounds=args.rounds)
    if args.quick:
        opt = Options(
            duration=2,
            warmup=1,
            hb_workers=1_000,
            registry_workers=20_000,
            rate_low=1_000,
            decisions=20_000,
            latency_requests=300,
            ttfb_runs=50,
            rounds=1,
        )

    signal.signal(signal.SIGTERM, _on_sigterm)
    missing = [tool for tool in ("wrk", "nginx") if shutil.which(tool) is None]
    if missing:
        log(f"missing: {', '.join(missing)}. Install with `{APT_HINT}`; dependent figures skip.")
    pin_self(CLIENT_CORE)
    report = Report(environment=environment())
    busy = background_load()
    shown = ", ".join(f"{b:.0f}%" for b in busy)
    report.environment.append(f"CPU busy before the run (client, server core): {shown}")
    if max(busy, default=0.0) > 15:
        log(f"warning: the machine is busy before the run ({shown}); figures will be noisy")
        report.notes.append(
            f"The machine was busy before the run ({shown}): other work shares these cores, so "
            "figures are noisy. Runs alternate and the best of each counts, which limits this."
        )
    started = time.monotonic()
    status = 0
    with tempfile.TemporaryDirectory(prefix="rma-bench-") as tmp_name:
        tmp = Path(tmp_name)
        with Procs(tmp) as procs:
            for section in SECTIONS:
                if section not in only:
                    continue
                try:
                    if section == "registry":
                        scenarios.registry(report, opt)
                    elif section == "heartbeat":
                        scenarios.heartbeat(report, procs, tmp, opt)
                    elif section == "proxy":
                        scenarios.proxy(report, procs, tmp, opt)
                    elif section == "hops":
                        federation.hops(report, procs, tmp, opt)
                    elif section == "failover":
                        federation.failover(report, procs, tmp, opt)
                    else:
                        federation.footprint(report, opt, quick=args.quick)
                except Exception as exc:
                    status = 1
                    log(f"{section} failed: {exc}")
                    report.notes.append(f"section {section} failed: {exc}".splitlines()[0])
                finally:
                    procs.close()
    elapsed = time.monotonic() - started
    report.notes.append(f"whole run: {elapsed:.0f} s")
    text = report.markdown("Coordinator bench")
    args.output.write_text(text, encoding="utf-8")
    print()
    print(text)
    failed = report.failed
    if failed:
        log(f"{len(failed)} target(s) missed: " + "; ".join(r.metric for r in failed))
    log(f"written to {args.output}")
    return status


if __name__ == "__main__":
    sys.exit(main())
