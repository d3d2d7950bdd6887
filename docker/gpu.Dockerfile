# GPU nodes: CUDA torch, DeepSpeed, bitsandbytes, gptqmodel, vLLM. Same versions as the CPU lock.
#   docker build -f docker/gpu.Dockerfile -t llmpipe:gpu .
FROM nvidia/cuda:13.0.0-devel-ubuntu24.04
RUN apt-get update && apt-get install -y --no-install-recommends python3.11 python3.11-venv python3.11-dev \
    build-essential git make && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/llmpipe
COPY . .
RUN python3.11 -m venv .venv && .venv/bin/pip install --upgrade pip==26.3 setuptools==78.1.1 wheel==0.48.0 \
    && .venv/bin/pip install -r requirements/gpu.txt && .venv/bin/pip install --no-deps -e .
ENV PATH=/opt/llmpipe/.venv/bin:$PATH
CMD ["llmpipe", "plan", "--config-name", "llama-7b"]
