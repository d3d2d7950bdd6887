# The CPU environment: tests, data stages and the tiny pipeline. Built from the project's own lock.
#   docker build -f docker/cpu.Dockerfile -t llmpipe:cpu .
FROM python:3.11-slim
RUN apt-get update && apt-get install -y --no-install-recommends build-essential git make \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/llmpipe
COPY . .
# torch 2.13.0+cpu comes from PyTorch's CPU index; everything else from PyPI, pinned, no dependency resolution.
ENV PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN make setup
ENV PATH=/opt/llmpipe/.venv/bin:$PATH
CMD ["make", "pipeline"]
