# The one image every Kubeflow component (and the PyTorchJob for multi-node training) runs in.
# One recipe, two bases (--build-arg BASE=...):
#   cuda   (default, production): a CUDA + PyTorch image; torch comes with it (CUDA_BASE_IMAGE).
#   debian (CPU use, CI): plain Debian bookworm (DEBIAN_BASE_IMAGE) + Python; pip installs torch.
# Layers go from rarely to often changed: base, torch, the dependencies named in pyproject.toml, and the
# package itself last, so a code change rebuilds one small layer. Nothing is fetched at run time.
ARG BASE=cuda
ARG CUDA_BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
ARG DEBIAN_BASE_IMAGE=debian:bookworm-slim

FROM ${CUDA_BASE_IMAGE} AS base-cuda
ARG CUDA_BASE_IMAGE
ARG BASE_DIGEST=""
# The base this image was built from: name and digest (the image workflow resolves the digest).
LABEL org.opencontainers.image.base.name="${CUDA_BASE_IMAGE}" \
      org.opencontainers.image.base.digest="${BASE_DIGEST}"
# git: `dvc get` of a dataset from a git repo. torch, torchvision and Python come with the base.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

FROM ${DEBIAN_BASE_IMAGE} AS base-debian
ARG DEBIAN_BASE_IMAGE
ARG BASE_DIGEST=""
ARG TORCH_VERSION=2.14.1
ARG TORCHVISION_VERSION=0.29.1
LABEL org.opencontainers.image.base.name="${DEBIAN_BASE_IMAGE}" \
      org.opencontainers.image.base.digest="${BASE_DIGEST}"
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git ca-certificates \
    && rm -rf /var/lib/apt/lists/*
# Debian's Python is externally managed: everything goes into one venv, first on PATH.
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}
# The `ca` secret (optional) is a CA bundle for pip behind a TLS-intercepting proxy, as on the CI
# machine: a secret mount, so it is never written into a layer.
RUN --mount=type=secret,id=ca \
    python3 -m venv "${VIRTUAL_ENV}" \
    && if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && pip install --no-cache-dir "torch==${TORCH_VERSION}" "torchvision==${TORCHVISION_VERSION}"

# The base chosen by BASE (DL3006: a stage of this file, not a registry image).
# hadolint ignore=DL3006
FROM base-${BASE}
LABEL org.opencontainers.image.title="yolo-pipeline" \
      org.opencontainers.image.description="YOLOv5 training pipeline steps: validate, stats, train, evaluate" \
      org.opencontainers.image.licenses="AGPL-3.0-only"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    DVC_NO_ANALYTICS=1

WORKDIR /opt/yolo-pipeline
# The dependencies pyproject.toml names (core + pipeline and dvc extras), without the package: this layer
# is rebuilt only when pyproject.toml or constraints.txt change. torch/torchvision are already there and
# satisfy pyproject's lower bounds, so pip keeps them. The pip cache is a build cache mount, not a layer.
COPY pyproject.toml constraints.txt ./
RUN --mount=type=secret,id=ca --mount=type=cache,target=/root/.cache/pip \
    if [ -s /run/secrets/ca ]; then export PIP_CERT=/run/secrets/ca; fi \
    && python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb'))['project']; \
print('\n'.join(p['dependencies'] + p['optional-dependencies']['pipeline'] + p['optional-dependencies']['dvc']))" \
       > /tmp/requirements.txt \
    && pip install -c constraints.txt -r /tmp/requirements.txt "setuptools>=68" wheel \
    && rm /tmp/requirements.txt

# The package last: no network (no build isolation, no dependencies), seconds to rebuild.
COPY README.md ./
COPY yolo ./yolo
COPY components ./components
COPY pipelines ./pipelines
RUN pip install --no-cache-dir --no-deps --no-build-isolation . \
    && rm -rf build ./*.egg-info \
    && python -c "import yolo, components, pipelines, kfp, dvc, torch; print('torch', torch.__version__)"
COPY docker/init.py /usr/local/bin/container-init

# A non-root user with a writable HOME; /tmp stays world-writable. Build matplotlib's font cache now,
# as that user, so nothing is built at run time.
RUN useradd --create-home --uid 1000 --shell /bin/bash yolo
USER 1000
ENV HOME=/home/yolo \
    MPLCONFIGDIR=/home/yolo/.config/matplotlib
RUN python -c "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt; plt.figure()"
WORKDIR /home/yolo

# Declared last: a build argument is in the environment of every later RUN, so an earlier GIT_SHA would
# make each commit a cache miss for the dependency layer.
ARG VERSION=0.1.0
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_SHA}"
ENV YOLO_PIPELINE_GIT_SHA=${GIT_SHA}

# PID 1 is a small init (docker/init.py): it passes `docker stop`'s SIGTERM to every process, so the
# trainer — a grandchild in a Kubeflow component — stops at a step boundary, writes last.pt and exits
# 143 (docs/kubeflow.md). No CLI entrypoint: the command is the whole argv (`yolo-pipeline train ...`),
# which is how Kubeflow and kfp.local's DockerRunner run the components.
ENTRYPOINT ["/usr/local/bin/container-init"]
CMD ["yolo-pipeline", "--help"]
