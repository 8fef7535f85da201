#!/usr/bin/env bash
# Run ON THE DEVICE MACHINE (see prepare.sh): installs the carried wheels, then runs one
# prepared measurement from outside the repository root (from the root, the source folder
# ptychostream/ would shadow the installed package) and packs its results into $OUT.
#   base    the base-model recipe (train_base_model.py): ~8 min on one H100/H200
#   checks  inference, refinement, pipeline and HPC benchmarks: ~8 min
#   rehearse  both at toy size on the CPU, to try this script where no GPU is (python3 on PATH
#             standing in for the image's: torch, torchvision, h5py, scipy, scikit-image,
#             matplotlib, onnx, onnxruntime), so a GPU session's one call does not fail on a typo
set -uo pipefail
mode=${1:?usage: run.sh base|checks}
repo=$(cd "$(dirname "$0")/../.." && pwd)
out=${OUT:-/tmp/gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$repo"/.whl/*.whl || exit 1
export PYTHONPATH=/tmp/site
. "$repo/shared/epics-loopback.env" 2>/dev/null || {
  export EPICS_PVA_AUTO_ADDR_LIST=NO EPICS_PVA_ADDR_LIST=127.0.0.1 \
    EPICS_PVAS_INTF_ADDR_LIST=127.0.0.1 EPICS_PVAS_AUTO_BEACON_ADDR_LIST=NO \
    EPICS_PVAS_BEACON_ADDR_LIST=127.0.0.1 EPICS_CA_AUTO_ADDR_LIST=NO \
    EPICS_CA_ADDR_LIST=127.0.0.1 EPICS_CAS_INTF_ADDR_LIST=127.0.0.1 \
    EPICS_CAS_AUTO_BEACON_ADDR_LIST=NO EPICS_CAS_BEACON_ADDR_LIST=127.0.0.1; }
work=/tmp/gpu-work && rm -rf "$work" && mkdir -p "$work" && cd "$work"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 | tee "$work/gpu.txt"
b=$repo/benchmarks
step() {  # step NAME SECONDS COMMAND...: one measurement, its log kept, never the whole run
  local name=$1 secs=$2; shift 2
  echo "== $name (at most ${secs}s)"
  timeout "$secs" "$@" > "$work/$name.log" 2>&1; echo "== $name: exit $?" | tee -a "$work/$name.log"
  tail -25 "$work/$name.log"
}
case $mode in
  base)
    step base 510 python3 "$b/train_base_model.py" --out "$work/base" ;;
  checks)
    step inference 90 python3 "$b/bench_inference.py" --seconds 1 --json "$work/inference.json"
    step refine 60 python3 "$b/bench_refine.py" --device cuda --batches 1 2 8 32 128 \
        --json "$work/refine.json"
    step pipeline 200 python3 "$b/bench_pipeline.py" --engine torch --device cuda --frames 4000 \
        --batch-size 64 --rates 1000,2000,5000,10000,20000,0 --workers 1,2 --out "$work/pipeline"
    step hpc 150 python3 "$b/bench_hpc.py" --device cuda --threads 8 --positions 963 \
        --step-nm 50 --iterations 500 --concurrent 2 --step-batches 256 1024 --steps 20 \
        --train-pairs 20000 --train-epochs 5 --train-batch 1024 --out "$work/hpc" ;;
  rehearse)
    step base 600 python3 "$b/train_base_model.py" --quick --device cpu --out "$work/base"
    step inference 90 python3 "$b/bench_inference.py" --seconds 0.2 --batches 1 8 \
        --json "$work/inference.json"
    step refine 60 python3 "$b/bench_refine.py" --device cpu --batches 2 8 --positions 60 \
        --json "$work/refine.json"
    step pipeline 300 python3 "$b/bench_pipeline.py" --engine torch --device cpu --frames 100 \
        --batch-size 8 --rates 50,0 --workers 1 --repeats 1 --out "$work/pipeline"
    step hpc 300 python3 "$b/bench_hpc.py" --device cpu --threads 2 --positions 40 \
        --step-nm 100 --iterations 2 --concurrent 2 --step-batches 8 --steps 2 \
        --train-pairs 64 --train-epochs 1 --train-batch 16 --out "$work/hpc" ;;
  *) echo "unknown mode $mode"; exit 2 ;;
esac
# what comes back: at most 16 MiB a file, so no data that can be made again (scans, corpora,
# copies of the model), and if it is still too big, the figures and logs alone
tar -czf "$out/gpu-$mode.tar.gz" -C "$work" --exclude='*.h5' --exclude=corpus --exclude=init.pt \
    --exclude='./base/train/model.*' --exclude='model-baseline.onnx' --exclude='./pipeline/model.pt' .
if [ "$(stat -c %s "$out/gpu-$mode.tar.gz")" -gt $((15 * 1024 * 1024)) ]; then
  echo "gpu-$mode.tar.gz over 15 MiB: packing figures and logs alone"
  (cd "$work" && find . -name '*.json' -o -name '*.jsonl' -o -name '*.txt' -o -name '*.log' \
     -o -name '*.png' | tar -czf "$out/gpu-$mode.tar.gz" -T -)
  tar -czf "$out/gpu-$mode-base-model.tar.gz" -C "$work" --exclude='./base/train' \
      --exclude=corpus --exclude=init.pt --exclude='*.h5' ./base 2>/dev/null || true
fi
ls -la "$out"
