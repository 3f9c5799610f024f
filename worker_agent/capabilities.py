"""What this machine can do: NVIDIA GPUs through NVML, CPU, RAM and disk through psutil.

NVML absent or failing means "no GPU", cleanly, with one log line. The NVML module is passed in
(``nvml=``) so that tests can hand over a fake one; by default it is ``pynvml`` from
nvidia-ml-py. No "public IP" or latency heuristics: the coordinator decides with what is here.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import platform
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import psutil
import structlog

from coordinator.protocol import Capabilities, GpuInfo, GpuLoad, WorkerType

log = structlog.get_logger("worker_agent.capabilities")

T = TypeVar("T")
MIB = 1024 * 1024
CGROUP_ROOT = Path("/sys/fs/cgroup")


def _text(value: object, limit: int = 256) -> str:
    """NVML returns bytes or str depending on the nvidia-ml-py version."""
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    return str(value).strip()[:limit]


def _optional(call: Callable[..., T], *args: Any) -> T | None:
    """One optional NVML field: ``None`` when the GPU or driver does not support it."""
    try:
        return call(*args)
    except Exception:  # NVMLError_NotSupported and friends; a field is never fatal
        return None


def load_nvml() -> Any:
    return importlib.import_module("pynvml")


def _cuda_version(value: int | None) -> str | None:
    if not value:
        return None
    return f"{value // 1000}.{(value % 1000) // 10}"


class GpuMonitor:
    """An initialised NVML session: full GPU details once, cheap load samples per heartbeat."""

    def __init__(self, nvml: Any | None = None) -> None:
        self.nvml: Any | None = None
        self.handles: list[Any] = []
        self.error: str | None = None
        try:
            module = nvml if nvml is not None else load_nvml()
            module.nvmlInit()
        except Exception as exc:  # library missing, driver mismatch, no permission ...
            self.error = f"{type(exc).__name__}: {exc}"
            log.info("no_gpu", reason=self.error)
            return
        try:
            count = int(module.nvmlDeviceGetCount())
            self.handles = [module.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except Exception as exc:
            self.error = f"{type(exc).__name__}: {exc}"
            log.info("no_gpu", reason=self.error)
            with contextlib.suppress(Exception):
                module.nvmlShutdown()
            return
        self.nvml = module

    def info(self) -> list[GpuInfo]:
        nvml = self.nvml
        if nvml is None:
            return []
        driver_raw = _optional(nvml.nvmlSystemGetDriverVersion)
        driver = _text(driver_raw) if driver_raw is not None else None
        cuda_raw = _optional(nvml.nvmlSystemGetCudaDriverVersion)
        cuda = _cuda_version(cuda_raw if isinstance(cuda_raw, int) else None)
        gpus = []
        for index, handle in enumerate(self.handles):
            try:
                memory = nvml.nvmlDeviceGetMemoryInfo(handle)
                name = _text(nvml.nvmlDeviceGetName(handle))
            except Exception as exc:
                log.warning("gpu_unreadable", index=index, error=f"{type(exc).__name__}: {exc}")
                continue
            cc = _optional(nvml.nvmlDeviceGetCudaComputeCapability, handle)
            rates = _optional(nvml.nvmlDeviceGetUtilizationRates, handle)
            temp = _optional(nvml.nvmlDeviceGetTemperature, handle, nvml.NVML_TEMPERATURE_GPU)
            uuid = _optional(nvml.nvmlDeviceGetUUID, handle)
            gpus.append(
                GpuInfo(
                    index=index,
                    name=name or "unknown",
                    uuid=_text(uuid) if uuid is not None else "",
                    memory_total_mb=int(memory.total) // MIB,
                    memory_free_mb=int(memory.free) // MIB,
                    utilization_pct=_clamp(getattr(rates, "gpu", None), 0, 100),
                    temperature_c=_clamp(temp, -50, 200),
                    driver_version=driver,
                    cuda_driver_version=cuda,
                    compute_capability=_capability(cc),
                )
            )
        return gpus

    def load(self) -> list[GpuLoad]:
        """Utilisation and free memory per GPU; a GPU that fails to answer is left out."""
        nvml = self.nvml
        if nvml is None:
            return []
        out = []
        for index, handle in enumerate(self.handles):
            rates = _optional(nvml.nvmlDeviceGetUtilizationRates, handle)
            memory = _optional(nvml.nvmlDeviceGetMemoryInfo, handle)
            util = getattr(rates, "gpu", None)
            if util is None and memory is None:
                continue
            out.append(
                GpuLoad(
                    index=index,
                    utilization_pct=_clamp(util, 0, 100),
                    memory_free_mb=int(memory.free) // MIB if memory is not None else None,
                )
            )
        return out

    def close(self) -> None:
        if self.nvml is not None:
            with contextlib.suppress(Exception):
                self.nvml.nvmlShutdown()
            self.nvml = None
            self.handles = []


def _capability(value: object) -> str | None:
    if isinstance(value, tuple | list) and len(value) >= 2:
        return f"{value[0]}.{value[1]}"[:16]
    return None


def _clamp(value: object, low: float, high: float) -> float | None:
    if not isinstance(value, int | float):
        return None
    return float(min(max(value, low), high))


# ------------------------------------------------------------------------------------ CPU


def cgroup_cpu_limit(root: Path = CGROUP_ROOT, proc_cgroup: Path | None = None) -> float | None:
    """CPUs allowed by the cgroup v2 ``cpu.max`` quota (Docker ``--cpus``), or ``None``."""
    candidates = []
    try:
        text = (proc_cgroup or Path("/proc/self/cgroup")).read_text(encoding="utf-8")
    except OSError:
        text = ""
    for line in text.splitlines():
        if line.startswith("0::"):
            rel = line[3:].strip().lstrip("/")
            if rel:
                candidates.append(root / rel / "cpu.max")
    candidates.append(root / "cpu.max")
    for path in candidates:
        try:
            quota, _, period = path.read_text(encoding="utf-8").strip().partition(" ")
        except OSError:
            continue
        if quota == "max":
            return None
        try:
            q, p = int(quota), int(period or "100000")
        except ValueError:
            return None
        return q / p if q > 0 and p > 0 else None
    return None


def usable_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path | None = None) -> float:
    """CPUs this process may use: its affinity set, capped by the cgroup quota."""
    try:
        count = float(len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        count = float(psutil.cpu_count(logical=True) or 1)
    limit = cgroup_cpu_limit(root, proc_cgroup)
    return round(min(count, limit), 2) if limit else count


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    try:
        for line in cpuinfo.read_text(encoding="utf-8", errors="replace").splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()[:256]
    except OSError:
        pass
    return (platform.processor() or platform.machine())[:256]


def _existing(path: Path) -> Path:
    path = path.expanduser()
    while not path.exists() and path.parent != path:
        path = path.parent
    return path


def detect(
    state_dir: Path, gpus: GpuMonitor | None = None, *, cgroup_root: Path = CGROUP_ROOT
) -> Capabilities:
    """Everything this machine offers (GPUs from ``gpus``; none when it is ``None``)."""
    memory = psutil.virtual_memory()
    try:
        disk_free = psutil.disk_usage(str(_existing(state_dir))).free // MIB
    except OSError:
        disk_free = 0
    logical = psutil.cpu_count(logical=True) or 1
    physical = psutil.cpu_count(logical=False)
    return Capabilities(
        gpus=gpus.info() if gpus is not None else [],
        cpu_cores=logical,
        cpu_physical_cores=physical or None,
        cpu_usable=usable_cpus(cgroup_root),
        cpu_model=cpu_model(),
        ram_total_mb=memory.total // MIB,
        ram_available_mb=memory.available // MIB,
        disk_free_mb=disk_free,
        os=platform.system().lower()[:256],
        arch=platform.machine()[:256],
        hostname=socket.gethostname()[:256],
    )


def resolve_worker_type(setting: str, caps: Capabilities) -> WorkerType:
    """``auto`` is ``gpu`` when a GPU is present, else ``cpu``; explicit values win."""
    if setting == "gpu":
        return "gpu"
    if setting == "cpu":
        return "cpu"
    if setting == "edge":
        return "edge"
    return "gpu" if caps.gpus else "cpu"
