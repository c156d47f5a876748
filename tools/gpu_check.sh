#!/usr/bin/env bash
# The prepared GPU check: one command, about 4 minutes on one H100 by docs/PERFORMANCE.md's
# estimate, inside a 420 s budget (no network there, no DALI). The first GPU window is two commands:
#
#   tools/gpu_check.sh --fetch-wheels .whl          # here, where pip reaches the registry
#   tools/gpu_check.sh "$OUT" .whl                  # there, in one device call carrying .whl
#
#   tools/gpu_check.sh OUT_DIR [WHEELS_DIR] [--only STAGE,...] [--budget SECONDS] [--limit STAGE=SECONDS]
#   tools/gpu_check.sh --rehearse OUT_DIR [...]     # every stage here, on the CPU, at small sizes
#   tools/gpu_check.sh --fetch-wheels DIR           # the wheels the GPU machine lacks (tools/gpu_wheels.txt)
#
# WHEELS_DIR holds those wheels (pycocotools, mlperf-logging, webdataset, braceexpand, for
# Python 3.12); they are installed into a private folder, the project itself is not installed.
# The stages are in tools/gpu_check.py (its --help lists them); OUT_DIR gets gpu_check.json
# (every stage's status, seconds and figures, rewritten after each stage) and gpu_check.log.
# Exit code 0 only when every stage passed.
set -uo pipefail

usage="usage: tools/gpu_check.sh [--rehearse] OUT_DIR [WHEELS_DIR] [--only STAGE,...] [--budget SECONDS] [--limit STAGE=SECONDS]
       tools/gpu_check.sh --fetch-wheels DIR
       tools/gpu_check.sh --help"
python=${PYTHON:-python3}
cd "$(dirname "$0")/.." || exit 2

# Downloads exactly the pinned wheels for the GPU machine (CPython 3.12, x86-64 Linux) and prints their sizes.
fetch_wheels() {
  local dir=$1
  mkdir -p "$dir" || exit 2
  if ! "$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
      -d "$dir" -r tools/gpu_wheels.txt; then
    echo "tools/gpu_check.sh: pip could not download the wheels in tools/gpu_wheels.txt; run it where pip reaches the registry" >&2
    exit 1
  fi
  local pinned total=0 count=0 wheel size
  pinned=$(grep -c '^[^#[:space:]]' tools/gpu_wheels.txt)
  shopt -s nullglob
  for wheel in "$dir"/*.whl; do
    size=$(stat -c %s "$wheel")
    printf '%10d  %s\n' "$size" "$(basename "$wheel")"
    total=$((total + size))
    count=$((count + 1))
  done
  printf '%10d  bytes in %d wheels, in %s\n' "$total" "$count" "$dir"
  if [ "$count" -ne "$pinned" ]; then
    echo "tools/gpu_check.sh: $dir holds $count wheels, not the $pinned of tools/gpu_wheels.txt; remove the others (two versions of one package stop the install)" >&2
    exit 1
  fi
}

mode=()
case "${1:-}" in
  -h|--help)
    echo "$usage"
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    exit 0 ;;
  --fetch-wheels)
    [ $# -eq 2 ] || { echo "$usage" >&2; exit 2; }
    fetch_wheels "$2"
    exit 0 ;;
  --rehearse)
    mode=(--rehearse)
    shift ;;
esac
if [ $# -eq 0 ] || [ "${1#-}" != "$1" ]; then
  echo "$usage" >&2
  exit 2
fi
out=$1
shift
wheels=
if [ $# -gt 0 ] && [ "${1#--}" = "$1" ]; then
  wheels=$1
  shift
fi
export PYTHONUNBUFFERED=1

if [ -n "$wheels" ]; then
  shopt -s nullglob
  found=("$wheels"/*.whl)
  if [ ${#found[@]} -eq 0 ]; then
    echo "tools/gpu_check.sh: $wheels holds no .whl files; download them with tools/gpu_check.sh --fetch-wheels $wheels" >&2
    exit 2
  fi
  site=$(mktemp -d)
  if ! "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "${found[@]}"; then
    echo "tools/gpu_check.sh: installing the wheels in $wheels failed; the stages that need them will say so" >&2
  fi
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi

exec "$python" tools/gpu_check.py "${mode[@]}" --out "$out" "$@"
