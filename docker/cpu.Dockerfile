# The CPU environment: tests, the data stages, the tiny pipeline, and the orchestrator on a Slurm login
# node. Built from the project's own pins: requirements/cpu.lock, installed by `make setup` exactly as on
# a laptop (tests/docker checks that it stays so).
#   docker build -f docker/cpu.Dockerfile -t llmpipe:cpu .
FROM python:3.11-slim-bookworm

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential git make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/llmpipe
# torch 2.13.0+cpu comes from PyTorch's CPU index, every other pin from PyPI; no dependency resolution.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu \
    PIP_NO_CACHE_DIR=1
# The pinned environment first, in its own layer: editing the code does not reinstall it.
COPY requirements/ requirements/
RUN python3 -m venv .venv \
    && .venv/bin/python -m pip install --constraint requirements/constraints-cpu.txt \
       pip==26.3 setuptools==78.1.1 wheel==0.48.0 \
    && .venv/bin/python -m pip install --constraint requirements/constraints-cpu.txt --no-deps \
       --requirement requirements/cpu.lock
COPY . .
# The Makefile's own setup: finds the pins installed, adds the project (editable) and checks the CPU torch.
RUN make setup
ENV PATH=/opt/llmpipe/.venv/bin:$PATH
CMD ["make", "pipeline"]
