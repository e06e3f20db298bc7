# On a fresh machine:
#   make run    set up .venv and train the embedded tiny DPO run (2 ZeRO-3 ranks; CPU/gloo when no GPU)
#   make test   set up .venv and run the whole test suite
#   make test-fast  the unit and in-process tests only (no slow launcher runs, no subprocess runs): under 3 minutes
#   make docs   build the documentation site into site/ (mkdocs.yml, docs/)
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
NPROC ?= 2
# On a CPU machine the CPU build of torch; on a GPU machine: make setup TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
RUN_ARGS ?= --config configs/tiny-cpu.yaml --plugins dpo

.PHONY: setup run test test-fast docs
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q -e ".[dev]"
	touch $@

run: setup
	$(BIN)/deepspeed --num_gpus $(NPROC) launch/train.py $(RUN_ARGS)

test: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q tests

test-fast: setup
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -m "not slow and not subprocess" tests

docs: setup
	$(BIN)/mkdocs build --strict
