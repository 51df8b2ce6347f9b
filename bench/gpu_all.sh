#!/usr/bin/env bash
# Every GPU measurement BENCHMARKS.md still lacks, in one go, each stage with its own time limit.
#
#   bench/gpu_all.sh RESULTS.md                      # all stages
#   bench/gpu_all.sh RESULTS.md tests models mrlf    # some stages, in this order
#
# Stages:
#   tests     the CUDA-only tests (compiled Triton kernels, bf16, CUDA graphs, fused layers)
#   models    ours vs diffusers/transformers, fp16, 64x64 latents, eager and as CUDA graphs (needs diffusers)
#   mrlf      MRLF at the dataset settings (full SD-1.5 + ControlNet, 81 views, 20 steps), eager and graphed
#   steps     U-Net and ControlNet+U-Net steps per attention / fused-kernel configuration, eager and graphed
#   training  bench/training.py: the three training scripts' throughput and peak memory, segmentation inference
#   diff      bench/diff.py: DIFF on SD-1.5 sizes, feature extraction and IPKL training
# Tables are appended to RESULTS.md; a stage that fails or runs out of time is reported and the next one runs.
set -u
out=${1:?usage: bench/gpu_all.sh RESULTS.md [stage ...]}
shift
stages=${*:-tests models mrlf steps training diff}
cd "$(dirname "$0")/.."
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"

run() {  # run LIMIT_SECONDS STAGE COMMAND...
  local limit=$1 stage=$2
  shift 2
  echo "=== $stage: $*"
  local t0=$SECONDS
  timeout "$limit" "$@"
  local rc=$?
  echo "=== $stage: exit $rc after $((SECONDS - t0)) s"
  [ $rc -eq 0 ] || echo "- $stage stage: \`$*\` exited $rc" >>"$out.failures"
}

for stage in $stages; do
  case $stage in
    tests) run 300 tests env -u TRITON_INTERPRET python3 -m pytest -q -m cuda tests ;;
    models) run 300 models python3 bench/models.py --device cuda --dtype fp16 --latent 64 --write "$out" ;;
    mrlf) run 420 mrlf python3 bench/mrlf_views.py --preset sd15 --device cuda --dtype fp16 --size 512 --stride 8 \
            --steps 20 --view-batch 16 --write "$out" ;;
    steps) run 300 steps python3 bench/kernels.py --skip attention groupnorm geglu --write "$out" ;;
    training) run 420 training python3 bench/training.py --device cuda --dtype bf16 --write "$out" ;;
    diff) run 300 diff python3 bench/diff.py --preset sd15 --device cuda --dtype bf16 --write "$out" ;;
    *) echo "unknown stage $stage (tests models mrlf steps training diff)"; exit 2 ;;
  esac
done
