#!/usr/bin/env bash
# The prepared GPU check: one command, within 8 minutes on one H200 (no network, no DALI).
#
#   tools/gpu_check.sh OUT_DIR [WHEELS_DIR] [--only STAGE,... --budget SECONDS --limit STAGE=SECONDS]
#   tools/gpu_check.sh --rehearse OUT_DIR [...]     # every stage here, on the CPU, at small sizes
#
# WHEELS_DIR holds the wheels the GPU machine lacks (pycocotools, mlperf-logging, webdataset,
# braceexpand; docs/PERFORMANCE.md has the versions and the command that downloads them); they
# are installed into a private folder, the project itself is not installed. The stages are in
# tools/gpu_check.py; OUT_DIR gets gpu_check.json (every stage's status, seconds and figures,
# rewritten after each stage) and gpu_check.log. Exit code 0 only when every stage passed.
set -uo pipefail

usage="usage: tools/gpu_check.sh [--rehearse] OUT_DIR [WHEELS_DIR] [--only STAGE,...] [--budget SECONDS] [--limit STAGE=SECONDS]"
mode=()
if [ "${1:-}" = "--rehearse" ]; then
  mode=(--rehearse)
  shift
fi
out=${1:?$usage}
shift
wheels=
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
  wheels=$1
  shift
fi
python=${PYTHON:-python3}
cd "$(dirname "$0")/.." || exit 2
export PYTHONUNBUFFERED=1

if [ -n "$wheels" ]; then
  shopt -s nullglob
  found=("$wheels"/*.whl)
  if [ ${#found[@]} -eq 0 ]; then
    echo "tools/gpu_check.sh: $wheels holds no .whl files; download them with the command in docs/PERFORMANCE.md" >&2
    exit 2
  fi
  site=$(mktemp -d)
  if ! "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${found[@]}"; then
    echo "tools/gpu_check.sh: installing the wheels in $wheels failed; the stages that need them will say so" >&2
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

exec "$python" tools/gpu_check.py "${mode[@]}" --out "$out" "$@"
