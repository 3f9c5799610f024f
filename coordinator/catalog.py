"""The service catalog: which services this federation runs, what each needs, and their aliases.

The built-in catalog holds the upstream services plus ``echo``. ``SERVICE_CATALOG_FILE`` replaces
it with a JSON list of entries of the same shape (see :class:`ServiceSpec`).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

from coordinator.protocol import Capabilities, ServiceName, WorkerType


class ServiceSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: ServiceName
    description: str = ""
    requires_gpu: bool = False
    min_vram_mb: int = Field(default=0, ge=0)
    min_ram_mb: int = Field(default=0, ge=0)
    priority: int = Field(default=100, description="lower is assigned first")
    target_replicas: int = Field(default=1, ge=0)
    aliases: tuple[ServiceName, ...] = ()

    def fits(self, worker_type: WorkerType, caps: Capabilities) -> bool:
        if self.requires_gpu and (worker_type != "gpu" or not caps.gpus):
            return False
        if self.min_vram_mb and caps.max_vram_mb < self.min_vram_mb:
            return False
        return not (self.min_ram_mb and caps.ram_total_mb < self.min_ram_mb)


BUILTIN: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        name="llm-inference",
        description="LLM chat/completions (Ollama, vLLM, any OpenAI-compatible server)",
        requires_gpu=True,
        min_vram_mb=6_000,
        priority=10,
        target_replicas=2,
        aliases=("llm",),
    ),
    ServiceSpec(
        name="vision-ocr",
        description="OCR and vision models",
        requires_gpu=True,
        min_vram_mb=4_000,
        priority=20,
        aliases=("ocr", "vision"),
    ),
    ServiceSpec(
        name="rag-embeddings",
        description="Text embeddings for retrieval",
        min_ram_mb=2_000,
        priority=30,
        aliases=("rag", "embeddings"),
    ),
    ServiceSpec(
        name="ner-extraction",
        description="Named-entity extraction",
        min_ram_mb=2_000,
        priority=40,
        aliases=("ner",),
    ),
    ServiceSpec(
        name="document-processing",
        description="Document parsing and conversion",
        min_ram_mb=1_000,
        priority=50,
        aliases=("docs", "document"),
    ),
    ServiceSpec(
        name="notes-coa",
        description="Notes and chart-of-accounts helpers",
        priority=60,
        aliases=("notes", "coa"),
    ),
    ServiceSpec(
        name="echo",
        description="Answers what it received; checks the whole chain",
        priority=1000,
        target_replicas=0,
    ),
)

_SPECS = TypeAdapter(list[ServiceSpec])


class CatalogError(ValueError):
    """The catalog file is unreadable or invalid."""


class Catalog:
    """Service specs by canonical name, with alias resolution."""

    def __init__(self, specs: Iterable[ServiceSpec], *, allow_unlisted: bool = False) -> None:
        self._specs: dict[str, ServiceSpec] = {}
        self._aliases: dict[str, str] = {}
        self.allow_unlisted = allow_unlisted
        for spec in specs:
            if spec.name in self._specs or spec.name in self._aliases:
                raise CatalogError(f"service {spec.name!r} is defined twice")
            self._specs[spec.name] = spec
        for spec in self._specs.values():
            for alias in spec.aliases:
                if alias in self._specs or alias in self._aliases:
                    raise CatalogError(f"alias {alias!r} clashes with another name")
                self._aliases[alias] = spec.name

    @classmethod
    def load(cls, path: Path | None, *, allow_unlisted: bool = False) -> Catalog:
        if path is None:
            return cls(BUILTIN, allow_unlisted=allow_unlisted)
        try:
            specs = _SPECS.validate_json(path.read_bytes())
        except OSError as exc:
            raise CatalogError(f"cannot read service catalog {path}: {exc}") from None
        except ValueError as exc:
            raise CatalogError(f"invalid service catalog {path}: {exc}") from None
        return cls(specs, allow_unlisted=allow_unlisted)

    def canonical(self, name: str) -> str:
        """The canonical name for ``name`` (aliases resolve; other names are returned as-is)."""
        return self._aliases.get(name, name)

    def get(self, name: str) -> ServiceSpec | None:
        spec = self._specs.get(self.canonical(name))
        if spec is None and self.allow_unlisted:
            return ServiceSpec(name=name, target_replicas=0)
        return spec

    def aliases_of(self, name: str) -> list[str]:
        spec = self._specs.get(name)
        return list(spec.aliases) if spec else []

    def __iter__(self) -> Iterator[ServiceSpec]:
        return iter(self._specs.values())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.canonical(name) in self._specs

    def dump(self) -> str:
        return json.dumps([s.model_dump(mode="json") for s in self._specs.values()], indent=2)
