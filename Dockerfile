# GPU image of the amrg pipeline, used by the Prefect GPU work pool (prefect.yaml, deploy/README.md).
#
#   docker build -t amrg:latest .                 # from the repository alone, no build context beyond it
#   docker run --rm --gpus all -v amrg-dvc-remote:/opt/amrg-dvc-remote amrg:latest \
#       python -m flows.pipeline --pull --push    # one run by hand, outside Prefect
#
# The checkout lives at /opt/amrg (with its .git: DVC needs it for dvc.lock and `dvc exp save`); the
# committed .dvc/config points the default DVC remote at ../amrg-dvc-remote, i.e. /opt/amrg-dvc-remote,
# where the work pool mounts the shared remote (a docker volume, NFS, or a Kubernetes PVC). For S3/GCS/
# Azure instead: `dvc remote add -d ...` (README), and install the matching extra: dvc[s3|gs|azure].
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ENV DEBIAN_FRONTEND=noninteractive \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONUNBUFFERED=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false

# python for the venv, git for DVC, a JRE for METEOR (pycocoevalcap runs a jar)
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv git default-jre-headless ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv "$VIRTUAL_ENV" \
    && pip install --upgrade pip

# torch first, pinned exactly as in the Makefile, so that no later requirement pulls another build
# (the PyPI linux wheels bundle their CUDA runtime; the host needs only the NVIDIA driver + toolkit)
RUN pip install torch==2.14.1 torchvision==0.29.1

WORKDIR /opt/amrg
COPY . /opt/amrg
RUN pip install ".[flows,faiss,metrics]" \
    && git config --system --add safe.directory /opt/amrg \
    && python -m amrg.cli check

# no ENTRYPOINT: the Prefect worker gives the command (`prefect flow-run execute`); by hand, see above
CMD ["python", "-m", "flows.pipeline", "--pull", "--push"]
