#!/usr/bin/env bash
# Run and time one MLPerf Mask R-CNN training run, as the reference's run_and_time.sh does.
#
#   tools/run_and_time.sh [RECIPE] [--dry] [--shards DIR] [--data-dir DIR] [--weights FILE|none]
#                         [--val-annotations FILE] [--nproc N] [--output-dir DIR] [KEY=VALUE ...]
#
# RECIPE: a config in configs/ by name (batch8_1gpu, batch96_8gpu, batch256_32gpu, demo) or a
# YAML path; default batch8_1gpu. Each option has an environment variable (the option wins):
#   --shards DIR           SHARDS    folder with train/ and val/ from tools/shard_coco.py (default /data/shards)
#   --data-dir DIR         DATA_DIR  tools/download_coco.sh's folder (default /data/coco)
#   --val-annotations FILE VAL_ANNOTATIONS  default DATA_DIR/annotations/instances_val2017.json
#   --weights FILE|none    WEIGHTS   the provided R-50 weights (default DATA_DIR/R-50.pkl); none: from scratch (demo)
#   --nproc N              NPROC     processes on this node (default: its GPUs, else 1); above 1 through torchrun
#   --output-dir DIR       OUTPUT_DIR  a new folder (default runs/RECIPE-DATE; several nodes: the same on each)
#   TORCHRUN_ARGS  torchrun's options for several nodes, e.g. "--nnodes=4 --rdzv_backend=c10d --rdzv_endpoint=HOST:29500"
#   PYTHON         the interpreter (default: the environment `make` builds, .venv/bin/python, else python3)
#   DROP_CACHES    the kernel's file for dropping the page cache before the run, as the reference's scripts do
#                  (default /proc/sys/vm/drop_caches, writable by root); none: keep it. The MLPerf log's
#                  cache_clear says whether it was dropped.
# KEY=VALUE pairs are config overrides for train/main.py. --dry prints the command and exits; it
# warns when the recipe is meant for more GPUs (its name's _<N>gpu) than the command starts.
#
# Prints the time to train (run_start to run_stop in OUTPUT_DIR/mlperf.log, what MLPerf scores)
# and the reference's result line RESULT,OBJECT_DETECTION,,SECONDS,ORG,START (the command's
# wall-clock seconds). Exit code: the trainer's when it failed, else tools/time_to_train.py's: 0
# when the run reached its quality target or, having none (eval.box_ap_target=1.0, a fine-tune),
# trained its whole schedule; 1 when it missed its target; 2 for a missing input.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)

usage() {
  sed -n '2,/^set -euo/{/^set -euo/d;s/^# \{0,1\}//;p;}' "$0"
}

die() {
  echo "error: $*" >&2
  exit 2
}

gpus() {
  local count
  count=$(nvidia-smi -L 2>/dev/null | grep -c '^GPU' || true)
  echo "${count:-0}"
}

recipe=batch8_1gpu
dry=0
overrides=()
shards=${SHARDS:-/data/shards}
data_dir=${DATA_DIR:-/data/coco}
val_annotations=${VAL_ANNOTATIONS:-}
weights=${WEIGHTS:-}
nproc=${NPROC:-}
output_dir=${OUTPUT_DIR:-}
while [ $# -gt 0 ]; do
  case $1 in
    -h | --help) usage; exit 0 ;;
    --dry) dry=1 ;;
    --shards | --data-dir | --val-annotations | --weights | --nproc | --output-dir)
      [ $# -ge 2 ] || die "$1 needs a value; see tools/run_and_time.sh --help"
      case $1 in
        --shards) shards=$2 ;;
        --data-dir) data_dir=$2 ;;
        --val-annotations) val_annotations=$2 ;;
        --weights) weights=$2 ;;
        --nproc) nproc=$2 ;;
        --output-dir) output_dir=$2 ;;
      esac
      shift ;;
    -*) die "unknown option $1; see tools/run_and_time.sh --help" ;;
    *=*) overrides+=("$1") ;;
    *) recipe=$1 ;;
  esac
  shift
done

config=$recipe
if [ ! -f "$config" ]; then
  config=$repo/configs/${recipe%.yaml}.yaml
