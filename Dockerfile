# agent-sidecar: the egress proxy and `sidecar inject` webhook in one image.
#
#   docker build -t ghcr.io/agent-sidecar/sidecar:0.1.0 .
#   docker run --rm -v "$PWD/policies:/etc/sidecar/policies:ro" ghcr.io/agent-sidecar/sidecar:0.1.0

# Builder: resolve and install the package into a self-contained virtualenv.
FROM python:3.11-slim AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /src
RUN python -m venv /opt/venv
# .dockerignore lets only what the wheel needs into the context.
COPY . .
# gcc and mypyc compile the hot path to C (setup.py lists the modules); neither
# reaches the final image. The distribution's own compiler: no pinned version.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
# pip compiles the bytecode here, so the read-only root filesystem never needs to.
RUN /opt/venv/bin/pip install --no-cache-dir "setuptools==84.2.1" "mypy==2.4.1" \
    && SIDECAR_MYPYC=1 /opt/venv/bin/pip install --no-cache-dir --no-build-isolation . \
    && /opt/venv/bin/pip uninstall -y mypy

# Final: the same base (the venv's interpreter path must match), no compilers, no sources.
FROM python:3.11-slim

LABEL org.opencontainers.image.title="agent-sidecar" \
      org.opencontainers.image.description="Egress proxy for AI agents" \
      org.opencontainers.image.licenses="Apache-2.0"

# A numeric UID, so Kubernetes can verify runAsNonRoot without a passwd lookup.
RUN groupadd --system --gid 10001 sidecar \
    && useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin sidecar

COPY --from=builder /opt/venv /opt/venv

# Egress and admin stay on loopback: only the agent in the same pod may use the one, and
# the other needs a token anywhere else. The kubelet probes over the pod IP reach the
# probes listener, which answers /healthz and /readyz and nothing else.
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    SIDECAR_LISTEN=127.0.0.1:15000 \
    SIDECAR_ADMIN=127.0.0.1:15001 \
    SIDECAR_PROBES=0.0.0.0:15021

USER 10001:10001
EXPOSE 15021

ENTRYPOINT ["sidecar"]
CMD ["run", "--policies", "/etc/sidecar/policies"]
