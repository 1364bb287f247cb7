# Two commands from a clean clone with only python3 (see README "Quick start"):
#   make demo    set up .venv, then adapt a tiny base to handwriting on this CPU (runs/demo/)
#   make test    set up .venv, then run the whole test suite (what CI runs)
# `make test VENV=.venv-lowest CONSTRAINTS=.ci/constraints-lowest.txt` runs the suite on the
# lowest versions pyproject.toml allows (CI runs both).

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?=
# The CPU build of torch, first: a bare `torch` (or a package that asks for it) pulls a
# multi-GB CUDA build. On a GPU machine, install your CUDA torch into the venv instead.
TORCH ?= torch==2.13.0
DEMO_OUTPUT ?= runs/demo
PYTEST_ARGS ?=

export HF_HUB_OFFLINE := 1
export WANDB_MODE := offline
export TOKENIZERS_PARALLELISM := false

STAMP := $(VENV)/.ocrtune-installed

.PHONY: demo test setup

setup: $(STAMP)

# Rebuilt when the dependencies or the constraints change.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -e ".[test]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	@$(VENV)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|accelerate|datasets|huggingface.hub) "
	touch $@

demo: $(STAMP)
	$(VENV)/bin/ocrtune demo --output $(DEMO_OUTPUT) --overwrite

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)
