# GPU nodes: CUDA torch, DeepSpeed, bitsandbytes, gptqmodel and vLLM, pinned in requirements/gpu.lock at the
# CPU lock's versions but for the CUDA builds (tests/docker checks both), installed by `make setup PROFILE=gpu`
# as on a cluster's shared file system. CUDA 13.0, as torch's wheels: the nodes need an NVIDIA driver >= 580
# (README, "GPU clusters"). For Slurm with pyxis/enroot:
#   docker build -f docker/gpu.Dockerfile -t llmpipe:gpu .
#   enroot import -o /shared/images/llmpipe-gpu.sqsh dockerd://llmpipe:gpu
#   llmpipe run -c llama-7b cluster.slurm.container_image=/shared/images/llmpipe-gpu.sqsh \
#     cluster.slurm.python=/opt/llmpipe/.venv/bin/python "cluster.slurm.container_mounts=[/shared:/shared]"
# Multi-node stages start their ranks with srun from inside the job (stages/common/launch.py): with the batch
# script in a container, that needs the site's Slurm client in the image, so such sites run multi-node
# training without container_image (the venv on the shared file system) or add their Slurm client here.
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04

SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1
# Ubuntu 24.04 ships Python 3.12; the project is pinned to 3.11 (pyproject's requires-python): deadsnakes.
# nvcc (this devel image) and ninja build DeepSpeed's and gptqmodel's CUDA extensions on first use.
RUN apt-get update \
    && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
    && add-apt-repository -y ppa:deadsnakes/ppa \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev build-essential git \
       make ninja-build \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/llmpipe
# The pinned environment first, in its own layer (editing the code does not reinstall it), with the Makefile's GPU
# profile's own command: every package pinned, torch's CUDA libraries included, so no resolver (--no-deps).
COPY requirements/ requirements/
RUN python3.11 -m venv .venv \
    && .venv/bin/python -m pip install pip==26.3 setuptools==78.1.1 wheel==0.48.0 \
    && .venv/bin/python -m pip install --no-deps --requirement requirements/gpu.lock
COPY . .
# The Makefile's own setup: finds the pins installed, adds the project (editable) and checks the CUDA torch.
RUN make setup PROFILE=gpu PYTHON=python3.11
ENV PATH=/opt/llmpipe/.venv/bin:$PATH
CMD ["llmpipe", "plan", "--config-name", "llama-7b"]
