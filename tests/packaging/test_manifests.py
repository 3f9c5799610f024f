"""The deploy files parse, say what they should, and agree with the code and with each other."""

from __future__ import annotations

import configparser
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from coordinator.settings import CoordinatorSettings
from tests.packaging.compose_local import (
    ImageSpec,
    InterpolationError,
    interpolate,
    load_compose,
)
from worker_agent.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
EDGE = ROOT / "edge-coordinator.yml"
GPU = ROOT / "deploy" / "compose" / "gpu-worker.yml"
K8S = ROOT / "deploy" / "kubernetes"
WORKER_ENV = {n.upper() for n in WorkerSettings.model_fields}
COORDINATOR_ENV = {n.upper() for n in CoordinatorSettings.model_fields}
SHA256 = re.compile(r"^[0-9a-f]{64}$")


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"(?m)^ARG (\w+)=(\S+)$", path.read_text(encoding="utf-8")))


# ------------------------------------------------------------------------------ interpolation


@pytest.mark.parametrize(
    ("text", "env", "expected"),
    [
        ("${A}", {"A": "1"}, "1"),
        ("${A}", {}, ""),
        ("$A-x", {"A": "1"}, "1-x"),
        ("${A:-d}", {"A": ""}, "d"),
        ("${A-d}", {"A": ""}, ""),
        ("${A-d}", {}, "d"),
        ("${A:+run}", {"A": "t"}, "run"),
        ("${A:+run}", {"A": ""}, ""),
        ("${A+run}", {"A": ""}, "run"),
        ("${A:-${B:-x}}", {}, "x"),
        ("$${A}", {"A": "1"}, "${A}"),
        ("http://h:${P:-8080}/x", {}, "http://h:8080/x"),
    ],
)
def test_interpolation_follows_the_compose_spec(
    text: str, env: dict[str, str], expected: str
) -> None:
    assert interpolate(text, env) == expected


def test_required_variable_is_an_error() -> None:
    with pytest.raises(InterpolationError, match="B: set it"):
        interpolate("${B:?set it}", {"B": ""})


# ------------------------------------------------------------------------------ images


@pytest.mark.parametrize(
    ("name", "entrypoint", "cmd"),
    [("worker", "rma-worker", "run"), ("coordinator", "rma-coordinator", "serve")],
)
def test_images_run_the_entry_point_as_non_root(name: str, entrypoint: str, cmd: str) -> None:
    path = ROOT / "docker" / f"{name}.Dockerfile"
    text = path.read_text(encoding="utf-8")
    spec = ImageSpec.from_dockerfile(path)
    assert spec.entrypoint == [entrypoint]
    assert spec.cmd == [cmd]
    assert re.search(r"(?m)^USER 10001:10001$", text)
    assert re.search(r"(?m)^VOLUME \[\"/var/lib/rma-", text)
    assert "HEALTHCHECK" in text
    assert "/health" in text
    froms = re.findall(r"(?m)^FROM (\S+)", text)
    assert len(froms) >= 2, "multi-stage build"
    base = dockerfile_args(path)["PYTHON_IMAGE"]
    assert re.fullmatch(r"python:\d+\.\d+\.\d+-slim-\w+", base), base
    known = WORKER_ENV | COORDINATOR_ENV | {"PYTHONUNBUFFERED", "PYTHONDONTWRITEBYTECODE"}
    known |= {"NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES"}
    assert set(spec.env) <= known, set(spec.env) - known


def test_worker_image_pins_and_verifies_cloudflared() -> None:
    path = ROOT / "docker" / "worker.Dockerfile"
    args = dockerfile_args(path)
    assert re.fullmatch(r"\d{4}\.\d+\.\d+", args["CLOUDFLARED_VERSION"])
    assert SHA256.match(args["CLOUDFLARED_SHA256_AMD64"])
    assert SHA256.match(args["CLOUDFLARED_SHA256_ARM64"])
    assert args["CLOUDFLARED_SHA256_AMD64"] != args["CLOUDFLARED_SHA256_ARM64"]
    text = path.read_text(encoding="utf-8")
    assert "sha256sum -c" in text
    assert "TARGETARCH" in text
    spec = ImageSpec.from_dockerfile(path)
    assert spec.env["NVIDIA_VISIBLE_DEVICES"] == "all"
    assert spec.env["NVIDIA_DRIVER_CAPABILITIES"] == "compute,utility"
    assert spec.env["CLOUDFLARED_DOWNLOAD"] == "false"
    # The same cloudflared everywhere: compose's default tag, .env.example, the systemd notes.
    version = args["CLOUDFLARED_VERSION"]
    assert f"CLOUDFLARED_TAG:-{version}" in EDGE.read_text(encoding="utf-8")
    assert f"CLOUDFLARED_TAG={version}" in (ROOT / ".env.example").read_text(encoding="utf-8")
    notes = (ROOT / "deploy" / "systemd" / "README.md").read_text(encoding="utf-8")
    assert f"V={version}" in notes
    assert args["CLOUDFLARED_SHA256_AMD64"] in notes
    assert args["CLOUDFLARED_SHA256_ARM64"] in notes


