# syntax=docker/dockerfile:1
#
# An edge coordinator (`rma-coordinator`), as run by edge-coordinator.yml.
#
#   docker build -f docker/coordinator.Dockerfile -t ghcr.io/<owner>/rma-coordinator .
#
# Expected size (an estimate: no Docker engine where this was written, so never built here):
# python:3.12.11-slim-bookworm ~125 MB uncompressed plus the venv ~50 MB (measured by installing
# the wheel into a fresh venv on amd64, pip removed): about 175 MB uncompressed, roughly 65-75 MB
# to pull. The tunnel is a separate container (cloudflare/cloudflared): no cloudflared here.

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
RUN python -m pip wheel --no-deps --wheel-dir /wheels . \
    && python -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-compile /wheels/rma_federation-*.whl \
    && /opt/venv/bin/pip uninstall --yes pip

# ---------------------------------------------------------------- runtime
FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="rma-coordinator" \
      org.opencontainers.image.description="Edge coordinator of the RMA volunteer-compute federation" \
      org.opencontainers.image.licenses="MIT"
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    COORDINATOR_HOST=0.0.0.0 \
    COORDINATOR_PORT=8080 \
    COORDINATOR_STATE_DIR=/var/lib/rma-coordinator \
    LOG_FORMAT=json
RUN groupadd --system --gid 10001 rma \
    && useradd --system --uid 10001 --gid rma --home-dir /var/lib/rma-coordinator \
       --shell /usr/sbin/nologin rma \
    && install -d -o rma -g rma -m 0700 /var/lib/rma-coordinator
COPY --from=build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /var/lib/rma-coordinator
# The generated coordinator id is persisted here: the router knows the coordinator by it.
VOLUME ["/var/lib/rma-coordinator"]
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('COORDINATOR_PORT', '8080'), timeout=4)"]
# Exec form: rma-coordinator is PID 1; aiohttp stops gracefully on SIGTERM.
STOPSIGNAL SIGTERM
ENTRYPOINT ["rma-coordinator"]
CMD ["serve"]
