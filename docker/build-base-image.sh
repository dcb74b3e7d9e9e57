#!/usr/bin/env bash
# Build a local Debian bookworm + Python 3.11 base image without pulling from any registry.
#
#   docker/build-base-image.sh [TAG]          (default TAG: kdiff-base:bookworm-py311)
#
# For machines where registry images cannot be pulled (only the Debian mirror and PyPI are
# reachable). debootstrap builds a minimal root filesystem, `docker import` turns it into an
# image. The project Dockerfile then builds on it with --build-arg BASE_IMAGE=<TAG>.
# Needs root, debootstrap and a running docker daemon. Idempotent: an existing TAG is kept
# unless FORCE=1.
set -euo pipefail

TAG="${1:-kdiff-base:bookworm-py311}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
ROOTFS="${ROOTFS:-/var/tmp/kdiff-base-rootfs}"
# python3-venv brings ensurepip (pip for the venv); the container init is Docker's (compose `init: true`).
PACKAGES="python3,python3-venv,ca-certificates"

if [[ "${FORCE:-0}" != 1 ]] && docker image inspect "$TAG" >/dev/null 2>&1; then
    echo "base image $TAG already exists (FORCE=1 to rebuild)"
    exit 0
fi
command -v debootstrap >/dev/null || { echo "debootstrap missing: apt-get install debootstrap" >&2; exit 1; }

rm -rf "$ROOTFS"
mkdir -p "$ROOTFS"
echo "debootstrap $SUITE -> $ROOTFS (slow: minutes)"
nice -n 10 debootstrap --variant=minbase --include="$PACKAGES" "$SUITE" "$ROOTFS" "$MIRROR"

# Slim the root filesystem: apt lists, caches, docs and man pages are not needed at runtime.
chroot "$ROOTFS" apt-get clean
rm -rf "$ROOTFS"/var/lib/apt/lists/* "$ROOTFS"/var/cache/apt/*.bin \
       "$ROOTFS"/usr/share/doc/* "$ROOTFS"/usr/share/man/* "$ROOTFS"/usr/share/info/* \
       "$ROOTFS"/usr/share/locale/* "$ROOTFS"/var/log/*.log "$ROOTFS"/tmp/*
# A sources.list so derived images can still apt-get install.
echo "deb $MIRROR $SUITE main" > "$ROOTFS/etc/apt/sources.list"

echo "docker import -> $TAG"
tar -C "$ROOTFS" -c . | docker import \
    --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' \
    - "$TAG"
rm -rf "$ROOTFS"
docker run --rm "$TAG" python3 --version
docker image ls "$TAG"
