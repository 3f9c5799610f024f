# Two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: run test lint pytest bench bench-tools schemas clean

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## run: a local federation on loopback (coordinator + this machine as a worker, 127.0.0.1:8080)
run: $(STAMP)
	$(BIN)/rma-worker local

## test: lint, then every test
test: lint pytest

pytest: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	$(BIN)/python -m coordinator.protocol --export /tmp/rma-schemas-check >/dev/null
	diff -r coordinator/schemas /tmp/rma-schemas-check
	$(BIN)/hadolint docker/worker.Dockerfile docker/coordinator.Dockerfile
	$(BIN)/check-jsonschema --builtin-schema vendor.compose-spec edge-coordinator.yml deploy/compose/*.yml
	$(BIN)/check-jsonschema --builtin-schema vendor.github-workflows .github/workflows/*.yml

## schemas: re-export the wire contract's JSON Schemas into coordinator/schemas
schemas: $(STAMP)
	$(BIN)/python -m coordinator.protocol --export coordinator/schemas

## bench: performance figures, written to bench/results.md
bench: $(STAMP) bench-tools
	$(BIN)/python -m bench.run

# wrk and nginx are the peers the benchmarks measure against (Debian packages); installed when
# missing and this user can, otherwise the figures that need them are skipped with a hint.
bench-tools:
	@if ! command -v wrk >/dev/null || ! command -v nginx >/dev/null; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    apt-get install -y -q wrk nginx-light >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null && apt-get install -y -q wrk nginx-light >/dev/null; }; \
	  else echo "wrk/nginx missing: sudo apt-get install wrk nginx-light"; fi; \
	fi

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
