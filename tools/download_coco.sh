#!/usr/bin/env bash
# Download COCO 2017 (train2017, val2017, annotations) and the reference's ResNet-50 weights
# (Detectron's MSRA R-50.pkl, through tools/download_weights.py, which checks it) into DIR,
# resuming partial downloads, checking the published MD5s and unpacking. Re-running skips what
# is already complete. PYTHON: the interpreter (default: .venv/bin/python, which `make` builds).
#
#   tools/download_coco.sh DIR                  # DIR/{train2017,val2017,annotations,R-50.pkl}
#   tools/download_coco.sh --check-md5 FILE MD5 # only the checksum step, on a local file
set -euo pipefail

readonly COCO_URL=http://images.cocodataset.org
repo=$(cd "$(dirname "$0")/.." && pwd)
readonly repo
# archive path under COCO_URL, published MD5
readonly ARCHIVES=(
  "annotations/annotations_trainval2017.zip f4bbac642086de4f52a3fdda2de5fa2c"
  "zips/val2017.zip 442b8da7639aecaf257c1dceb8ba8c80"
  "zips/train2017.zip cced6f7f71b7629ddf16f17bbcfab6b2"
)

usage() {
  sed -n '2,8s/^# \{0,1\}//p' "$0"
}

die() {
  echo "download_coco.sh: $*" >&2
  exit 1
}

md5_of() {
  if command -v md5sum >/dev/null; then
    md5sum "$1" | cut -d' ' -f1
  else
    md5 -q "$1" # macOS
  fi
}

# check_md5 FILE EXPECTED: succeeds when FILE has the expected MD5, else says what to do.
check_md5() {
  local file=$1 expected=$2 actual
  [[ -f $file ]] || die "$file does not exist; run the download again"
  actual=$(md5_of "$file")
  [[ $actual == "$expected" ]] ||
    die "$file has MD5 $actual, expected $expected; delete it and run the download again"
}

# fetch URL FILE: download, continuing a partial FILE where it stopped.
fetch() {
  if command -v curl >/dev/null; then
    curl --fail --location --retry 5 --continue-at - --output "$2" "$1"
  elif command -v wget >/dev/null; then
    wget --continue --tries=5 --output-document="$2" "$1"
  else
    die "neither curl nor wget is installed; install one of them"
  fi
}

download_archive() {
  local dir=$1 path=$2 md5=$3 zip stamp
  zip="$dir/$(basename "$path")"
  stamp="$zip.unpacked"
  [[ -f $stamp ]] && return
  # A complete archive is not fetched again (a server answers a resume past the end with an error).
  if ! { [[ -f $zip ]] && [[ $(md5_of "$zip") == "$md5" ]]; }; then
    fetch "$COCO_URL/$path" "$zip"
    check_md5 "$zip" "$md5"
  fi
  unzip -q -o "$zip" -d "$dir"
  touch "$stamp"
}

main() {
  case "${1:-}" in
    -h | --help)
      usage
      exit 0
      ;;
    --check-md5)
      [[ $# -eq 3 ]] || die "--check-md5 takes FILE and MD5; see --help"
      check_md5 "$2" "$3"
      echo "$2: MD5 OK"
      exit 0
      ;;
    "" | -*)
      usage >&2
      exit 2
      ;;
  esac
  [[ $# -eq 1 ]] || die "takes one folder, got $# arguments; see --help"
  local dir=$1 entry
  mkdir -p "$dir"
  command -v unzip >/dev/null || die "unzip is not installed; install it (e.g. apt-get install unzip)"
  for entry in "${ARCHIVES[@]}"; do
    # shellcheck disable=SC2086 # split "path md5" into two arguments
    download_archive "$dir" $entry
  done
  # R-50.pkl has no published checksum: download_weights.py checks that it loads, then names it.
  local python=${PYTHON:-}
  if [[ -z $python ]]; then
    python=python3
    [[ -x $repo/.venv/bin/python ]] && python=$repo/.venv/bin/python
  fi
  "$python" "$repo/tools/download_weights.py" r50-msra --out "$dir"
  echo "COCO 2017 and R-50.pkl are in $dir"
}

main "$@"
