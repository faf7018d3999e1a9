# syntax=docker/dockerfile:1
# The one image every Kubeflow component (and the PyTorchJob for multi-node training) runs in.
# The base carries CUDA and PyTorch; pick another build with --build-arg BASE_IMAGE=...
ARG BASE_IMAGE=pytorch/pytorch:2.11.0-cuda12.8-cudnn9-runtime
FROM ${BASE_IMAGE}

ARG VERSION=0.1.0
ARG GIT_SHA=unknown
LABEL org.opencontainers.image.title="yolo-pipeline" \
      org.opencontainers.image.description="YOLOv5 training pipeline steps: validate, stats, train, evaluate" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${GIT_SHA}" \
      org.opencontainers.image.licenses="AGPL-3.0-only"

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    MPLBACKEND=Agg \
    DVC_NO_ANALYTICS=1 \
    YOLO_PIPELINE_GIT_SHA=${GIT_SHA}

# git: `dvc get` of a dataset from a git repo. The rest comes from the base image or PyPI.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends git \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/yolo-pipeline
COPY pyproject.toml README.md constraints.txt ./
COPY yolo ./yolo
COPY components ./components
COPY pipelines ./pipelines
# torch/torchvision come from the base image (pyproject only sets lower bounds), so pip keeps them.
RUN pip install -c constraints.txt ".[pipeline,dvc]" \
    && python -c "import yolo, kfp, dvc, torch; print('torch', torch.__version__)"

# A non-root user with a writable HOME; /tmp stays world-writable. Build matplotlib's font cache now,
# as that user, so nothing is fetched or built at run time.
RUN useradd --create-home --uid 1000 --shell /bin/bash yolo
USER 1000
ENV HOME=/home/yolo \
    MPLCONFIGDIR=/home/yolo/.config/matplotlib
RUN python -c "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot as plt; plt.figure()"
WORKDIR /home/yolo

# Exec form: yolo-pipeline is PID 1's direct child-free process, so SIGTERM from Kubernetes reaches
# Python, which stops at a step boundary, writes last.pt and exits 143 (see docs/kubeflow.md).
ENTRYPOINT ["yolo-pipeline"]
CMD ["--help"]
