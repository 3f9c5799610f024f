"""nginx as a peer: a fixed-response backend, and a keep-alive reverse proxy in front of one."""

from __future__ import annotations

import shutil
from pathlib import Path

from bench.procs import Proc, Procs, pinned

_COMMON = """worker_processes 1;
daemon off;
pid {tmp}/{name}.pid;
error_log {tmp}/{name}-error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  client_body_temp_path {tmp}/{name}-body;
  proxy_temp_path {tmp}/{name}-proxy;
  fastcgi_temp_path {tmp}/{name}-fastcgi;
  uwsgi_temp_path {tmp}/{name}-uwsgi;
  scgi_temp_path {tmp}/{name}-scgi;
{servers}
}}
"""

_BACKEND = """  server {{
    listen 127.0.0.1:{port} reuseport;
    location / {{
      default_type application/json;
      return 200 '{{"ok":true}}';
    }}
  }}"""

_PROXY = """  upstream workers {{
    server 127.0.0.1:{upstream};
    keepalive 64;
  }}
  server {{
    listen 127.0.0.1:{port} reuseport;
    location / {{
      proxy_pass http://workers;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
    }}
  }}"""


def available() -> bool:
    return shutil.which("nginx") is not None


def _start(procs: Procs, tmp: Path, name: str, servers: str, port: int, core: int) -> Proc:
    conf = tmp / f"{name}.conf"
    conf.write_text(_COMMON.format(tmp=tmp, name=name, servers=servers), encoding="utf-8")
    nginx = shutil.which("nginx") or "nginx"
    argv = [nginx, "-p", str(tmp), "-c", str(conf), "-e", str(tmp / f"{name}-error.log")]
    return procs.start(name, pinned(argv, core), port=port)


def start_backend(procs: Procs, tmp: Path, port: int, core: int) -> Proc:
    """nginx answering ``{"ok":true}`` on every path."""
    return _start(procs, tmp, "nginx-backend", _BACKEND.format(port=port), port, core)


def start_proxy(procs: Procs, tmp: Path, port: int, upstream: int, core: int) -> Proc:
    """nginx reverse proxy to ``127.0.0.1:upstream`` with keep-alive upstream connections."""
    servers = _PROXY.format(port=port, upstream=upstream)
    return _start(procs, tmp, "nginx-proxy", servers, port, core)
