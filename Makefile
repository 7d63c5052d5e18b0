# Two commands do all the set-up: `make lab` and `make test` (see README.md).
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch is installed first and pinned: a CPU build where there is no CUDA GPU, never a
# multi-GB CUDA download on a CPU-only machine.
TORCH_VERSION ?= 2.13.0
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
JUPYTER_ARGS ?=
PYTEST_ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: setup lab test unit notebooks tiny vocab run-all bench clean

setup: $(STAMP) tiny vocab

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	@if $(PY) -c "import torch" 2>/dev/null; then \
	  echo "torch already installed: $$($(PY) -c 'import torch; print(torch.__version__)')"; \
	elif command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PIP) install "torch==$(TORCH_VERSION)"; \
	elif d=$$(mktemp -d) && $(PIP) download -q --no-deps --no-index "torch==$(TORCH_VERSION)" -d "$$d" >/dev/null 2>&1 \
	     && rm -rf "$$d"; then \
	  echo "no CUDA GPU: installing torch $(TORCH_VERSION) from the local CPU wheel"; \
	  $(PIP) install -q "torch==$(TORCH_VERSION)"; \
	else \
	  echo "no CUDA GPU: installing the CPU build of torch $(TORCH_VERSION)"; \
	  $(PIP) install "torch==$(TORCH_VERSION)" --index-url $(TORCH_CPU_INDEX) --extra-index-url https://pypi.org/simple; \
	fi
	@if ! command -v nvidia-smi >/dev/null 2>&1; then \
	  $(PY) -W ignore -c "import torch, sys; sys.exit('a CUDA build of torch was installed on a machine without a GPU' if torch.version.cuda else 0)"; \
	fi
	$(PIP) install -q -e '.[test]'
	touch $@

tiny: $(STAMP)
	$(PY) -m helpers.tiny

# The real Llama-2 vocabulary for lesson 03 and the token-exact tests (fetched once, ~77 MB).
vocab: $(STAMP)
	$(PY) -m helpers.vocab

lab: setup
	cd notebooks && ../$(VENV)/bin/jupyter lab $(JUPYTER_ARGS)

# Unit tests, then nbval over every lesson (tests/nbenv.py sets the offline variables first).
test: setup
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env -rs $(PYTEST_ARGS)

unit: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

notebooks: setup
	$(PY) -m pytest notebooks --nbval-lax --nbval-current-env $(PYTEST_ARGS)

clean:
	rm -rf build outputs .pytest_cache

# Execute every lesson headless with the selected model; executed copies and HTML go to build/.
run-all: setup
	$(PY) .ci/run_all.py $(RUN_ALL_ARGS)
