#!/usr/bin/env bash
# Regenerates the shipped SWE task set (tasks.jsonl.xz + one trimmed source tarball per
# library) from PyPI source distributions. Network is needed here, at generation time only;
# tests, benches and training read the files in this directory and never download.
# Runs the suites in the local sandbox (python3 with pytest installed system-wide).
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
ROOT="$(cd "$HERE/../../../.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
DL="$(mktemp -d)"
trap 'rm -rf "$DL"' EXIT
"$PY" -m pip download --no-deps --no-binary :all: -d "$DL" \
  toolz==0.12.1 more-itertools==10.2.0 inflection==0.5.1
rm -f "$HERE"/*.tar.xz "$HERE"/tasks.jsonl.xz
cd "$ROOT"
PYTHONPATH="$ROOT" "$PY" -m katjax.envs.swe_data build "$DL"/*.tar.gz --out "$HERE" \
  --max-tasks "${MAX_TASKS:-12}" --seed "${SEED:-0}"
