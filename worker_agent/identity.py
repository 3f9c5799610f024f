"""The agent's persisted identity: who it is survives restarts, addresses do not.

``STATE_DIR/identity.json`` (mode 0600, in a 0700 directory) holds the worker id and the worker
token the coordinator issued, and in edge mode the coordinator id and the router's secret. It is
written atomically (temporary file + rename). When the directory is not writable the identity
lives in memory only, with one warning.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
from dataclasses import asdict, dataclass
from pathlib import Path

import structlog

from coordinator.protocol import ID_PATTERN

log = structlog.get_logger("worker_agent.identity")

_ID = re.compile(ID_PATTERN)
_SECRET = re.compile(r"^[\x21-\x7e]{16,256}$")
FILE_NAME = "identity.json"


@dataclass
class Identity:
    worker_id: str
    worker_token: str | None = None
    coordinator_id: str | None = None
    coordinator_secret: str | None = None

    def __repr__(self) -> str:  # never show secrets
        return f"Identity(worker_id={self.worker_id!r}, coordinator_id={self.coordinator_id!r})"


def new_worker_id() -> str:
    return f"w-{secrets.token_hex(6)}"


def new_coordinator_id() -> str:
    return f"coord-{secrets.token_hex(6)}"


def _pick(data: dict[str, object], key: str, pattern: re.Pattern[str]) -> str | None:
    value = data.get(key)
    return value if isinstance(value, str) and pattern.match(value) else None


def _valid(data: dict[str, object]) -> Identity | None:
    wid = _pick(data, "worker_id", _ID)
    if wid is None:
        return None
    return Identity(
        worker_id=wid,
        worker_token=_pick(data, "worker_token", _SECRET),
        coordinator_id=_pick(data, "coordinator_id", _ID),
        coordinator_secret=_pick(data, "coordinator_secret", _SECRET),
    )


class IdentityStore:
    """Loads and saves the identity under ``state_dir``."""

    def __init__(self, state_dir: Path, configured_worker_id: str | None = None) -> None:
        self.dir = state_dir.expanduser()
        self.path = self.dir / FILE_NAME
        self.configured_worker_id = configured_worker_id
        self.persistent = True
        self._identity: Identity | None = None

    def _read(self) -> Identity | None:
        try:
            raw = self.path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            log.warning("identity_unreadable", path=str(self.path), error=str(exc))
            return None
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        identity = _valid(data) if isinstance(data, dict) else None
        if identity is None:
            aside = self.path.with_name(FILE_NAME + ".corrupt")
            with contextlib.suppress(OSError):
                self.path.replace(aside)
            log.warning("identity_corrupt", path=str(self.path), moved_to=str(aside))
        return identity

    def load(self) -> Identity:
        """The persisted identity, or a new one (saved at once). ``WORKER_ID`` wins.

        Later calls return the same object, so that every part of the agent shares it.
        """
        if self._identity is not None:
            return self._identity
        identity = self._read()
        wanted = self.configured_worker_id
        if identity is None:
            identity = Identity(worker_id=wanted or new_worker_id())
            self.save(identity)
        elif wanted and identity.worker_id != wanted:
            # The token belongs to the old id; keep edge fields, drop the worker token.
            log.info("worker_id_changed", old=identity.worker_id, new=wanted)
            identity = Identity(
                worker_id=wanted,
                coordinator_id=identity.coordinator_id,
                coordinator_secret=identity.coordinator_secret,
            )
            self.save(identity)
        self._identity = identity
        return identity

    def save(self, identity: Identity) -> None:
        if not self.persistent:
            return
        payload = json.dumps(asdict(identity), indent=2).encode() + b"\n"
        tmp = self.path.with_name(f".{FILE_NAME}.{os.getpid()}.tmp")
        try:
            self.dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            try:
                os.write(fd, payload)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
        except OSError as exc:
            self.persistent = False
            with contextlib.suppress(OSError):
                tmp.unlink()
            log.warning(
                "identity_not_persisted",
                path=str(self.path),
                error=str(exc),
                hint="set STATE_DIR to a writable directory; in Docker use a named volume, or "
                "`chown 10001:10001` a bind-mounted directory (the agent runs as uid 10001)",
            )
