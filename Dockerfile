# docutray-bridge container image.
#
#   docker build -t docutray-bridge .
#   docker run --rm docutray-bridge --help
#
# Stage 1 builds the project's wheel and installs it with its dependencies (binary
# wheels only, pinned by constraints.txt when present) into a virtualenv at /opt/venv.
# Stage 2 is the same slim Python with that virtualenv copied in: no compiler, no pip,
# no source tree. It runs as the unprivileged user 10001 and writes nothing outside
# $TMPDIR (/tmp), so it works with a read-only root filesystem (mount /tmp writable).
# The base image is pinned by version tag and digest; bump both together.

FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

WORKDIR /src
# constraints.tx[t]: copied when present, without failing when absent.
COPY pyproject.toml README.md constraints.tx[t] ./
COPY service/ service/

RUN python -m venv --without-pip /opt/venv \
 && python -m pip wheel --no-deps --wheel-dir /wheels . \
 && if [ -f constraints.txt ]; then set -- --constraint constraints.txt; fi \
 && python -m pip --python /opt/venv/bin/python install --only-binary=:all: "$@" /wheels/*.whl \
 && /opt/venv/bin/docutray-bridge --help > /dev/null


FROM python:3.11.14-slim-bookworm@sha256:65a93d69fa75478d554f4ad27c85c1e69fa184956261b4301ebaf6dbb0a3543d

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
    TMPDIR=/tmp

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
