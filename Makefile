# Headway: `make help` lists the targets.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: help venv lint test test-fast demo render cluster-tools bench bench-deps clean \
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

bench-deps: $(STAMP) ## install what the benchmark arms need: nginx, wrk (Debian), LiteLLM venv
	$(PY) -m bench.run --setup-only

bench: $(STAMP) bench-deps ## benchmarks (separate from the tests): prints numbers and ratios
	$(PY) -m bench.run $(BENCH_ARGS)

clean: ## remove the virtual environment and outputs
	rm -rf $(VENV) demo-output

# --- container image and kind (need Docker; untested on the build machines) ---
IMAGE_REPO ?= headway
IMAGE_TAG ?= dev
IMAGE := $(IMAGE_REPO):$(IMAGE_TAG)
KIND_CLUSTER ?= headway
NAMESPACE ?= headway-system
FAKE_GPUS ?= 8
DOCKER ?= docker
KIND ?= kind
KUBECTL ?= kubectl --context kind-$(KIND_CLUSTER)
HELM ?= helm --kube-context kind-$(KIND_CLUSTER)

image: ## build the container image (IMAGE_REPO:IMAGE_TAG, default headway:dev) with Docker
	$(DOCKER) build -t $(IMAGE) .

kind-up: ## create the kind cluster; its GPU worker gets fake nvidia.com/gpu capacity
	$(KIND) create cluster --name $(KIND_CLUSTER) --config kind-config.yaml
	for node in $$($(KUBECTL) get nodes -l headway.dev/node-pool=gpu -o name); do \
	  $(KUBECTL) patch $$node --subresource=status --type=json \
	    -p '[{"op":"add","path":"/status/capacity/nvidia.com~1gpu","value":"$(FAKE_GPUS)"}]'; \
	done

kind-load: ## load the image into the kind cluster's nodes
	$(KIND) load docker-image $(IMAGE) --name $(KIND_CLUSTER)

# CRDs first: `helm upgrade` never updates them (docs/install.md).
deploy: ## install or upgrade the chart (CRDs included) with the chart's Redis
	$(KUBECTL) apply --server-side --force-conflicts -f helm/headway/crds/
	$(HELM) upgrade --install headway helm/headway --namespace $(NAMESPACE) --create-namespace \
	  --set image.repository=$(IMAGE_REPO) --set image.tag=$(IMAGE_TAG) \
	  --set image.pullPolicy=IfNotPresent --set redis.enabled=true --wait --timeout 5m

# The examples name vLLM images; the demo swaps each pool's server for
# `headway simulate` on the pool's port, so no GPU or weights are needed.
kind-demo: ## apply examples/ with the simulator as every pool's model server
	$(KUBECTL) apply -f examples/
	for pool in $$($(KUBECTL) get modelpools -l app.kubernetes.io/part-of=headway-examples -o name); do \
	  port=$$($(KUBECTL) get $$pool -o jsonpath='{.spec.server.port}'); \
	  $(KUBECTL) patch $$pool --type=merge -p "{\"spec\":{\"server\":{\"template\":{\"spec\":{\"containers\":[{\"name\":\"simulator\",\"image\":\"$(IMAGE)\",\"args\":[\"simulate\",\"--listen=127.0.0.1:$$port\"]}]}}}}}"; \
	done
	$(KUBECTL) get modelpools,inferenceroutes,tokenquotas

kind-down: ## delete the kind cluster
	$(KIND) delete cluster --name $(KIND_CLUSTER)
