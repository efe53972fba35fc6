# Headway: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv lint test test-fast demo render cluster-tools bench clean \
        image kind-up kind-load deploy kind-demo kind-down

help: ## list the targets
	@grep -hE '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-14s %s\n", $$1, $$2}'

$(STAMP): pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP) ## create .venv with Headway and its dev tools

redis-server:
	@command -v redis-server >/dev/null || { \
	  echo "installing redis-server (Debian package)"; \
	  if [ "$$(id -u)" = 0 ]; then apt-get update -qq && apt-get install -y -qq redis-server; \
	  else sudo apt-get update -qq && sudo apt-get install -y -qq redis-server; fi; }

lint: $(STAMP) ## ruff, mypy --strict, import-linter
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy contract/headway_contract operator/headway_operator sidecar/headway_sidecar cli/headway_cli
	$(VENV)/bin/lint-imports

cluster-tools: ## build kube-apiserver, etcd, kwok, helm... from Go modules (cached outside the repo)
	bash hack/cluster-tools.sh

test: $(STAMP) redis-server ## run every test (builds the cluster tools on first use)
	@if [ -f hack/cluster-tools.sh ]; then bash hack/cluster-tools.sh; fi
	$(VENV)/bin/pytest $(PYTEST_ARGS)

test-fast: $(STAMP) ## the tests that need no Kubernetes API server
	$(VENV)/bin/pytest -m "not kube and not cluster" $(PYTEST_ARGS)

demo: $(STAMP) ## render examples/, start simulators and sidecars, drive traffic, print a report
	$(VENV)/bin/headway demo $(if $(DEMO_DURATION),--duration $(DEMO_DURATION))

render: $(STAMP) ## render examples/ into contract documents under demo-output/config
	$(VENV)/bin/headway render -f examples -o demo-output/config

bench: $(STAMP) ## benchmarks (separate from the tests): prints numbers and ratios
	$(PY) -m bench.run

clean: ## remove the virtual environment and outputs
	rm -rf $(VENV) demo-output
