#!/usr/bin/env bash
# Build a Debian bookworm base image locally, for machines that reach Debian's mirrors and PyPI
# but no container registry:
#   scripts/docker_base.sh [IMAGE]        # default cama-base:bookworm; needs root and mmdebstrap
# The image holds python3 and python3-venv (what the Dockerfile's stages need), and trusts the
# certificate authorities this machine adds in /usr/local/share/ca-certificates, so that builds
# behind a TLS-inspecting proxy still reach PyPI. Use it with
#   docker build --build-arg BASE_IMAGE=cama-base:bookworm .
#   BASE_IMAGE=cama-base:bookworm docker compose build
set -euo pipefail
IMAGE="${1:-cama-base:bookworm}"
MIRROR="${DEBIAN_MIRROR:-http://deb.debian.org/debian}"
SECURITY="${DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}"

command -v mmdebstrap >/dev/null || { echo "mmdebstrap is missing: apt-get install mmdebstrap" >&2; exit 1; }
tarball="$(mktemp --suffix=.tar)"
trap 'rm -f "$tarball"' EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# shellcheck disable=SC2016  # $1 is the hook's argument (the new root), expanded by mmdebstrap
mmdebstrap --quiet --variant=minbase --include=python3,python3-venv,ca-certificates \
    --customize-hook='if ls /usr/local/share/ca-certificates/*.crt >/dev/null 2>&1; then
        cp /usr/local/share/ca-certificates/*.crt "$1/usr/local/share/ca-certificates/";
        chroot "$1" update-ca-certificates >/dev/null; fi' \
    bookworm "$tarball" \
    "deb $MIRROR bookworm main" "deb $MIRROR bookworm-updates main" "deb $SECURITY bookworm-security main"

# pip's own certificate bundle knows nothing of local authorities: point it at the system's
docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["bash"]' \
    "$tarball" "$IMAGE" >/dev/null
echo "built $IMAGE"
