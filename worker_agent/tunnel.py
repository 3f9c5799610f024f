"""Cloudflare tunnels: how the coordinator (or the router) reaches a machine behind NAT.

Modes:
- ``quick`` (default with ``USE_TUNNEL=true``): ``cloudflared tunnel --no-autoupdate --url
  http://127.0.0.1:<port> --metrics 127.0.0.1:<free port>``; the hostname is read from the metrics
  server's ``/quicktunnel`` (the stderr banner is only a fallback), then ``/ready`` must be 200.
- ``named`` (``TUNNEL_TOKEN`` + ``TUNNEL_URL``): ``cloudflared tunnel run`` with the token in the
  environment (never on the command line, never logged); the URL is ``TUNNEL_URL``.
- ``external`` (edge, ``TUNNEL_METRICS_URL``): another cloudflared (the compose stack's container)
  runs the tunnel; its ``/quicktunnel`` is polled for the hostname.
- ``none`` (``USE_TUNNEL=false``): ``TUNNEL_URL``, or the local URL itself, is advertised.

A watchdog restarts cloudflared when it exits or when ``/ready`` fails ``TUNNEL_READY_FAILURES``
checks in a row, with backoff; a new quick-tunnel URL is handed to ``on_change`` at once.
Creation rate limits (429 / 1015, "failed to unmarshal quick Tunnel") are retried, not fatal.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import ipaddress
import os
import re
import shutil
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

import aiohttp
import structlog

from worker_agent.replies import read_capped
from worker_agent.retry import retry_forever
from worker_agent.settings import WorkerSettings

log = structlog.get_logger("worker_agent.tunnel")

TunnelMode = Literal["quick", "named", "external", "none"]
OnChange = Callable[[str], Awaitable[None]]

_RATE_LIMITED = ("429 too many requests", "error code: 1015", "failed to unmarshal quick tunnel")
_BOX_URL = re.compile(r"\|\s+(https?://[^\s|]+)\s+\|")
_LEVEL = re.compile(r"^\S+\s+(DBG|INF|WRN|ERR|FTL)\s")
_LOOPBACK = frozenset({"localhost"})
_HOSTNAME = re.compile(r"^(?=.{1,253}(:|$))[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?(:[0-9]{1,5})?$")


class TunnelError(Exception):
    """The tunnel could not be opened."""


class CloudflaredNotFound(TunnelError):
    """No cloudflared binary: fatal, the message names every place that was tried."""


class TunnelRateLimited(TunnelError):
    """trycloudflare.com refused to create a quick tunnel for now."""


class TunnelStartFailed(TunnelError):
    """cloudflared exited, or gave no URL or readiness in time."""


def find_cloudflared(
    configured: str | None,
    *,
    allow_download: bool,
    download: Callable[[], str] | None = None,
) -> str:
    """``CLOUDFLARED_PATH``, else ``cloudflared`` on ``PATH``, else pycloudflared's download."""
    tried = []
    if configured:
        path = Path(configured).expanduser()
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
        tried.append(f"CLOUDFLARED_PATH={configured} is not an executable file")
    else:
        tried.append("CLOUDFLARED_PATH is unset")
    found = shutil.which("cloudflared")
    if found:
        return found
    tried.append("no `cloudflared` on PATH")
    if allow_download:
        try:
            return (download or _pycloudflared_download)()
        except Exception as exc:
            tried.append(f"pycloudflared download failed ({type(exc).__name__}: {exc})")
    else:
        tried.append("pycloudflared download is off (CLOUDFLARED_DOWNLOAD=false)")
    raise CloudflaredNotFound(
        "cloudflared not found: " + "; ".join(tried) + ". Install cloudflared, set "
        "CLOUDFLARED_PATH, or `pip install rma-federation[tunnel]`; or run with USE_TUNNEL=false."
    )


def _pycloudflared_download() -> str:
    from pycloudflared.util import download, get_info

    info = get_info()
    if not Path(info.executable).exists():
        download(info)
    return str(info.executable)


def _is_loopback(host: str) -> bool:
    if host in _LOOPBACK:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_from_hostname(hostname: str) -> str:
    """``abc.trycloudflare.com`` -> ``https://abc.trycloudflare.com`` (loopback stays http)."""
    value = hostname.strip().rstrip("/")
    if value.startswith(("http://", "https://")):
        return value
    host = value.rsplit(":", 1)[0] if value.count(":") == 1 else value
    return f"{'http' if _is_loopback(host) else 'https'}://{value}"