fi
if [ ! -f "$config" ]; then
  known=$(for file in "$repo"/configs/*.yaml; do basename "${file%.yaml}"; done | paste -sd ' ' -)
  die "no recipe $recipe: name one in configs/ ($known) or pass a YAML file"
fi
name=$(basename "${config%.yaml}")
val_annotations=${val_annotations:-$data_dir/annotations/instances_val2017.json}
weights=${weights:-$data_dir/R-50.pkl}
if [ -z "$nproc" ]; then
  nproc=$(gpus)
  [ "$nproc" -gt 0 ] || nproc=1
fi
[[ $nproc =~ ^[1-9][0-9]*$ ]] || die "--nproc (NPROC) must be a positive number of processes, got $nproc"
if [ -n "${TORCHRUN_ARGS:-}" ] && [ -z "$output_dir" ]; then
  die "several nodes (TORCHRUN_ARGS) need --output-dir DIR (or OUTPUT_DIR), the same on every node"
fi
output_dir=${output_dir:-runs/$name-$(date +%Y%m%d-%H%M%S)}
if [ -z "${PYTHON:-}" ] && [ -x "$repo/.venv/bin/python" ]; then
  PYTHON=$repo/.venv/bin/python # the environment `make` builds
fi
python=${PYTHON:-python3}

args=(--config "$config" --data "$shards/train" --val-data "$shards/val" --val-annotations "$val_annotations")
if [ "$weights" != none ]; then
  args+=("train.weights=$weights")
fi
args+=("output_dir=$output_dir" "${overrides[@]}")
if [ -n "${TORCHRUN_ARGS:-}" ]; then
  read -r -a rendezvous <<<"$TORCHRUN_ARGS"
  cmd=("$python" -m torch.distributed.run "${rendezvous[@]}" "--nproc_per_node=$nproc" "$repo/train/main.py" "${args[@]}")
elif [ "$nproc" -gt 1 ]; then
  cmd=("$python" -m torch.distributed.run --standalone "--nproc_per_node=$nproc" "$repo/train/main.py" "${args[@]}")
else
  cmd=("$python" "$repo/train/main.py" "${args[@]}")
fi

# A recipe named for N GPUs (batch96_8gpu) keeps its global batch on fewer: each process then takes
# more images (solver.ims_per_batch / processes), which its GPU may not hold, and the times differ.
if [[ $name =~ _([0-9]+)gpu$ ]]; then
  meant=${BASH_REMATCH[1]}
  nodes=1
  if [[ ${TORCHRUN_ARGS:-} =~ --nnodes[=\ ]([0-9]+) ]]; then
    nodes=${BASH_REMATCH[1]}
  fi
  if [ "$((nodes * nproc))" -lt "$meant" ]; then
    echo "warning: recipe $name is meant for $meant GPUs, but this command starts $((nodes * nproc)) process(es) (this machine has $(gpus) GPU(s)): the global batch (solver.ims_per_batch) meant for $meant is split over $((nodes * nproc)); pass --nproc N (or NPROC), TORCHRUN_ARGS for several nodes, or a recipe for your GPUs (batch8_1gpu for one)" >&2
  fi
fi
if [ "$dry" = 1 ]; then
  printf '%q ' "${cmd[@]}"
  echo
  exit 0
fi
for folder in "$shards/train" "$shards/val"; do
  [ -f "$folder/manifest.json" ] || die "$folder holds no shards (no manifest.json); pass --shards DIR (or SHARDS) with train/ and val/ from tools/shard_coco.py"
done
[ -f "$val_annotations" ] || die "$val_annotations does not exist; pass --val-annotations FILE (or VAL_ANNOTATIONS), or --data-dir DIR holding annotations/instances_val2017.json"
if [ "$weights" != none ] && [ ! -f "$weights" ]; then
  die "$weights does not exist; pass --weights FILE (or WEIGHTS) with the provided R-50.pkl (tools/download_coco.sh), or --weights none"
fi

drop_caches=${DROP_CACHES:-/proc/sys/vm/drop_caches}
cache_clear=false
if [ "$drop_caches" != none ] && sync && { echo 3 >"$drop_caches"; } 2>/dev/null; then
  cache_clear=true
else
  echo "note: the page cache was not dropped (DROP_CACHES=$drop_caches); the MLPerf log says cache_clear: false" >&2
fi
cmd+=("train.mlperf.cache_clear=$cache_clear")

start=$(date +%s)
start_fmt=$(date '+%Y-%m-%d %r')
echo "STARTING TIMING RUN AT $start_fmt"
echo "running: ${cmd[*]}"
code=0
"${cmd[@]}" || code=$?
end=$(date +%s)
echo "ENDING TIMING RUN AT $(date '+%Y-%m-%d %r')"
if [ "$code" -ne 0 ]; then
  echo "the run failed (exit code $code); its output_dir is $output_dir" >&2
  exit "$code"
fi
exec "$python" "$repo/tools/time_to_train.py" "$output_dir/mlperf.log" --wall-s "$((end - start))" --started "$start_fmt"
