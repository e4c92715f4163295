# vtrlab — two commands set everything up on a fresh machine:
#   make figures   create the environment if missing, install, regenerate every figure and the README's findings table
#   make test      create the environment if missing, install, ruff (lint + format check), run the whole suite
#   make test-unit the fast tier only (tests/unit: pure functions, no models; about a minute)
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# On a machine without an NVIDIA driver we install the CPU build of torch first, so that
# resolving the other dependencies never pulls the multi-GB CUDA wheels.
TORCH_CPU ?= torch==2.13.0
HAS_GPU := $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 && echo 1)
STAMP := $(VENV)/.vtrlab-installed
LMMS_STAMP := $(VENV)/.vtrlab-lmms-installed

.PHONY: figures test test-unit lint install clean-figures

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@if [ -z "$(HAS_GPU)" ]; then $(PY) -m pip install -q "$(TORCH_CPU)"; fi
	$(PY) -m pip install -q -e '.[test,ray,slurm]'
	@touch $@

# The lmms-eval plugin's end-to-end tests need the `lmms` extra (`make test` installs it; figures do not).
# torch is pinned to the build already installed, so torchvision (which lmms-eval requires) resolves to
# the release matching it and no CUDA torch is pulled. PyPI's torchvision is a CUDA build that breaks
# imports on a CPU-only torch ("operator torchvision::nms does not exist"): it is removed where it does
# not import; lmms-eval and vtrlab run without it.
$(LMMS_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[lmms]' "torch==$$($(PY) -c 'import torch; print(torch.__version__.split("+")[0])')"
	@$(PY) -c 'import torchvision' >/dev/null 2>&1 || $(PY) -m pip uninstall -q -y torchvision
	@touch $@

install: $(STAMP)

# notebook 05 writes findings.json; `vtrlab findings` renders its table into README.md (between markers)
figures: $(STAMP)
	$(VENV)/bin/vtrlab figures $(FIGURES_ARGS)
	$(VENV)/bin/vtrlab findings

# ruff runs first and fails the target on any finding (config: [tool.ruff] in pyproject.toml).
lint: $(STAMP)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

test: $(LMMS_STAMP) lint
	VTRLAB_REQUIRE_LMMS=1 $(PY) -m pytest -n 2 --dist loadgroup -q -p no:cacheprovider $(PYTEST_ARGS)

test-unit: $(STAMP)
	$(PY) -m pytest tests/unit -q -p no:cacheprovider $(PYTEST_ARGS)
