"""Capability detection: a fake NVML module (one and two GPUs, errors), psutil, cgroup quotas."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from structlog.testing import capture_logs

from coordinator.protocol import Capabilities, GpuInfo
from worker_agent.capabilities import (
    GpuMonitor,
    cgroup_cpu_limit,
    cpu_model,
    detect,
    resolve_worker_type,
    usable_cpus,
)

MIB = 1024 * 1024


class NVMLError(Exception):
    pass


class NVMLError_LibraryNotFound(NVMLError):
    pass


class NVMLError_NotSupported(NVMLError):
    pass


@dataclass
class FakeGpu:
    name: str | bytes
    uuid: str | bytes
    total_mib: int
    free_mib: int
    util: int | None = 37
    temp: int | None = 61
    cc: tuple[int, int] | None = (8, 9)


class FakeNvml:
    """The subset of pynvml the agent uses, with the same call shapes and error classes."""

    NVMLError = NVMLError
    NVML_TEMPERATURE_GPU = 0

    def __init__(
        self,
        gpus: list[FakeGpu],
        *,
        init_error: Exception | None = None,
        driver: str | bytes = "550.54.15",
        cuda: int = 12040,
    ) -> None:
        self.gpus = gpus
        self.init_error = init_error
        self.driver = driver
        self.cuda = cuda
        self.initialised = False
        self.shutdowns = 0

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise self.init_error
        self.initialised = True

    def nvmlShutdown(self) -> None:
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        return self.gpus[index]

    def nvmlDeviceGetName(self, h: FakeGpu) -> str | bytes:
        return h.name

    def nvmlDeviceGetUUID(self, h: FakeGpu) -> str | bytes:
        return h.uuid

    def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> Any:
        return SimpleNamespace(
            total=h.total_mib * MIB, free=h.free_mib * MIB, used=(h.total_mib - h.free_mib) * MIB
        )

    def nvmlDeviceGetUtilizationRates(self, h: FakeGpu) -> Any:
        if h.util is None:
            raise NVMLError_NotSupported("Not Supported")
        return SimpleNamespace(gpu=h.util, memory=10)

    def nvmlDeviceGetTemperature(self, h: FakeGpu, sensor: int) -> int:
        if h.temp is None:
            raise NVMLError_NotSupported("Not Supported")
        return h.temp

    def nvmlDeviceGetCudaComputeCapability(self, h: FakeGpu) -> tuple[int, int]:
        if h.cc is None:
            raise NVMLError_NotSupported("Not Supported")
        return h.cc

    def nvmlSystemGetDriverVersion(self) -> str | bytes:
        return self.driver

    def nvmlSystemGetCudaDriverVersion(self) -> int:
        return self.cuda


RTX = FakeGpu("NVIDIA GeForce RTX 4090", "GPU-1111", 24564, 20000)


def test_one_gpu_with_every_field() -> None:
    nvml = FakeNvml([RTX])
    monitor = GpuMonitor(nvml)
    [gpu] = monitor.info()
    assert gpu == GpuInfo(
        index=0,
        name="NVIDIA GeForce RTX 4090",
        uuid="GPU-1111",
        memory_total_mb=24564,
        memory_free_mb=20000,
        utilization_pct=37.0,
        temperature_c=61.0,
        driver_version="550.54.15",
        cuda_driver_version="12.4",
        compute_capability="8.9",
    )
    assert isinstance(gpu.memory_total_mb, int)
    [load] = monitor.load()
    assert load.index == 0
    assert load.utilization_pct == 37.0
    assert load.memory_free_mb == 20000
    monitor.close()
    assert nvml.shutdowns == 1


def test_two_gpus_reported_separately_with_bytes_names() -> None:
    """Older nvidia-ml-py returns bytes; unsupported fields become None, not failures."""
    nvml = FakeNvml(
        [
            FakeGpu(b"Tesla T4", b"GPU-aaaa", 15360, 15000, util=None, temp=None, cc=None),
            FakeGpu(b"NVIDIA A100-SXM4-80GB", b"GPU-bbbb", 81920, 80000, util=99),
        ],
        driver=b"535.104.05",
        cuda=12020,
    )
    first, second = GpuMonitor(nvml).info()
    assert (first.index, first.name, first.uuid) == (0, "Tesla T4", "GPU-aaaa")
    assert first.utilization_pct is None
    assert first.temperature_c is None
    assert first.compute_capability is None
    assert (second.index, second.name, second.memory_total_mb) == (
        1,
        "NVIDIA A100-SXM4-80GB",
        81920,
    )
    assert second.driver_version == "535.104.05"
    assert second.cuda_driver_version == "12.2"
    loads = GpuMonitor(nvml).load()
    assert [(g.index, g.utilization_pct) for g in loads] == [(0, None), (1, 99.0)]


def test_nvml_absent_means_no_gpu_with_one_log_line() -> None:
    nvml = FakeNvml([RTX], init_error=NVMLError_LibraryNotFound("NVML Shared Library Not Found"))
    with capture_logs() as logs:
        monitor = GpuMonitor(nvml)
        assert monitor.info() == []
        assert monitor.load() == []
        monitor.close()
    assert [e["event"] for e in logs] == ["no_gpu"]
    assert "NVMLError_LibraryNotFound" in logs[0]["reason"]


def test_real_pynvml_here_reports_no_gpu() -> None:
    """This machine has no NVIDIA driver: the real pynvml fails cleanly."""
    monitor = GpuMonitor()
    assert monitor.info() == []
    assert monitor.error is not None


def test_device_enumeration_failure_is_no_gpu() -> None:
    class Broken(FakeNvml):
        def nvmlDeviceGetCount(self) -> int:
            raise NVMLError("Unknown Error")

    nvml = Broken([RTX])
    monitor = GpuMonitor(nvml)
    assert monitor.info() == []
    assert nvml.shutdowns == 1


def test_one_unreadable_gpu_is_skipped() -> None:
    class HalfBroken(FakeNvml):
        def nvmlDeviceGetMemoryInfo(self, h: FakeGpu) -> Any:
            if h.uuid == "GPU-lost":
                raise NVMLError("GPU is lost")
            return super().nvmlDeviceGetMemoryInfo(h)

    gpus = GpuMonitor(HalfBroken([FakeGpu("Lost", "GPU-lost", 1, 1), RTX])).info()
    assert [g.index for g in gpus] == [1]


@pytest.mark.parametrize(
    ("content", "expected"),
    [("max 100000\n", None), ("200000 100000\n", 2.0), ("50000 100000", 0.5), ("bogus", None)],
)
def test_cgroup_v2_cpu_max(tmp_path: Path, content: str, expected: float | None) -> None:
    (tmp_path / "docker" / "abc").mkdir(parents=True)
    (tmp_path / "docker" / "abc" / "cpu.max").write_text(content)
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/docker/abc\n")
    assert cgroup_cpu_limit(tmp_path, proc) == expected


def test_usable_cpus_is_capped_by_the_quota(tmp_path: Path) -> None:
    proc = tmp_path / "proc-cgroup"
    proc.write_text("0::/\n")
    (tmp_path / "cpu.max").write_text("50000 100000\n")
    assert usable_cpus(tmp_path, proc) == 0.5
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert usable_cpus(tmp_path, proc) >= 1


def test_cpu_model_from_cpuinfo(tmp_path: Path) -> None:
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: AMD EPYC 9654 96-Core Processor\n")
    assert cpu_model(info) == "AMD EPYC 9654 96-Core Processor"
    assert cpu_model(tmp_path / "missing")  # falls back to platform data


def test_detect_this_machine(tmp_path: Path) -> None:
    caps = detect(tmp_path / "does" / "not" / "exist", GpuMonitor(FakeNvml([RTX, RTX])))
    assert caps.cpu_cores >= 1
    assert caps.cpu_usable is not None
    assert caps.cpu_usable > 0
    assert caps.ram_total_mb > caps.ram_available_mb > 0
    assert caps.disk_free_mb > 0
    assert caps.os == "linux"
    assert caps.arch
    assert [g.index for g in caps.gpus] == [0, 1]
    # it is valid wire data
    Capabilities.model_validate_json(caps.model_dump_json())
    json.loads(caps.model_dump_json())


def test_worker_type_resolution() -> None:
    none = Capabilities()
    one = Capabilities(gpus=[GpuInfo(index=0, name="x", memory_total_mb=1, memory_free_mb=1)])
    assert resolve_worker_type("auto", none) == "cpu"
    assert resolve_worker_type("auto", one) == "gpu"
    assert resolve_worker_type("cpu", one) == "cpu"
    assert resolve_worker_type("gpu", none) == "gpu"
    assert resolve_worker_type("edge", one) == "edge"
