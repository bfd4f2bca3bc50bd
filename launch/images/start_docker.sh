#!/usr/bin/env bash
# Makes a Docker engine available for the sandbox tests: installs docker.io (and bubblewrap,
# python3-pytest, git for the local sandbox) from Debian's packages when missing, starts
# dockerd in the background if nothing answers, waits until it does, then builds the base
# image. Default dockerd flags work here (overlay2 on ext4, cgroup v1, iptables available);
# set DOCKERD_FLAGS (e.g. "--storage-driver=vfs --iptables=false") where they do not.
set -euo pipefail
cd "$(dirname "$0")"
export DEBIAN_FRONTEND=noninteractive
need=()
command -v dockerd >/dev/null || need+=(docker.io)
command -v bwrap >/dev/null || need+=(bubblewrap)
command -v git >/dev/null || need+=(git)
/usr/bin/python3 -c 'import pytest' 2>/dev/null || need+=(python3-pytest)
if [ ${#need[@]} -gt 0 ]; then
  echo "start_docker: installing ${need[*]}"
  apt-get update -q && apt-get install -y -q "${need[@]}" </dev/null
fi
if ! docker info >/dev/null 2>&1; then
  echo "start_docker: starting dockerd ${DOCKERD_FLAGS:-}"
  # shellcheck disable=SC2086
  nohup dockerd ${DOCKERD_FLAGS:-} >/var/log/katjax-dockerd.log 2>&1 </dev/null &
  for _ in $(seq 60); do
    docker info >/dev/null 2>&1 && break
    sleep 1
  done
  docker info >/dev/null 2>&1 || { tail -20 /var/log/katjax-dockerd.log; exit 1; }
fi
echo "start_docker: engine $(docker version --format '{{.Server.Version}}') is up"
./build_base.sh