def _tunnel_url_or_none(url: str) -> str | None:
    """``url`` if it is a bare ``http(s)://host[:port]`` (what a quick-tunnel banner shows)."""
    parts = urlsplit(url.rstrip("/"))
    if parts.scheme not in ("http", "https") or parts.path or parts.query or parts.fragment:
        return None
    return url.rstrip("/") if _HOSTNAME.match(parts.netloc) else None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class CloudflaredProcess:
    """One run of cloudflared; its stderr is drained into the logs."""

    def __init__(
        self,
        argv: list[str],
        metrics: str,
        *,
        env: dict[str, str] | None = None,
        redact: tuple[str, ...] = (),
        probe_timeout: float = 2.0,
    ) -> None:
        self.argv = argv
        self.metrics = metrics
        self.probe_timeout = probe_timeout
        self.env = env
        self.redact = tuple(r for r in redact if r)
        self.proc: asyncio.subprocess.Process | None = None
        self.banner_url: str | None = None
        self.rate_limited = False
        self.tail: collections.deque[str] = collections.deque(maxlen=20)
        self._drain: asyncio.Task[None] | None = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def start(self) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            *self.argv,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
            env=self.env,
        )
        log.info("cloudflared_started", pid=self.proc.pid, metrics=self.metrics)
        self._drain = asyncio.create_task(self._read_stderr(), name="cloudflared-stderr")

    def _clean(self, line: str) -> str:
        for secret in self.redact:
            line = line.replace(secret, "***")
        return line

    async def _read_stderr(self) -> None:
        assert self.proc is not None
        assert self.proc.stderr is not None
        seen_box = False
        while True:
            raw = await self.proc.stderr.readline()
            if not raw:
                return
            line = self._clean(raw.decode("utf-8", "replace").rstrip()[:2000])
            self.tail.append(line)
            lower = line.lower()
            if any(marker in lower for marker in _RATE_LIMITED):
                self.rate_limited = True
            if "your quick tunnel has been created" in lower:
                seen_box = True
            elif seen_box and self.banner_url is None and (m := _BOX_URL.search(line)):
                self.banner_url = _tunnel_url_or_none(m.group(1))
            level = m.group(1) if (m := _LEVEL.match(line)) else "INF"
            if level in ("ERR", "FTL"):
                log.warning("cloudflared", line=line)
            elif level == "DBG":
                log.debug("cloudflared", line=line)
            else:
                log.info("cloudflared", line=line)

    async def _get(self, session: aiohttp.ClientSession, path: str) -> tuple[int, bytes]:
        async with session.get(
            f"http://{self.metrics}{path}",
            timeout=aiohttp.ClientTimeout(total=self.probe_timeout),
            allow_redirects=False,
        ) as resp:
            return resp.status, await read_capped(resp, 64 * 1024)

    async def hostname(self, session: aiohttp.ClientSession) -> str | None:
        return await quicktunnel_hostname(session, f"http://{self.metrics}", self.probe_timeout)

    async def ready(self, session: aiohttp.ClientSession) -> bool:
        try:
            status, _ = await self._get(session, "/ready")
        except (aiohttp.ClientError, TimeoutError):
            return False
        return status == 200

    async def wait_exit(self) -> None:
        if self.proc is not None:
            await self.proc.wait()

    async def stop(self, limit_s: float) -> None:
        proc = self.proc
        if proc is not None and proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.terminate()
            try:
                async with asyncio.timeout(limit_s):
                    await proc.wait()
            except TimeoutError:
                log.warning("cloudflared_killed", pid=proc.pid, after_s=limit_s)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()
        if self._drain is not None:
            with contextlib.suppress(asyncio.TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(self._drain, 1.0)
            self._drain = None
        if proc is not None:
            log.info("cloudflared_stopped", pid=proc.pid, returncode=proc.returncode)


async def quicktunnel_hostname(
    session: aiohttp.ClientSession, metrics_url: str, limit_s: float = 2.0
) -> str | None:
    """The hostname a cloudflared metrics server reports at ``/quicktunnel``, if any."""
    try:
        async with session.get(
            f"{metrics_url.rstrip('/')}/quicktunnel",
            timeout=aiohttp.ClientTimeout(total=limit_s),
            allow_redirects=False,
        ) as resp:
            if resp.status != 200:
                return None
            data = await resp.json(content_type=None)
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None
    host = data.get("hostname") if isinstance(data, dict) else None
    if not isinstance(host, str) or not host.strip():
        return None
    if not _HOSTNAME.match(host.strip()):
        # Not a hostname (a changed or broken metrics server): never advertise it; the caller
        # keeps polling, falls back to the banner, or restarts cloudflared.
        log.warning("quicktunnel_hostname_invalid", hostname=host[:100])
        return None
    return host.strip()


class Tunnel:
    """The agent's tunnel in one of the four modes, with its watchdog."""

    def __init__(
        self,
        settings: WorkerSettings,
        *,
        local_url: str,
        session: aiohttp.ClientSession,
        on_change: OnChange | None = None,
        mode: TunnelMode | None = None,
    ) -> None:
        self.settings = settings
        self.local_url = local_url
        self.session = session
        self.on_change = on_change
        self.mode: TunnelMode = mode or self.mode_for(settings)
        self.url: str | None = None
        self.process: CloudflaredProcess | None = None
        self.restarts = 0
        self._quick_restarts = 0
        self._last_restart = float("-inf")
        self._binary: str | None = None
        self._poll = settings.tunnel_poll_interval

    @staticmethod
    def mode_for(settings: WorkerSettings) -> TunnelMode:
        if not settings.use_tunnel:
            return "none"
        if settings.tunnel_metrics_url:
            return "external"
        if settings.tunnel_token is not None:
            return "named"
        return "quick"

    # ------------------------------------------------------------------ start

    async def start(self) -> str:
        """Open the tunnel (retrying with backoff) and return its public URL."""
        if self.mode == "none":
            self.url = self.settings.tunnel_url or self.local_url
            log.info("tunnel_off", url=self.url)
            return self.url
        if self.mode == "named" and not self.settings.tunnel_url:
            raise TunnelError("a named tunnel (TUNNEL_TOKEN) needs its public URL in TUNNEL_URL")
        if self.mode in ("quick", "named") and self._binary is None:
            self._binary = find_cloudflared(
                self.settings.cloudflared_path, allow_download=self.settings.cloudflared_download
            )
        self.url = await retry_forever(
            self._start_once,
            what="tunnel_start",
            initial=self.settings.tunnel_backoff_initial,
            maximum=self.settings.tunnel_backoff_max,
            retry_on=(TunnelRateLimited, TunnelStartFailed),
        )
        log.info("tunnel_ready", mode=self.mode, url=self.url)
        return self.url

    async def _start_once(self) -> str:
        if self.mode == "external":
            return await self._external_url()
        assert self._binary is not None
        metrics = f"127.0.0.1:{free_port()}"
        env: dict[str, str] | None = None
        redact: tuple[str, ...] = ()
        if self.mode == "quick":
            argv = [self._binary, "tunnel", "--no-autoupdate", "--url", self.local_url]
            argv += ["--metrics", metrics]
        else:
            token = self.settings.tunnel_token
            assert token is not None
            secret = token.get_secret_value()
            env = {**os.environ, "TUNNEL_TOKEN": secret}
            redact = (secret,)
            argv = [self._binary, "tunnel", "--no-autoupdate", "--metrics", metrics, "run"]
            argv += ["--url", self.local_url]
        proc = CloudflaredProcess(
            argv,
            metrics,
            env=env,
            redact=redact,
            probe_timeout=self.settings.tunnel_metrics_timeout,
        )
        try:
            await proc.start()
        except OSError as exc:
            # The binary vanished or lost its exec bit since it was found (a cleaned cache, an
            # upgrade in progress): retried with backoff, so the watchdog never dies of it.
            raise TunnelStartFailed(f"cannot run {argv[0]}: {exc}") from None
        try:
            url = await self._await_url(proc)
            await self._await_ready(proc)
        except BaseException:
            await proc.stop(self.settings.tunnel_stop_timeout)
            raise
        self.process = proc
        return url

    def _failed(self, proc: CloudflaredProcess, why: str) -> TunnelError:
        last = " | ".join(list(proc.tail)[-3:])
        if proc.rate_limited:
            return TunnelRateLimited(f"quick tunnel creation is rate-limited: {last}")
        return TunnelStartFailed(f"cloudflared {why}: {last}" if last else f"cloudflared {why}")

    async def _await_url(self, proc: CloudflaredProcess) -> str:
        if self.mode == "named":
            assert self.settings.tunnel_url is not None
            return self.settings.tunnel_url
        try:
            async with asyncio.timeout(self.settings.tunnel_start_timeout):
                while True:
                    if not proc.alive:
                        await asyncio.sleep(self._poll)  # let the stderr reader catch up
                        raise self._failed(
                            proc, f"exited with {proc.proc and proc.proc.returncode}"
                        )
                    hostname = await proc.hostname(self.session)
                    if hostname:
                        return url_from_hostname(hostname)
                    if proc.banner_url:
                        log.info("tunnel_url_from_banner", url=proc.banner_url)
                        return proc.banner_url
                    await asyncio.sleep(self._poll)
        except TimeoutError:
            raise self._failed(proc, "gave no tunnel URL in time") from None

    async def _await_ready(self, proc: CloudflaredProcess) -> None:
        try:
            async with asyncio.timeout(self.settings.tunnel_start_timeout):
                while not await proc.ready(self.session):
                    if not proc.alive:
                        raise self._failed(proc, "exited before it was ready")
                    await asyncio.sleep(self._poll)
        except TimeoutError:
            raise self._failed(proc, "was not ready in time") from None

    async def _external_url(self) -> str:
        assert self.settings.tunnel_metrics_url is not None
        try:
            async with asyncio.timeout(self.settings.tunnel_start_timeout):
                while True:
                    hostname = await quicktunnel_hostname(
                        self.session,
                        self.settings.tunnel_metrics_url,
                        self.settings.tunnel_metrics_timeout,
                    )
                    if hostname:
                        return url_from_hostname(hostname)
                    if self.settings.tunnel_url:
                        return self.settings.tunnel_url
                    await asyncio.sleep(self._poll)
        except TimeoutError:
            raise TunnelStartFailed(
                f"no hostname at {self.settings.tunnel_metrics_url}/quicktunnel"
            ) from None

    # ------------------------------------------------------------------ watchdog

    async def watch(self) -> None:
        """Restart the tunnel when it dies or stops being ready; report URL changes."""
        if self.mode == "none":
            return
        failures = 0
        while True:
            proc = self.process
            reason: str | None = None
            if self.mode == "external":
                await asyncio.sleep(self.settings.tunnel_check_interval)
                hostname = await quicktunnel_hostname(
                    self.session,
                    self.settings.tunnel_metrics_url or "",
                    self.settings.tunnel_metrics_timeout,
                )
                if hostname and url_from_hostname(hostname) != self.url:
                    await self._changed(url_from_hostname(hostname))
                continue
            assert proc is not None
            exited = asyncio.ensure_future(proc.wait_exit())
            try:
                await asyncio.wait({exited}, timeout=self.settings.tunnel_check_interval)
            finally:
                exited.cancel()
            if not proc.alive:
                reason = f"exited with {proc.proc and proc.proc.returncode}"
            elif await proc.ready(self.session):
                failures = 0
            else:
                failures += 1
                log.warning(
                    "tunnel_not_ready", failures=failures, limit=self.settings.tunnel_ready_failures
                )
                if failures >= self.settings.tunnel_ready_failures:
                    reason = f"/ready failed {failures} checks in a row"
            if reason is None:
                continue
            failures = 0
            await self._restart(reason)

    async def _restart(self, reason: str) -> None:
        old = self.process
        log.warning("tunnel_restart", reason=reason, pid=old.pid if old else None)
        self.process = None
        if old is not None:
            await old.stop(self.settings.tunnel_stop_timeout)
        # Back off when cloudflared keeps dying soon after each start.
        now = asyncio.get_running_loop().time()
        if now - self._last_restart > self.settings.tunnel_backoff_max:
            self._quick_restarts = 0
        delay = min(
            self.settings.tunnel_backoff_initial * (2**self._quick_restarts),
            self.settings.tunnel_backoff_max,
        )
        self._quick_restarts = min(self._quick_restarts + 1, 30)
        self._last_restart = now
        self.restarts += 1
        await asyncio.sleep(delay)
        url = await retry_forever(
            self._start_once,
            what="tunnel_start",
            initial=self.settings.tunnel_backoff_initial,
            maximum=self.settings.tunnel_backoff_max,
            retry_on=(TunnelRateLimited, TunnelStartFailed),
        )
        if url != self.url:
            await self._changed(url)
        else:
            log.info("tunnel_restarted", url=url)

    async def _changed(self, url: str) -> None:
        log.info("tunnel_url_changed", old=self.url, new=url)
        self.url = url
        if self.on_change is not None:
            await self.on_change(url)

    async def stop(self) -> None:
        proc, self.process = self.process, None
        if proc is not None:
            await proc.stop(self.settings.tunnel_stop_timeout)
