# syntax=docker/dockerfile:1.7
#
# s2v-batch GPU worker image. One image for every process of a cluster run, because Ray needs
# the same Ray and Python versions on the driver and the workers:
#   - Ray nodes (KubeRay head and GPU workers, or `ray up` with the docker section),
#   - Prefect flow runs (the Kubernetes work pool's Jobs), which drive the Ray pool as clients.
#
# Build from the repository root (docs/deploy.md, step 2):
#   docker build -f infra/worker.Dockerfile -t registry.example.com/s2v/worker:0.1.0 .
#
# The model is NOT in the image (tens of GB, and it changes on its own schedule): mount the
# checkpoint folder read-only at /models (a PersistentVolume, a host folder) or point
# S2V_CHECKPOINT at s3://... so the pipeline mirrors it into its cache. Nothing is fetched
# from a model hub at run time (HF_HUB_OFFLINE below).

ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04
FROM ${CUDA_IMAGE}

# Ray on the workers must equal Ray on the driver (Ray Client refuses a mismatch); the
# KubeRay manifest's rayVersion and infra/ray-cluster.yaml use this same version.
ARG RAY_VERSION=2.60.0
ARG PYTHON=python3.11
ARG APP_UID=1000

LABEL org.opencontainers.image.title="s2v-batch worker" \
      org.opencontainers.image.description="Wan2.2-S2V-14B batch pipeline: Ray GPU worker and Prefect flow runner" \
      org.opencontainers.image.version="0.1.0"

ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    LANG=C.UTF-8 \
    LC_ALL=C.UTF-8

# Ubuntu 22.04 ships Python 3.10; deadsnakes provides 3.11 as distribution packages.
# wget: KubeRay's probes call Ray's health endpoints with it. procps: the healthcheck's pgrep.
# tini: reaps the zombies Ray's worker processes leave behind when the container is PID 1.
# rsync + openssh-client: the Ray cluster launcher syncs file mounts into the container with
# rsync, and its autoscaler on the head reaches new worker VMs over SSH.
# ffmpeg is NOT installed from apt: the pipeline uses imageio-ffmpeg's static binary (a pip dependency).
RUN apt-get update \
 && apt-get install -y --no-install-recommends software-properties-common gpg-agent \
 && add-apt-repository -y ppa:deadsnakes/ppa \
 && apt-get update \
 && apt-get install -y --no-install-recommends \
        ${PYTHON} ${PYTHON}-venv ca-certificates wget procps tini rsync openssh-client libglib2.0-0 \
 && apt-get purge -y --auto-remove software-properties-common gpg-agent \
 && rm -rf /var/lib/apt/lists/*

# Non-root: the pipeline needs no privileges. The user owns the venv and the project folder
# (created as that user, so no `chown -R` layer doubles the image) so that `ray up`, whose
# commands run as this user, can sync a newer checkout over /opt/s2v and refresh the install
# without a rebuild. /data is the shared work folder (segment clips and their resumable states)
# mounted at the same path on every node; /models is the checkpoint volume, mounted read-only.
RUN useradd --uid ${APP_UID} --create-home --shell /bin/bash s2v \
 && install -d -o s2v -g s2v /opt/venv /opt/s2v /data /models
COPY --chmod=0755 infra/entrypoint.sh infra/healthcheck.sh /usr/local/bin/
USER s2v
ENV HOME=/home/s2v

RUN ${PYTHON} -m venv /opt/venv
ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:${PATH}

# Dependencies before the source, so editing code does not reinstall torch. PyPI's Linux torch
# wheel is the CUDA build (it brings its own CUDA libraries); constraints.txt pins the version
# the project is tested with. `ray[default]` adds the cluster pieces (autoscaler, dashboard agent)
# to the model extra's Ray, the fa4 extra FlashAttention-4 (used on Hopper/Blackwell GPUs), and prefect's kubernetes extra the Kubernetes worker. Empty packages stand in for the
# source so that pip resolves the project's dependencies now.
WORKDIR /opt/s2v
COPY --chown=s2v:s2v pyproject.toml constraints.txt README.md ./
RUN mkdir -p tasks flows model \
 && touch tasks/__init__.py flows/__init__.py model/__init__.py \
 && pip install --upgrade pip \
 && pip install -c constraints.txt ".[model,fa4]" "prefect[kubernetes]" "ray[default]==${RAY_VERSION}" \
 && pip uninstall -y s2v-batch

# The project itself, editable: Prefect deployments run `flows/batch.py:batch` from this folder
# (prefect.yaml's pull step sets the working directory to $S2V_PROJECT_DIR).
COPY --chown=s2v:s2v tasks ./tasks
COPY --chown=s2v:s2v flows ./flows
COPY --chown=s2v:s2v model ./model
COPY --chown=s2v:s2v manifests ./manifests
COPY --chown=s2v:s2v prefect.yaml ./
RUN pip install --no-deps -c constraints.txt -e ".[model]" \
 && s2v-batch --help >/dev/null \
 && python -c "import ray, torch, prefect_kubernetes, tasks.generate.pool, flows.batch"

ENV S2V_PROJECT_DIR=/opt/s2v \
    S2V_CHECKPOINT=/models/Wan2.2-S2V-14B \
    S2V_WORK_DIR=/data/work \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    RAY_USAGE_STATS_ENABLED=0
VOLUME ["/models"]

# Ray's GCS/Ray Client/object manager ports are opened by Ray itself; 8265 (dashboard) is not
# published: nothing outside the cluster needs it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 CMD ["healthcheck.sh"]
ENTRYPOINT ["tini", "--", "entrypoint.sh"]
CMD []
