#!/usr/bin/env bash
# Builds the sandbox base image `katjax-sandbox:latest` locally (no registry is reachable):
# a minimal Debian rootfs made by debootstrap from the distribution's packages, with python3,
# pytest and git, plus an unprivileged user `sandbox` (uid 1000) owning /work; then
# `docker import`. Idempotent: does nothing if the image exists (FORCE=1 rebuilds).
# The rootfs tarball is cached in $KATJAX_IMAGE_CACHE so a rebuild only re-imports it.
set -euo pipefail
IMAGE="${KATJAX_SANDBOX_IMAGE:-katjax-sandbox:latest}"
SUITE="${SUITE:-bookworm}"
MIRROR="${MIRROR:-http://deb.debian.org/debian}"
CACHE="${KATJAX_IMAGE_CACHE:-/var/cache/katjax}"
TARBALL="$CACHE/rootfs-$SUITE.tar"

if [ -z "${FORCE:-}" ] && docker image inspect "$IMAGE" >/dev/null 2>&1; then
  echo "build_base: $IMAGE already present"
  exit 0
fi

if [ ! -s "$TARBALL" ]; then
  if ! command -v debootstrap >/dev/null; then
    apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q debootstrap
  fi
  mkdir -p "$CACHE"
  ROOT="$(mktemp -d)"  # a fresh directory under $TMPDIR for the rootfs
  trap 'rm -rf "$ROOT"' EXIT
  echo "build_base: debootstrap $SUITE into $ROOT"
  debootstrap --variant=minbase --include=python3,python3-pytest,git,patch \
    "$SUITE" "$ROOT" "$MIRROR" >"$CACHE/debootstrap.log" 2>&1 \
    || { tail -30 "$CACHE/debootstrap.log"; exit 1; }
  chroot "$ROOT" /usr/sbin/useradd --uid 1000 --create-home --shell /bin/bash sandbox
  mkdir -p "$ROOT/work" && chroot "$ROOT" chown 1000:1000 /work
  # Git refuses repos owned by another uid; graded copies may be written by root.
  printf '[safe]\n\tdirectory = *\n[user]\n\tname = sandbox\n\temail = sandbox@localhost\n' \
    >"$ROOT/etc/gitconfig"
  # Slim the image: apt lists, docs and caches are never used inside the sandbox.
  rm -rf "$ROOT"/var/cache/apt/archives/*.deb "$ROOT"/var/lib/apt/lists/* \
    "$ROOT"/usr/share/doc "$ROOT"/usr/share/man "$ROOT"/usr/share/locale
  tar -C "$ROOT" -cf "$TARBALL.tmp" . && mv "$TARBALL.tmp" "$TARBALL"
fi

echo "build_base: docker import $TARBALL as $IMAGE"
docker import \
  --change 'USER 1000' --change 'WORKDIR /work' \
  --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV HOME=/home/sandbox PYTHONDONTWRITEBYTECODE=1 LANG=C.UTF-8' \
  --change 'LABEL org.katjax.sandbox-base=1' \
  --change 'CMD ["sleep", "infinity"]' \
  "$TARBALL" "$IMAGE"
docker image inspect "$IMAGE" --format 'build_base: {{.Id}} {{.Size}} bytes'
