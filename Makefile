# Two commands on a fresh machine: `make run` and `make test`.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
ROUTER := router_worker
ROUTER_STAMP := $(ROUTER)/node_modules/.stamp-npm
ROUTER_ENV := WRANGLER_SEND_METRICS=false CLOUDFLARE_CF_FETCH_ENABLED=false

.PHONY: run test lint pytest bench bench-tools schemas clean router-deps router-lint router-test router-bench

$(STAMP): pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	@touch $(STAMP)

## run: a local federation on loopback (coordinator + this machine as a worker, 127.0.0.1:8080)
run: $(STAMP)
	$(BIN)/rma-worker local

## test: lint, then every test
test: lint router-test pytest

pytest: $(STAMP) $(ROUTER_STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP) router-lint
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

# ---------------------------------------------------------------------------------- router
# The router Worker (router_worker/): `npm ci` when node_modules is missing or older than the
# lockfile (stamp file), then `tsc --noEmit` and the vitest suite inside workerd.

$(ROUTER_STAMP): $(ROUTER)/package.json $(ROUTER)/package-lock.json
	cd $(ROUTER) && $(ROUTER_ENV) npm ci --no-audit --no-fund
	@touch $(ROUTER_STAMP)

## router-deps: install the router's pinned node_modules (npm ci)
router-deps: $(ROUTER_STAMP)

## router-lint: typecheck the router (tsc --noEmit)
router-lint: $(ROUTER_STAMP)
	cd $(ROUTER) && node_modules/.bin/tsc --noEmit

## router-test: the router's vitest suite inside workerd
router-test: router-lint
	cd $(ROUTER) && $(ROUTER_ENV) node_modules/.bin/vitest run

## router-bench: selection time over 1,000 coordinators (inside workerd)
router-bench: $(ROUTER_STAMP)
	cd $(ROUTER) && $(ROUTER_ENV) node_modules/.bin/vitest bench --run
