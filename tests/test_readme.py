"""The README is the front door: its promises are checked."""

from __future__ import annotations

from pathlib import Path

from coordinator.settings import CoordinatorSettings

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


def test_ci_runs_make_test() -> None:
    assert "make test" in (ROOT / ".ci" / "run").read_text(encoding="utf-8")
