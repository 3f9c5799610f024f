"""The README is the front door: its promises are checked."""

from __future__ import annotations

import re
from pathlib import Path

from coordinator.settings import CoordinatorSettings
from worker_agent.settings import WorkerSettings

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_quick_start_is_two_commands() -> None:
    assert "make run" in README
    assert "make test" in README


def test_every_coordinator_setting_is_documented() -> None:
    missing = [
        name.upper()
        for name in CoordinatorSettings.model_fields
        if f"| `{name.upper()}` |" not in README
    ]
    assert missing == [], f"settings missing from the README configuration table: {missing}"


def test_every_agent_setting_is_documented() -> None:
    section = README.split("### Worker agent (`rma-worker`)", 1)[1]
    missing = [
        name.upper()
        for name in WorkerSettings.model_fields
        if f"| `{name.upper()}` |" not in section
    ]
    assert missing == [], f"agent settings missing from the README configuration table: {missing}"


def test_every_router_var_and_secret_is_documented() -> None:
    env_ts = (ROOT / "router_worker" / "src" / "env.ts").read_text(encoding="utf-8")
    interface = env_ts.split("export interface Env {", 1)[1].split("}", 1)[0]
    names = re.findall(r"^\s+([A-Z][A-Z0-9_]*)\?:", interface, flags=re.MULTILINE)
    assert "API_KEYS" in names
    assert "SNAPSHOT_TTL_MS" in names
    section = README.split("### Router (`router_worker/wrangler.toml`)", 1)[1]
    missing = [name for name in names if f"| `{name}` |" not in section]
    assert missing == [], f"router vars missing from the README configuration table: {missing}"


def test_make_run_is_the_embedded_local_federation() -> None:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    run = makefile.split("\nrun:", 1)[1].split("\n\n", 1)[0]
    assert "rma-worker local" in run


def test_ci_runs_make_test() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
