"""``GET /status``: a small self-refreshing HTML page for people (no secrets, no URLs)."""

from __future__ import annotations

from html import escape
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from coordinator.protocol import HealthResponse
    from coordinator.registry import Registry

MAX_ROWS = 500

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse}
td,th{padding:.25em .7em;border-bottom:1px solid #ddd;text-align:left}
th{background:#f4f4f4}.suspect{color:#a60}.draining{color:#888}.num{text-align:right}
"""


def render_status(health: HealthResponse, registry: Registry) -> str:
    w = health.workers
    rows = []
    for name, ready in health.services.items():
        models = ", ".join(registry.models(name)[:12])
        rows.append(
            f"<tr><td>{escape(name)}</td><td class=num>{ready}</td><td>{escape(models)}</td></tr>"
        )
    services = "".join(rows) or "<tr><td colspan=3>no services yet</td></tr>"
    worker_rows = []
    limit = registry.strike_limit
    for i, record in enumerate(registry):
        if i >= MAX_ROWS:
            worker_rows.append(
                f"<tr><td colspan=6>... and {len(registry) - MAX_ROWS} more</td></tr>"
            )
            break
        state = record.health(limit)
        gpus = ", ".join(
            f"{g.name} ({g.memory_free_mb}/{g.memory_total_mb} MiB)"
            for g in record.capabilities.gpus
        )
        load = f"{record.cpu_pct:.0f}%" if record.cpu_pct is not None else "-"
        worker_rows.append(
            f"<tr class={state}><td>{escape(record.worker_id)}</td><td>{record.worker_type}</td>"
            f"<td>{state}</td><td>{escape(gpus) or '-'}</td>"
            f"<td>{escape(', '.join(record.assigned))}</td>"
            f"<td class=num>{record.in_flight} / cpu {load}</td></tr>"
        )
    workers = "".join(worker_rows) or "<tr><td colspan=6>no workers yet</td></tr>"
    return f"""<!doctype html>
<html lang=en><head><meta charset=utf-8><meta http-equiv=refresh content=5>
<title>Coordinator {escape(health.coordinator_id)}</title><style>{_STYLE}</style></head>
<body><h1>Coordinator {escape(health.coordinator_id)}</h1>
<p>version {escape(health.version)} &middot; up {health.uptime_s:.0f} s &middot;
{w.total} workers ({w.active} active, {w.suspect} suspect, {w.draining} draining;
{w.gpu} gpu, {w.cpu} cpu) &middot; {health.in_flight} requests in flight</p>
<h2>Services</h2><table><tr><th>service</th><th>ready workers</th><th>models</th></tr>
{services}</table>
<h2>Workers</h2><table><tr><th>worker</th><th>type</th><th>state</th><th>GPUs</th>
<th>services</th><th>in flight / load</th></tr>{workers}</table>
</body></html>
"""
