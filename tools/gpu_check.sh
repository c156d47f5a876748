#!/usr/bin/env bash
# The prepared GPU check: one script, well under 10 minutes on one H200, no network, no DALI.
#
#   tools/gpu_check.sh OUT_DIR [WHEELS_DIR]
#
# Needs torch, torchvision, numpy, pyyaml, tqdm, pillow and pytest; pycocotools, webdataset
# (with braceexpand) and mlperf-logging may arrive as wheels in WHEELS_DIR, installed into a
# private folder. Runs from the repository root without installing the project. It:
#   1. runs `pytest -m gpu` (graphs vs eager, no host sync in the step, AMP losses, fused SGD,
#      device mask targets, CUDA JPEG decode);
#   2. runs the model dry run at the reference resolution for fp32, AMP (bf16), AMP + CUDA graphs;
#   3. shards a synthetic full-size set and runs the full dry run with the torch fallback loader;
# and writes every figure and the environment to OUT_DIR/gpu_check.json (logs beside it).
set -euo pipefail

out=${1:?usage: tools/gpu_check.sh OUT_DIR [WHEELS_DIR]}
wheels=${2:-}
python=${PYTHON:-python3}
iters=${GPU_CHECK_ITERS:-20}
cd "$(dirname "$0")/.."
mkdir -p "$out"

if [ -n "$wheels" ]; then
  site=$(mktemp -d)
  "$python" -m pip install -q --no-index --no-deps --no-compile --target "$site" "$wheels"/*.whl
  export PYTHONPATH="$site"
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

"$python" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 'tools/gpu_check.sh needs a CUDA GPU; run it on a GPU machine')"

step() { echo; echo "== $*"; }

step "environment"
"$python" - "$out/environment.json" <<'EOF'
import json, subprocess, sys, torch, torchvision
driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                        capture_output=True, text=True).stdout.strip()
env = {"gpu": torch.cuda.get_device_name(0), "driver": driver, "torch": torch.__version__,
       "torchvision": torchvision.__version__, "cuda": torch.version.cuda,
       "cudnn": torch.backends.cudnn.version()}
json.dump(env, open(sys.argv[1], "w"), indent=2)
print(env)
EOF

step "pytest -m gpu"
tests_rc=0
"$python" -m pytest -q -m gpu -p no:cacheprovider tests 2>&1 | tee "$out/gpu_tests.log" || tests_rc=$?

step "model dry runs at the reference resolution"
run_model() {  # name precision graphs
  "$python" train/main.py --config configs/reference.yaml --dry-run model --iters "$iters" \
    --report "$out/model_$1.json" train.precision="$2" train.cuda_graphs="$3" 2>&1 | tee "$out/model_$1.log"
}
run_model fp32 fp32 false
run_model amp bf16 false
run_model amp_graphs bf16 true

step "full dry run on synthetic shards, torch fallback loader"
data=$(mktemp -d)
"$python" tools/make_synthetic_coco.py --out "$data/coco" --split train --num-images 256 --seed 0
"$python" tools/shard_coco.py --images "$data/coco/train2017" --annotations "$data/coco/instances_train.json" \
  --out "$data/shards" --mode train --samples-per-shard 64 --workers 8
"$python" train/main.py --config configs/reference.yaml --data "$data/shards" --dry-run full --iters "$iters" \
  --report "$out/full_torch.json" data.backend=torch 2>&1 | tee "$out/full_torch.log"

step "summary"
"$python" - "$out" "$tests_rc" <<'EOF'
import json, pathlib, sys
out, tests_rc = pathlib.Path(sys.argv[1]), int(sys.argv[2])
summary = {"environment": json.loads((out / "environment.json").read_text()), "gpu_tests_exit_code": tests_rc}
for name in ["model_fp32", "model_amp", "model_amp_graphs", "full_torch"]:
    report = json.loads((out / f"{name}.json").read_text())
    summary[name] = report
    figure = next(v for v in report.values() if isinstance(v, dict) and "images_per_s" in v)
    print(f"{name:18s} {figure['images_per_s']:9.1f} images/s")
(out / "gpu_check.json").write_text(json.dumps(summary, indent=2))
print(f"written {out / 'gpu_check.json'}")
EOF
exit "$tests_rc"