def test_dockerignore_keeps_the_context_to_the_sources() -> None:
    text = (ROOT / ".dockerignore").read_text(encoding="utf-8")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.startswith("#")]
    assert lines[0] == "*"
    assert {"!pyproject.toml", "!README.md", "!coordinator/", "!worker_agent/"} <= set(lines)


# ------------------------------------------------------------------------------ compose


def _env_of(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    assert isinstance(env, dict)
    return {k: str(v) for k, v in env.items()}


def test_edge_coordinator_stack_is_wired_as_specified() -> None:
    doc = load_compose(EDGE, {})
    services = doc["services"]
    assert set(services) == {"coordinator", "tunnel", "edge-registrar"}
    for svc in services.values():
        assert svc["restart"] == "unless-stopped"
    coord, tunnel, registrar = (services[n] for n in ("coordinator", "tunnel", "edge-registrar"))
    assert coord["image"].endswith("/rma-coordinator:latest")
    assert "/health" in " ".join(coord["healthcheck"]["test"])
    assert tunnel["image"].startswith("cloudflare/cloudflared:")
    assert not tunnel["image"].endswith(":latest")
    assert tunnel["command"].split() == [
        "tunnel",
        "--no-autoupdate",
        "--url",
        "http://coordinator:8080",
        "--metrics",
        "0.0.0.0:20241",
    ]
    assert tunnel["depends_on"]["coordinator"]["condition"] == "service_healthy"
    env = _env_of(registrar)
    assert registrar["image"].endswith("/rma-worker:latest")
    assert env["WORKER_TYPE"] == "edge"
    assert env["LOCAL_COORDINATOR_URL"] == "http://coordinator:8080"
    assert env["TUNNEL_METRICS_URL"] == "http://tunnel:20241"
    assert env["COORDINATOR_URL"] == "https://api.rmatool.org.uk"
    assert "TUNNEL_TOKEN" not in env, "the registrar must not open a tunnel of its own"
    assert set(env) <= WORKER_ENV | COORDINATOR_ENV, set(env) - WORKER_ENV
    assert set(_env_of(coord)) <= COORDINATOR_ENV, set(_env_of(coord)) - COORDINATOR_ENV


def test_edge_coordinator_variables() -> None:
    env = {
        "RMA_TAG": "1.2.3",
        "RMA_IMAGE_PREFIX": "ghcr.io/example",
        "ROUTER_URL": "https://router.example.org",
        "TUNNEL_TOKEN": "t" * 40,
    }
    services = load_compose(EDGE, env)["services"]
    assert services["coordinator"]["image"] == "ghcr.io/example/rma-coordinator:1.2.3"
    assert services["edge-registrar"]["image"] == "ghcr.io/example/rma-worker:1.2.3"
    assert _env_of(services["edge-registrar"])["COORDINATOR_URL"] == env["ROUTER_URL"]
    # Named tunnel: `run` appended, the token only in the environment.
    command = services["tunnel"]["command"].split()
    assert command[-1] == "run"
    assert env["TUNNEL_TOKEN"] not in command
    assert _env_of(services["tunnel"])["TUNNEL_TOKEN"] == env["TUNNEL_TOKEN"]


def test_env_example_names_every_variable_and_holds_no_secret() -> None:
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    values = dict(re.findall(r"(?m)^([A-Z_]+)=(.*)$", example))
    used = set()
    for path in (EDGE, GPU):
        used |= set(re.findall(r"\$\{([A-Z_]+)", path.read_text(encoding="utf-8")))
    used -= {"OLLAMA_TAG", "OLLAMA_MODEL", "WORKER_TYPE", "AUTO_SERVICE_NAME"}
    used -= {"SERVICE_MAX_CONCURRENCY"}
    assert used <= set(values), used - set(values)
    for name in ("FEDERATION_JOIN_TOKEN", "WORKER_JOIN_TOKEN", "ADMIN_TOKEN", "TUNNEL_TOKEN"):
        assert values[name] == "", f"{name} must be empty in .env.example"


def test_gpu_worker_compose_reserves_gpus() -> None:
    services = load_compose(GPU, {})["services"]
    assert {"ollama", "worker"} <= set(services)
    for name in ("ollama", "worker"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["driver"] == "nvidia"
        assert devices[0]["capabilities"] == ["gpu"]
    env = _env_of(services["worker"])
    assert env["OLLAMA_URL"] == "http://ollama:11434"
    assert set(env) <= WORKER_ENV, set(env) - WORKER_ENV
    assert "TUNNEL_TOKEN" not in env
    assert not services["ollama"]["image"].endswith(":latest")


# ------------------------------------------------------------------------------ systemd, k8s


def test_systemd_unit() -> None:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(ROOT / "deploy" / "systemd" / "rma-worker.service")
    service = parser["Service"]
    assert service["User"] not in ("", "root")
    assert service["Restart"] in ("always", "on-failure")
    assert service["EnvironmentFile"].startswith("/etc/")
    assert service["ExecStart"].split()[0].endswith("/rma-worker")
    assert service["KillSignal"] == "SIGTERM"
    assert float(service["TimeoutStopSec"]) > WorkerSettings().drain_timeout
    assert parser["Install"]["WantedBy"] == "multi-user.target"
    example = (ROOT / "deploy" / "systemd" / "rma-worker.env.example").read_text(encoding="utf-8")
    names = set(re.findall(r"(?m)^#?([A-Z_]+)=", example))
    assert names <= WORKER_ENV, names - WORKER_ENV


def k8s_docs() -> dict[str, dict[str, Any]]:
    docs: dict[str, dict[str, Any]] = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")):
            assert isinstance(doc, dict), path
            assert doc.get("apiVersion"), path
            assert doc.get("kind"), path
            docs[doc["kind"]] = doc
    return docs


def test_kubernetes_manifests() -> None:
    docs = k8s_docs()
    assert {"Namespace", "Secret", "ConfigMap", "DaemonSet", "PriorityClass"} <= set(docs)
    ds = docs["DaemonSet"]
    assert ds["apiVersion"] == "apps/v1"
    spec = ds["spec"]["template"]["spec"]
    assert ds["spec"]["selector"]["matchLabels"].items() <= (
        ds["spec"]["template"]["metadata"]["labels"].items()
    )
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["priorityClassName"] == docs["PriorityClass"]["metadata"]["name"]
    containers = {c["name"]: c for c in spec["containers"]}
    assert {"worker", "ollama"} <= set(containers)
    for container in containers.values():
        assert container["resources"]["requests"]["cpu"]
        assert container["resources"]["requests"]["memory"]
    assert containers["ollama"]["resources"]["limits"]["nvidia.com/gpu"] == 1
    worker = containers["worker"]
    refs = {
        next(iter(ref.values()))["name"]: next(iter(ref))
        for ref in worker["envFrom"]  # configMapRef / secretRef
    }
    assert refs[docs["Secret"]["metadata"]["name"]] == "secretRef"
    assert refs[docs["ConfigMap"]["metadata"]["name"]] == "configMapRef"
    mounts = {m["name"]: m["mountPath"] for m in worker["volumeMounts"]}
    state_dir = next(e["value"] for e in worker["env"] if e["name"] == "STATE_DIR")
    assert mounts["state"] == state_dir
    assert "state" in {v["name"] for v in spec["volumes"]}
    config = docs["ConfigMap"]["data"]
    assert set(config) <= WORKER_ENV, set(config) - WORKER_ENV
    assert set(docs["Secret"]["stringData"]) <= WORKER_ENV
    assert all(v == "" for v in docs["Secret"]["stringData"].values()), "no secret committed"
    namespace = docs["Namespace"]["metadata"]["name"]
    for kind in ("Secret", "ConfigMap", "DaemonSet"):
        assert docs[kind]["metadata"]["namespace"] == namespace


def test_workflows_parse_and_name_their_secrets() -> None:
    flows = {
        p.stem: yaml.safe_load(p.read_text(encoding="utf-8"))
        for p in (ROOT / ".github" / "workflows").glob("*.yml")
    }
    assert {"ci", "images", "router"} <= set(flows)
    # PyYAML reads the `on:` key as the boolean True.
    assert "pull_request" in flows["ci"][True]
    images = (ROOT / ".github" / "workflows" / "images.yml").read_text(encoding="utf-8")
    assert "linux/amd64,linux/arm64" in images
    assert "ghcr.io" in images
    assert "docker/build-push-action" in images
    assert "docker/setup-buildx-action" in images
    router = (ROOT / ".github" / "workflows" / "router.yml").read_text(encoding="utf-8")
    assert "secrets.CLOUDFLARE_API_TOKEN" in router
    assert "wrangler deploy" in router
    assert flows["router"][True]["push"]["tags"]
