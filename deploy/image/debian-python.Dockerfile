# A Python 3.11 base made from Debian's own packages, for machines that cannot pull
# the official python image (no registry reachable). scripts/image builds it
#
#   FROM localhost/debian-base:bookworm   (debootstrap --variant=minbase bookworm, imported)
#
# and passes it to the project's Dockerfile as BASE_IMAGE. Debian's interpreter is
# /usr/bin/python3.11 (the official image's is /usr/local/bin/python3.11); the project's
# Dockerfile only relies on `python3.11` being on PATH and on a venv at /opt/venv.

ARG DEBIAN_BASE=localhost/debian-base:bookworm
FROM ${DEBIAN_BASE}

# debootstrap installs from bookworm alone; the upgrade brings in bookworm-updates and
# bookworm-security (scripts/image writes all three into the base's sources.list).
# Versions are whatever those ship when this layer is built: pinning them would break
# the build at the next security release, which removes the previous version.
# hadolint ignore=DL3008
RUN apt-get -o Acquire::Languages=none update \
 && apt-get -y upgrade \
 && apt-get install -y --no-install-recommends ca-certificates python3.11 python3.11-venv \
 && apt-get clean \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin /var/log/apt /var/log/dpkg.log \
 && python3.11 -c "import ensurepip, ssl, venv"

ENV LANG=C.UTF-8
CMD ["python3.11"]
