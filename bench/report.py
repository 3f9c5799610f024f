"""Result rows and the markdown report."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field

_OPS: dict[str, Callable[[float, float], bool]] = {">=": operator.ge, "<=": operator.le}


@dataclass
class Target:
    """``subject`` (``ratio`` or ``value``) ``op`` ``bound``, shown as ``text``."""

    subject: str
    op: str
    bound: float
    text: str

    def check(self, row: Row) -> bool | None:
        x = row.ratio if self.subject == "ratio" else row.value
        if x is None:
            return None
        return _OPS[self.op](x, self.bound)


@dataclass
class Row:
    metric: str
    value: float | None
    unit: str = ""
    peer: str = ""
    peer_value: float | None = None
    ratio: float | None = None
    target: Target | None = None
    note: str = ""
    skipped: str = ""  # why the figure could not be taken (a tool is missing)
    error: str = ""  # the figure could not be taken because the system under test failed
    valid: bool = True  # False when the run was not clean (errors, non-2xx answers)

    @property
    def result(self) -> str:
        if self.error:
            return "ERROR"
        if self.skipped:
            return "skipped"
        if self.target is None:
            return "info"
        ok = self.target.check(self)
        if ok is None or not self.valid:
            return "invalid"
        return "PASS" if ok else "FAIL"


@dataclass
class Report:
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    environment: list[str] = field(default_factory=list)

    def add(self, row: Row) -> Row:
        self.rows.append(row)
        return row

    def skip(self, metric: str, why: str, target: Target | None = None) -> None:
        self.rows.append(Row(metric, None, target=target, skipped=why))

    def error(self, metric: str, why: str, target: Target | None = None) -> None:
        self.rows.append(Row(metric, None, target=target, error=why))

    @property
    def failed(self) -> list[Row]:
        return [r for r in self.rows if r.result in ("FAIL", "invalid", "ERROR")]

    def table(self) -> str:
        head = "| metric | value | peer | peer value | ratio | target | result |"
        lines = [head, "|---|---:|---|---:|---:|---|---|"]
        for r in self.rows:
            value = fmt(r.value, r.unit)
            if r.skipped:
                value = f"skipped: {r.skipped}"
            elif r.error:
                value = f"error: {r.error}"
            peer_value = fmt(r.peer_value, r.unit) if r.peer_value is not None else ""
            ratio = f"{r.ratio:.3f}" if r.ratio is not None else ""
            target = r.target.text if r.target else ""
            metric = r.metric + (f" ({r.note})" if r.note else "")
            cells = [metric, value, r.peer, peer_value, ratio, target, f"**{r.result}**"]
            lines.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        return "\n".join(lines)

    def markdown(self, title: str) -> str:
        parts = [f"# {title}", ""]
        if self.environment:
            parts += ["## Environment", "", *[f"- {e}" for e in self.environment], ""]
        parts += ["## Results", "", self.table(), ""]
        if self.notes:
            parts += ["## Notes", "", *[f"- {n}" for n in self.notes], ""]
        return "\n".join(parts)


def fmt(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if unit == "req/s" or unit == "reg/s":
        return f"{value:,.0f} {unit}"
    if unit == "us":
        return f"{value:,.1f} us"
    if unit == "ms":
        return f"{value:,.2f} ms"
    if unit == "B":
        return f"{value:,.0f} B ({value / 1024:.2f} KiB)"
    if unit == "bool":
        return "yes" if value else "no"
    return f"{value:,.3g} {unit}".strip()
