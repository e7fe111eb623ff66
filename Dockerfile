# docutray-bridge container image.
#
#   docker build -t docutray-bridge .
#   docker run --rm docutray-bridge --help
#   make image        (scripts/image: docker or podman, and a Debian-made base when no
#                      registry can be reached; see the README's "The container image")
#
# Stage 1 builds the project's wheel and installs it with its dependencies (binary
# wheels only, pinned by constraints.txt when present) into a virtualenv at /opt/venv.
# Stage 2 is the same base with that virtualenv copied in: no compiler, no pip,
# no source tree. It runs as the unprivileged user 10001 and writes nothing outside
# $TMPDIR (/tmp), so it works with a read-only root filesystem (mount /tmp writable).
#
# BASE_IMAGE: any Debian bookworm image with Python 3.11 as `python3.11` on PATH. The
# default is the official slim image, pinned by version tag and digest (bump both
# together); scripts/image passes a base built from Debian's packages
# (deploy/image/debian-python.Dockerfile) where no registry answers. Nothing here depends
# on where the interpreter lives (/usr/local/bin or /usr/bin): the venv's does.
ARG BASE_IMAGE=python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

FROM ${BASE_IMAGE} AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# pip for the build lives in its own venv (/opt/build, never copied): the official image
# ships pip, Debian's python3.11 does not (python3.11-venv brings ensurepip).
RUN python3.11 -m venv /opt/build \
 && python3.11 -m venv --without-pip /opt/venv

# Dependencies and the build backend first, in their own layer: a change to service/ or
# README.md does not download them again.
# constraints.tx[t]: copied when present, without failing when absent.
# The optional build secret `pip-ca` is a CA bundle for pip (behind a TLS-inspecting proxy:
# scripts/image passes the host's); it is mounted for one step, never stored in a layer.
COPY pyproject.toml constraints.tx[t] ./
RUN --mount=type=secret,id=pip-ca,target=/run/secrets/pip-ca.crt \
    if [ -s /run/secrets/pip-ca.crt ]; then export PIP_CERT=/run/secrets/pip-ca.crt; fi \
 && /opt/build/bin/python -c "import tomllib; p = tomllib.load(open('pyproject.toml', 'rb')); open('/tmp/build.txt', 'w').write('\n'.join(p['build-system']['requires'])); open('/tmp/requirements.txt', 'w').write('\n'.join(p['project']['dependencies']))" \
 && /opt/build/bin/pip install --requirement /tmp/build.txt \
 && if [ -f constraints.txt ]; then set -- --constraint constraints.txt; fi \
 && /opt/build/bin/pip --python /opt/venv/bin/python install --only-binary=:all: "$@" --requirement /tmp/requirements.txt

COPY README.md ./
COPY service/ service/
# The build backend is already in /opt/build: a change to the code downloads nothing.
RUN /opt/build/bin/pip wheel --no-build-isolation --no-deps --wheel-dir /wheels . \
 && /opt/build/bin/pip --python /opt/venv/bin/python install --no-deps /wheels/*.whl \
 && /opt/build/bin/pip --python /opt/venv/bin/python check \
 && /opt/venv/bin/docutray-bridge --help > /dev/null


FROM ${BASE_IMAGE}

LABEL org.opencontainers.image.title="docutray-bridge" \
      org.opencontainers.image.description="Kafka bridge to DocuTray's asynchronous OCR API" \
      org.opencontainers.image.source="https://github.com/docutray/docutray-bridge" \
      org.opencontainers.image.licenses="Apache-2.0"

RUN groupadd --system --gid 10001 bridge \
 && useradd --system --uid 10001 --gid 10001 --no-create-home \
      --home-dir /nonexistent --shell /usr/sbin/nologin bridge

COPY --from=builder /opt/venv /opt/venv

ENV PATH="/opt/venv/bin:${PATH}" \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    TMPDIR=/tmp \
    DEMO_DIR=/tmp/docutray-demo

USER 10001:10001
# /metrics, /healthz, /readyz (BRIDGE_METRICS_PORT).
EXPOSE 9400

# Liveness as Docker sees it: /healthz answers 200 while the processing loop beats.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('BRIDGE_METRICS_PORT', '9400'), timeout=4)"]

# Exec form: the bridge is PID 1 and gets SIGTERM directly, then drains
# within BRIDGE_SHUTDOWN_GRACE_S (give the container that plus 5 s to stop).
ENTRYPOINT ["docutray-bridge"]
CMD ["run"]
