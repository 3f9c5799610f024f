"""The service catalog: built-in specs, aliases, fitness rules and catalog files."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from coordinator.catalog import BUILTIN, Catalog, CatalogError, ServiceSpec
from coordinator.protocol import Capabilities, GpuInfo


def caps(*vram_mb: int, ram_mb: int = 0) -> Capabilities:
    gpus = [
        GpuInfo(index=i, name="gpu", memory_total_mb=v, memory_free_mb=v)
        for i, v in enumerate(vram_mb)
    ]
    return Capabilities(gpus=gpus, ram_total_mb=ram_mb)


@pytest.fixture
def builtin() -> Catalog:
    return Catalog.load(None)


def write(tmp_path: Path, content: Any, name: str = "catalog.json") -> Path:
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif isinstance(content, str):
        path.write_text(content, encoding="utf-8")
    else:
        path.write_text(json.dumps(content), encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# Built-in catalog


EXPECTED_ALIASES = {
    "llm": "llm-inference",
    "ocr": "vision-ocr",
    "vision": "vision-ocr",
    "rag": "rag-embeddings",
    "embeddings": "rag-embeddings",
    "ner": "ner-extraction",
    "docs": "document-processing",
    "document": "document-processing",
    "notes": "notes-coa",
    "coa": "notes-coa",
}


@pytest.mark.parametrize(("alias", "name"), sorted(EXPECTED_ALIASES.items()))
def test_builtin_aliases_resolve(builtin: Catalog, alias: str, name: str) -> None:
    assert builtin.canonical(alias) == name
    assert alias in builtin
    spec = builtin.get(alias)
    assert spec is not None
    assert spec.name == name
    assert spec is builtin.get(name)
    assert alias in builtin.aliases_of(name)


def test_builtin_names(builtin: Catalog) -> None:
    names = [spec.name for spec in builtin]
    assert names == [spec.name for spec in BUILTIN]
    assert set(names) == {
        "llm-inference",
        "vision-ocr",
        "rag-embeddings",
        "ner-extraction",
        "document-processing",
        "notes-coa",
        "echo",
    }
    for name in names:
        assert builtin.canonical(name) == name
        assert name in builtin
        assert builtin.get(name) is not None


def test_builtin_specs(builtin: Catalog) -> None:
    llm = builtin.get("llm-inference")
    assert llm is not None
    assert (llm.requires_gpu, llm.min_vram_mb, llm.target_replicas) == (True, 6_000, 2)
    echo = builtin.get("echo")
    assert echo is not None
    assert (echo.requires_gpu, echo.target_replicas, echo.aliases) == (False, 0, ())
    # Priorities order the upstream services; echo comes last.
    priorities = [spec.priority for spec in builtin]
    assert priorities == sorted(priorities)
    assert builtin.aliases_of("echo") == []
    assert builtin.aliases_of("llm") == []  # aliases_of takes canonical names
    assert builtin.aliases_of("nope") == []


@pytest.mark.parametrize("name", ["unknown", "LLM", "llm ", "", "llm-inference2"])
def test_unknown_names(builtin: Catalog, name: str) -> None:
    assert builtin.canonical(name) == name
    assert builtin.get(name) is None
    assert name not in builtin


@pytest.mark.parametrize("value", [None, 1, b"llm", ("llm",)])
def test_contains_only_strings(builtin: Catalog, value: object) -> None:
    assert value not in builtin


def test_builtin_aliases_never_clash() -> None:
    names = {spec.name for spec in BUILTIN}
    aliases = [alias for spec in BUILTIN for alias in spec.aliases]
    assert len(aliases) == len(set(aliases))
    assert not names & set(aliases)


def test_dump_round_trips(builtin: Catalog, tmp_path: Path) -> None:
    dumped = builtin.dump()
    again = Catalog.load(write(tmp_path, dumped))
    assert list(again) == list(builtin)
    assert again.canonical("ocr") == "vision-ocr"


def test_specs_are_frozen() -> None:
    spec = ServiceSpec(name="x")
    with pytest.raises(ValidationError):
        spec.requires_gpu = True


# --------------------------------------------------------------------------------------------
# fits()


@pytest.mark.parametrize(
    ("spec", "worker_type", "capabilities", "fits"),
    [
        # requires_gpu
        (ServiceSpec(name="g", requires_gpu=True), "gpu", caps(8000), True),
        (ServiceSpec(name="g", requires_gpu=True), "gpu", caps(), False),  # no GPU listed
        (ServiceSpec(name="g", requires_gpu=True), "cpu", caps(8000), False),
        (ServiceSpec(name="g", requires_gpu=True), "edge", caps(8000), False),
        (ServiceSpec(name="g", requires_gpu=True), "cpu", caps(), False),
        # min_vram_mb: the largest GPU counts
        (ServiceSpec(name="v", requires_gpu=True, min_vram_mb=6000), "gpu", caps(6000), True),
        (ServiceSpec(name="v", requires_gpu=True, min_vram_mb=6000), "gpu", caps(5999), False),
        (
            ServiceSpec(name="v", requires_gpu=True, min_vram_mb=6000),
            "gpu",
            caps(4000, 24000),
            True,
        ),
        (
            ServiceSpec(name="v", requires_gpu=True, min_vram_mb=6000),
            "gpu",
            caps(4000, 4000),
            False,
        ),
        (ServiceSpec(name="v", min_vram_mb=1), "cpu", caps(), False),  # VRAM without a GPU
        (ServiceSpec(name="v", min_vram_mb=1), "cpu", caps(1), True),
        (ServiceSpec(name="v", min_vram_mb=0), "cpu", caps(), True),
        # min_ram_mb
        (ServiceSpec(name="r", min_ram_mb=2000), "cpu", caps(ram_mb=2000), True),
        (ServiceSpec(name="r", min_ram_mb=2000), "cpu", caps(ram_mb=1999), False),
        (ServiceSpec(name="r", min_ram_mb=2000), "gpu", caps(80000, ram_mb=1000), False),
        (ServiceSpec(name="r", min_ram_mb=2000), "edge", caps(ram_mb=64000), True),
        # all together
        (
            ServiceSpec(name="a", requires_gpu=True, min_vram_mb=8000, min_ram_mb=16000),
            "gpu",
            caps(8000, ram_mb=16000),
            True,
        ),
        (
            ServiceSpec(name="a", requires_gpu=True, min_vram_mb=8000, min_ram_mb=16000),
            "gpu",
            caps(8000, ram_mb=15999),
            False,
        ),
        # no requirements: anything fits
        (ServiceSpec(name="n"), "cpu", Capabilities(), True),
        (ServiceSpec(name="n"), "gpu", Capabilities(), True),
        (ServiceSpec(name="n"), "edge", Capabilities(), True),
    ],
)
def test_fits(spec: ServiceSpec, worker_type: Any, capabilities: Capabilities, fits: bool) -> None:
    assert spec.fits(worker_type, capabilities) is fits


@pytest.mark.parametrize(
    ("name", "worker_type", "capabilities", "fits"),
    [
        ("llm-inference", "gpu", caps(8000, ram_mb=32000), True),
        ("llm-inference", "gpu", caps(4000, ram_mb=32000), False),
        ("llm-inference", "cpu", caps(ram_mb=512000), False),
        ("vision-ocr", "gpu", caps(4000), True),
        ("vision-ocr", "cpu", caps(), False),
        ("rag-embeddings", "cpu", caps(ram_mb=4000), True),
        ("rag-embeddings", "cpu", caps(ram_mb=1000), False),
        ("document-processing", "cpu", caps(ram_mb=1000), True),
        ("notes-coa", "cpu", Capabilities(), True),
        ("echo", "cpu", Capabilities(), True),
        ("echo", "edge", Capabilities(), True),
    ],
)
def test_builtin_fits(
    builtin: Catalog, name: str, worker_type: Any, capabilities: Capabilities, fits: bool
) -> None:
    spec = builtin.get(name)
    assert spec is not None
    assert spec.fits(worker_type, capabilities) is fits


# --------------------------------------------------------------------------------------------
# Catalog files


def test_load_a_valid_file(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        [
            {
                "name": "whisper",
                "description": "speech to text",
                "requires_gpu": True,
                "min_vram_mb": 2000,
                "priority": 5,
                "target_replicas": 3,
                "aliases": ["stt", "asr"],
            },
            {"name": "echo"},
        ],
    )
    catalog = Catalog.load(path)
    assert [s.name for s in catalog] == ["whisper", "echo"]
    whisper = catalog.get("stt")
    assert whisper is not None
    assert whisper.name == "whisper"
    assert whisper.aliases == ("stt", "asr")
    assert (whisper.priority, whisper.target_replicas, whisper.min_vram_mb) == (5, 3, 2000)
    assert catalog.canonical("asr") == "whisper"
    echo = catalog.get("echo")
    assert echo is not None
    assert (echo.priority, echo.target_replicas, echo.requires_gpu) == (100, 1, False)
    # The file replaces the built-in catalog.
    assert catalog.get("llm-inference") is None
    assert catalog.canonical("llm") == "llm"
    assert "llm" not in catalog


def test_load_an_empty_list(tmp_path: Path) -> None:
    catalog = Catalog.load(write(tmp_path, []))
    assert list(catalog) == []
    assert catalog.get("echo") is None


def test_load_none_is_the_builtin_catalog() -> None:
    assert list(Catalog.load(None)) == list(BUILTIN)


@pytest.mark.parametrize(
    "content",
    [
        "",
        "{",
        "[{]",
        "not json",
        "[{'name': 'x'}]",
        b"\xff\xfe\x00garbage",
        "[1, 2",
        "[]trailing",
    ],
    ids=["empty", "brace", "broken", "text", "single-quotes", "binary", "unterminated", "trailing"],
)
def test_invalid_json_raises_catalog_error(tmp_path: Path, content: Any) -> None:
    path = write(tmp_path, content)
    with pytest.raises(CatalogError) as info:
        Catalog.load(path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize(
    "content",
    [
        {"name": "echo"},  # not a list
        "echo",
        None,
        [1],
        [{}],  # name missing
        [{"name": "Echo"}],  # pattern
        [{"name": "-echo"}],
        [{"name": "a" * 65}],
        [{"name": "x", "extra": True}],  # extra="forbid"
        [{"name": "x", "min_vram_mb": -1}],
        [{"name": "x", "min_ram_mb": -1}],
        [{"name": "x", "target_replicas": -1}],
        [{"name": "x", "requires_gpu": "maybe"}],
        [{"name": "x", "aliases": ["Bad Alias"]}],
        [{"name": "x", "aliases": "xx"}],
        [{"name": "x", "priority": "high"}],
    ],
)
def test_invalid_schema_raises_catalog_error(tmp_path: Path, content: Any) -> None:
    with pytest.raises(CatalogError):
        Catalog.load(write(tmp_path, content))


def test_missing_file_raises_catalog_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError) as info:
        Catalog.load(tmp_path / "nope.json")
    assert "cannot read" in str(info.value)


def test_directory_raises_catalog_error(tmp_path: Path) -> None:
    with pytest.raises(CatalogError):
        Catalog.load(tmp_path)


def test_catalog_error_is_a_value_error() -> None:
    assert issubclass(CatalogError, ValueError)


@pytest.mark.parametrize(
    "specs",
    [
        [{"name": "a"}, {"name": "a"}],  # duplicate name
        [{"name": "a", "aliases": ["x"]}, {"name": "b", "aliases": ["x"]}],  # duplicate alias
        [{"name": "a", "aliases": ["b"]}, {"name": "b"}],  # alias is another's name
        [{"name": "b"}, {"name": "a", "aliases": ["b"]}],  # same, other order
        [{"name": "a", "aliases": ["a"]}],  # alias is its own name
        [{"name": "a", "aliases": ["x", "x"]}],  # duplicate alias within one spec
    ],
    ids=["name", "alias", "alias-is-name", "alias-is-name-reversed", "self-alias", "repeat"],
)
def test_duplicates_raise_catalog_error(tmp_path: Path, specs: list[dict[str, Any]]) -> None:
    with pytest.raises(CatalogError):
        Catalog.load(write(tmp_path, specs))
    with pytest.raises(CatalogError):
        Catalog([ServiceSpec(**spec) for spec in specs])


# --------------------------------------------------------------------------------------------
# allow_unlisted


def test_allow_unlisted_creates_a_default_spec() -> None:
    catalog = Catalog(BUILTIN, allow_unlisted=True)
    spec = catalog.get("my-custom-service")
    assert spec is not None
    assert spec.name == "my-custom-service"
    assert spec.target_replicas == 0
    assert not spec.requires_gpu
    assert spec.fits("cpu", Capabilities())
    # Listing is unchanged: unlisted services are not "in" the catalog.
    assert "my-custom-service" not in catalog
    assert [s.name for s in catalog] == [s.name for s in BUILTIN]
    # Listed services and aliases still resolve to their real specs.
    llm = catalog.get("llm")
    assert llm is not None
    assert llm.name == "llm-inference"
    assert llm.requires_gpu


def test_allow_unlisted_off_by_default(tmp_path: Path) -> None:
    assert Catalog(BUILTIN).get("my-custom-service") is None
    assert Catalog.load(None).allow_unlisted is False
    assert Catalog.load(None, allow_unlisted=True).allow_unlisted is True
    loaded = Catalog.load(write(tmp_path, [{"name": "a"}]), allow_unlisted=True)
    unlisted = loaded.get("b")
    assert unlisted is not None
    assert unlisted.name == "b"
