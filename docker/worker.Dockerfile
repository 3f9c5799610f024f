# syntax=docker/dockerfile:1
#
# The universal worker agent (`rma-worker`): one image for CPU and GPU hosts.
#
#   docker build -f docker/worker.Dockerfile -t ghcr.io/<owner>/rma-worker .
#   docker run -d --name rma-worker --restart unless-stopped -v rma-worker:/var/lib/rma-worker \
#     ghcr.io/<owner>/rma-worker                                   # CPU
#   docker run -d --gpus all ... ghcr.io/<owner>/rma-worker        # GPU (NVIDIA container toolkit)
#
# GPUs: the NVIDIA container toolkit injects libnvidia-ml (NVML) into the container when it runs
# with `--gpus all`; the two NVIDIA_* variables below tell it to do so with the compute and
# utility (nvidia-smi / NVML) capabilities. Without a GPU the same image runs as a CPU worker.
#
# Expected size (an estimate: no Docker engine where this was written, so never built here):
# python:3.12.11-slim-bookworm is ~125 MB uncompressed (~45 MB compressed); the venv (aiohttp,
# pydantic-core, uvloop, httptools, psutil, ...; pip removed) ~50 MB, measured by installing the
# wheel into a fresh venv on amd64; the static cloudflared binary ~38 MB. About 215 MB
# uncompressed, roughly 85-95 MB to pull.

ARG PYTHON_IMAGE=python:3.12.11-slim-bookworm

# ---------------------------------------------------------------- build: this project as a wheel
FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY coordinator ./coordinator
COPY worker_agent ./worker_agent
# The wheel is built in an isolated build environment (setuptools from pyproject's
# build-system); only the venv it is installed into leaves this stage.
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-compile /wheels/rma_federation-*.whl \
    && /opt/venv/bin/pip uninstall --yes pip

# ---------------------------------------------------------------- cloudflared, pinned and verified
FROM ${PYTHON_IMAGE} AS cloudflared
# Set by BuildKit (`docker buildx build --platform linux/amd64,linux/arm64`); the legacy builder
# leaves it empty and the build machine's architecture is used.
ARG TARGETARCH
# cloudflared 2025.5.0. The checksums are the SHA-256 sums that Cloudflare publishes in the
# release notes of https://github.com/cloudflare/cloudflared/releases/tag/2025.5.0 for the
# assets cloudflared-linux-amd64 and cloudflared-linux-arm64 (cloudflared also prints them at
# start-up: "Version 2025.5.0 (Checksum ...)"). To upgrade: bump the version AND both sums
# from the new release's notes, and the cloudflare/cloudflared tag in edge-coordinator.yml.
ARG CLOUDFLARED_VERSION=2025.5.0
ARG CLOUDFLARED_SHA256_AMD64=a62266fd02041374f1fca0d85694aafdf7e26e171a314467356b471d4ebb2393
ARG CLOUDFLARED_SHA256_ARM64=47e55e6eba2755239f641c2c4f89878643ac0d9eaa127a6c84a2cb43fa2e0f03
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
# Slim images have no curl: Python's urllib downloads (it follows GitHub's redirect), and
# `sha256sum -c` fails the build on any mismatch.
RUN arch="${TARGETARCH:-$(dpkg --print-architecture)}"; \
    case "${arch}" in \
      amd64) sum="${CLOUDFLARED_SHA256_AMD64}" ;; \
      arm64) sum="${CLOUDFLARED_SHA256_ARM64}" ;; \
      *) echo "cloudflared: no pinned checksum for architecture ${arch}" >&2; exit 1 ;; \
    esac; \
    url="https://github.com/cloudflare/cloudflared/releases/download/${CLOUDFLARED_VERSION}/cloudflared-linux-${arch}"; \
    python -c 'import sys, urllib.request; urllib.request.urlretrieve(sys.argv[1], sys.argv[2])' \
      "${url}" /tmp/cloudflared \
    && echo "${sum}  /tmp/cloudflared" | sha256sum -c - \
    && install -m 0755 /tmp/cloudflared /usr/local/bin/cloudflared \
    && rm /tmp/cloudflared

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="rma-worker" \
      org.opencontainers.image.description="Universal worker agent of the RMA volunteer-compute federation (CPU and GPU)" \
      org.opencontainers.image.licenses="MIT"
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    STATE_DIR=/var/lib/rma-worker \
    GATEWAY_PORT=8000 \
    CLOUDFLARED_PATH=/usr/local/bin/cloudflared \
    CLOUDFLARED_DOWNLOAD=false \
    LOG_FORMAT=json \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
RUN groupadd --system --gid 10001 rma \
    && useradd --system --uid 10001 --gid rma --home-dir /var/lib/rma-worker \
       --shell /usr/sbin/nologin rma \
    && install -d -o rma -g rma -m 0700 /var/lib/rma-worker
COPY --from=build /opt/venv /opt/venv
COPY --from=cloudflared /usr/local/bin/cloudflared /usr/local/bin/cloudflared
USER 10001:10001
WORKDIR /var/lib/rma-worker
# The identity (worker id, coordinator id and their secrets) lives here: keep it in a volume so
# that it survives `docker rm` and an image upgrade.
VOLUME ["/var/lib/rma-worker"]
# The agent's own gateway answers GET /health (open, no key). It listens on GATEWAY_PORT, or on a
# free port when that one is taken (--network host beside another server): the agent writes
# the URL it really serves to STATE_DIR/health-url, which this check reads (standard library
# only, no agent start-up cost). In edge mode it is the in-process coordinator's /health.
HEALTHCHECK --interval=30s --timeout=5s --start-period=90s --retries=3 \
    CMD ["python", "-m", "worker_agent.healthcheck"]
# Exec form: rma-worker is PID 1 and gets SIGTERM itself (it drains for DRAIN_TIMEOUT, 30 s by
# default, so stop with `docker stop -t 45` / `stop_grace_period: 45s`).
STOPSIGNAL SIGTERM
ENTRYPOINT ["rma-worker"]
CMD ["run"]
