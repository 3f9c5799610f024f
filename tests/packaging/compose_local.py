"""Run a compose file's services as local processes, the way Docker would, without Docker.

What Docker does and how this module stands in for it:

- **Interpolation**: ``${VAR}``, ``${VAR:-default}``, ``${VAR-default}``, ``${VAR:?err}``,
  ``${VAR?err}``, ``${VAR:+alt}``, ``${VAR+alt}``, ``$VAR`` and ``$$``, over every string value,
  as the compose spec defines them (``interpolate``).
- **Images**: each project image is mapped to its Dockerfile, whose ``ENTRYPOINT``, ``CMD`` and
  ``ENV`` are read from the file (``ImageSpec``); the entrypoint runs from this venv. The
  ``cloudflare/cloudflared`` image runs ``tests/fake_cloudflared``, which takes the same flags and
  really forwards traffic.
- **Network**: every ``service:port`` the file exposes gets a free loopback port. Host names of
  services (``http://coordinator:8080``), a service's own wildcard listen address
  (``0.0.0.0:20241``) and its own loopback URLs (a healthcheck's ``127.0.0.1:8080``) are
  rewritten to ``127.0.0.1:<that port>``; ``*_HOST=0.0.0.0`` becomes ``127.0.0.1`` and
  ``*_PORT=<exposed port>`` the mapped port. Nothing listens beyond 127.0.0.1.
- **Volumes**: each mount target becomes a fresh directory under the test's tmp path, and
  environment values naming a mount target are rewritten to it.
- **Healthchecks and depends_on**: a service starts once its ``service_healthy`` dependencies'
  healthcheck commands (run here with this venv's ``python``) succeed.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[2]
FAKE_CLOUDFLARED = ROOT / "tests" / "fake_cloudflared"
VENV_BIN = Path(sys.executable).parent

_NAME = r"[_a-zA-Z][_a-zA-Z0-9]*"
_OPS = (":-", ":?", ":+", "-", "?", "+")


class InterpolationError(ValueError):
    """A ``${VAR?err}`` / ``${VAR:?err}`` whose variable is missing, or a malformed expression."""


def _braced_end(text: str, start: int) -> int:
    """Index of the ``}`` closing the ``${`` that opens at ``start`` (nesting allowed)."""
    depth = 0
    i = start
    while i < len(text):
        if text.startswith("${", i):
            depth += 1
            i += 2
            continue
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        i += 1
    raise InterpolationError(f"unclosed ${{ in {text!r}")


def _braced(expr: str, env: Mapping[str, str]) -> str:
    match = re.match(_NAME, expr)
    if match is None:
        raise InterpolationError(f"invalid variable expression ${{{expr}}}")
    name = match.group(0)
    rest = expr[len(name) :]
    if not rest:
        return env.get(name, "")
    op = next((o for o in _OPS if rest.startswith(o)), None)
    if op is None:
        raise InterpolationError(f"unsupported expression ${{{expr}}}")
    arg = rest[len(op) :]
    value = env.get(name)
    present = value is not None if len(op) == 1 else bool(value)
    if op.endswith("-"):
        return value if present and value is not None else interpolate(arg, env)
    if op.endswith("?"):
        if not present:
            raise InterpolationError(f"{name}: {interpolate(arg, env) or 'required'}")
        return value or ""
    return interpolate(arg, env) if present else ""


def interpolate(text: str, env: Mapping[str, str]) -> str:
    """The compose spec's variable interpolation of one string."""
    out: list[str] = []
    i = 0
    while i < len(text):
        if text.startswith("$$", i):
            out.append("$")
            i += 2
        elif text.startswith("${", i):
            end = _braced_end(text, i)
            out.append(_braced(text[i + 2 : end], env))
            i = end + 1
        elif text[i] == "$" and (m := re.match(_NAME, text[i + 1 :])):
            out.append(env.get(m.group(0), ""))
            i += 1 + len(m.group(0))
        else:
            out.append(text[i])
            i += 1
    return "".join(out)


def interpolate_tree(node: Any, env: Mapping[str, str]) -> Any:
    """Interpolate every string value (not keys) of a loaded YAML document."""
    if isinstance(node, str):
        return interpolate(node, env)
    if isinstance(node, list):
        return [interpolate_tree(x, env) for x in node]
    if isinstance(node, dict):
        return {k: interpolate_tree(v, env) for k, v in node.items()}
    return node


def load_compose(path: Path, env: Mapping[str, str]) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    assert isinstance(data, dict), f"{path} is not a mapping"
    result: dict[str, Any] = interpolate_tree(data, env)
    return result


# ------------------------------------------------------------------------------ images


@dataclass
class ImageSpec:
    """What ``docker run <image>`` would execute: read from the image's Dockerfile."""

    entrypoint: list[str]
    cmd: list[str]
    env: dict[str, str]

    @classmethod
    def from_dockerfile(cls, path: Path) -> ImageSpec:
        text = path.read_text(encoding="utf-8")
        joined = re.sub(r"\\\n", " ", text)
        stages = re.split(r"(?m)^FROM\s", joined)
        final = stages[-1]  # the runtime stage: what the image runs
        entrypoint: list[str] = []
        cmd: list[str] = []
        env: dict[str, str] = {}
        for raw in final.splitlines():
            line = raw.strip()
            if line.startswith("ENTRYPOINT "):
                entrypoint = json.loads(line.split(" ", 1)[1])
            elif line.startswith("CMD "):
                cmd = json.loads(line.split(" ", 1)[1])
            elif line.startswith("ENV "):
                for token in shlex.split(line.split(" ", 1)[1]):
                    key, sep, value = token.partition("=")
                    if sep and key != "PATH":
                        env[key] = value
        assert entrypoint, f"{path} has no exec-form ENTRYPOINT"
        return cls(entrypoint, cmd, env)


def project_images() -> dict[str, ImageSpec]:
    """Image name (without registry and tag) -> its spec."""
    return {
        "rma-coordinator": ImageSpec.from_dockerfile(ROOT / "docker" / "coordinator.Dockerfile"),
        "rma-worker": ImageSpec.from_dockerfile(ROOT / "docker" / "worker.Dockerfile"),
    }


def image_name(image: str) -> str:
    """``ghcr.io/owner/rma-worker:1.2`` -> ``rma-worker``; ``cloudflare/cloudflared:X`` ->
    ``cloudflare/cloudflared``."""
    without_tag = image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image
    if without_tag.startswith("cloudflare/"):
        return without_tag
    return without_tag.rsplit("/", 1)[-1]


# ------------------------------------------------------------------------------ processes


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(FileNotFoundError, ProcessLookupError, IndexError):
        stat = Path(f"/proc/{pid}/stat").read_text(encoding="utf-8")
        if stat.rsplit(")", 1)[1].split()[0] == "Z":
            return False
    return True


@dataclass
class Service:
    name: str
    argv: list[str]
    env: dict[str, str]
    healthcheck: list[str] | None
    depends_on: dict[str, str]
    ports: dict[int, int]
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def url(self, container_port: int) -> str:
        return f"http://127.0.0.1:{self.ports[container_port]}"

    def log(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return ""

    def json_events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.log().splitlines():
            with contextlib.suppress(ValueError):
                value = json.loads(line)
                if isinstance(value, dict):
                    out.append(value)
        return out

    def healthy(self) -> bool:
        if self.healthcheck is None:
            return self.proc is not None and self.proc.poll() is None
        result = subprocess.run(
            self.healthcheck, env=self.env, capture_output=True, timeout=10, check=False
        )
        return result.returncode == 0


@dataclass
class LocalStack:
    """The services of one compose file, as local processes on loopback."""

    services: dict[str, Service]
    order: list[str]
    started: list[Service] = field(default_factory=list)

    def __getitem__(self, name: str) -> Service:
        return self.services[name]

    def start(self, name: str, timeout: float = 30.0) -> Service:
        svc = self.services[name]
        for dep, condition in svc.depends_on.items():
            if condition == "service_healthy":
                self.wait_healthy(dep, timeout)
        log = svc.log_path.open("ab")
        try:
            svc.proc = subprocess.Popen(
                svc.argv,
                env=svc.env,
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        finally:
            log.close()
        self.started.append(svc)
        return svc

    def up(self, timeout: float = 30.0) -> None:
        for name in self.order:
            self.start(name, timeout)

    def wait_healthy(self, name: str, timeout: float = 30.0) -> None:
        svc = self.services[name]
        deadline = time.monotonic() + timeout
        while True:
            if svc.proc is not None and svc.proc.poll() is not None:
                raise AssertionError(
                    f"{name} exited with {svc.proc.returncode} before it was healthy:\n"
                    + svc.log()[-3000:]
                )
            if svc.healthy():
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{name} not healthy within {timeout} s:\n{svc.log()[-3000:]}")
            time.sleep(0.2)

    def stop(self, name: str, timeout: float = 15.0) -> int | None:
        """SIGTERM, as ``docker stop`` does; SIGKILL after ``timeout``. The exit code."""
        svc = self.services[name]
        proc = svc.proc
        if proc is None:
            return None
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                proc.wait(5)
        return proc.returncode

    def down(self) -> None:
        """Stop every started service, dependents first."""
        for svc in reversed(self.started):
            with contextlib.suppress(Exception):
                self.stop(svc.name, timeout=10.0)


def _port_of(entry: Any) -> int:
    """The container port of an ``expose`` or ``ports`` entry (short syntax)."""
    text = str(entry).split("/", 1)[0]
    return int(text.rsplit(":", 1)[-1])


def _rewrite(text: str, own: str, ports: Mapping[str, Mapping[int, int]]) -> str:
    for svc, mapping in ports.items():
        for container, host in mapping.items():
            text = re.sub(
                rf"(?<![\w.-]){re.escape(svc)}:{container}(?!\d)", f"127.0.0.1:{host}", text
            )
    for container, host in ports.get(own, {}).items():
        text = re.sub(
            rf"(?<![\w.])(?:0\.0\.0\.0|127\.0\.0\.1|localhost):{container}(?!\d)",
            f"127.0.0.1:{host}",
            text,
        )
    return text


def build_stack(
    compose: Mapping[str, Any],
    tmp_path: Path,
    *,
    extra_env: Mapping[str, Mapping[str, str]] | None = None,
    base_env: Mapping[str, str] | None = None,
) -> LocalStack:
    """Turn an interpolated compose document into local processes (not yet started).

    ``extra_env`` adds test-only settings per service (short timings, loopback tunnel URLs);
    ``base_env`` is the environment every process inherits (PATH and the like), standing in for
    the image's OS environment.
    """
    images = project_images()
    services_doc: dict[str, Any] = compose["services"]
    ports: dict[str, dict[int, int]] = {}
    for name, doc in services_doc.items():
        exposed = {_port_of(p) for p in doc.get("expose", [])}
        exposed |= {_port_of(p) for p in doc.get("ports", [])}
        ports[name] = {p: free_port() for p in sorted(exposed)}

    services: dict[str, Service] = {}
    for name, doc in services_doc.items():
        image = image_name(doc["image"])
        env: dict[str, str] = dict(base_env or {})
        volumes: dict[str, Path] = {}
        for vol in doc.get("volumes", []):
            target = str(vol).split(":")[1] if ":" in str(vol) else str(vol)
            local = tmp_path / "volumes" / name / target.strip("/").replace("/", "_")
            local.mkdir(parents=True, exist_ok=True)
            volumes[target] = local
        command = doc.get("command")
        args = shlex.split(command) if isinstance(command, str) else list(command or [])
        if image in images:
            spec = images[image]
            env.update(spec.env)
            program = [str(VENV_BIN / spec.entrypoint[0]), *spec.entrypoint[1:]]
            argv = program + (args or spec.cmd)
        elif image == "cloudflare/cloudflared":
            # The image's entrypoint is `cloudflared --no-autoupdate`; the fake takes the
            # command's own arguments (which start with `tunnel`).
            argv = [sys.executable, str(FAKE_CLOUDFLARED), *args]
        else:
            raise AssertionError(f"service {name}: no local stand-in for image {doc['image']!r}")
        environment = doc.get("environment", {})
        if isinstance(environment, list):
            environment = dict(item.split("=", 1) for item in environment)
        env.update({k: "" if v is None else str(v) for k, v in environment.items()})
        env.update((extra_env or {}).get(name, {}))
        own_ports = ports[name]
        for key, value in list(env.items()):
            if value in volumes:
                env[key] = str(volumes[value])
            elif key.endswith("_HOST") and value == "0.0.0.0":
                env[key] = "127.0.0.1"
            elif key.endswith("_PORT") and value.isdigit() and int(value) in own_ports:
                env[key] = str(own_ports[int(value)])
            else:
                env[key] = _rewrite(value, name, ports)
        argv = [_rewrite(a, name, ports) for a in argv]
        healthcheck = None
        hc = doc.get("healthcheck")
        if hc and not hc.get("disable") and hc.get("test"):
            test = hc["test"]
            if isinstance(test, str) or test[0] == "CMD-SHELL":
                shell = test if isinstance(test, str) else test[1]
                test = ["/bin/sh", "-c", shell]
            else:
                test = list(test[1:])
            if test and test[0] in ("python", "python3"):
                test[0] = sys.executable
            healthcheck = [_rewrite(a, name, ports) for a in test]
        depends = doc.get("depends_on", {})
        if isinstance(depends, list):
            depends = {d: {"condition": "service_started"} for d in depends}
        services[name] = Service(
            name=name,
            argv=argv,
            env=env,
            healthcheck=healthcheck,
            depends_on={d: c.get("condition", "service_started") for d, c in depends.items()},
            ports=own_ports,
            log_path=tmp_path / f"{name}.log",
        )
    return LocalStack(services, _start_order(services))


def _start_order(services: Mapping[str, Service]) -> list[str]:
    order: list[str] = []
    visiting: set[str] = set()

    def visit(name: str) -> None:
        if name in order:
            return
        assert name not in visiting, f"depends_on cycle through {name}"
        visiting.add(name)
        for dep in services[name].depends_on:
            assert dep in services, f"{name} depends on unknown service {dep}"
            visit(dep)
        visiting.discard(name)
        order.append(name)

    for name in services:
        visit(name)
    return order


@contextlib.contextmanager
def running(stack: LocalStack) -> Iterator[LocalStack]:
    try:
        yield stack
    finally:
        stack.down()
