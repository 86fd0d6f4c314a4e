#!/usr/bin/env bash
# The one prepared GPU run (issue 16). Usage:
#   bash benchmarks/gpu_check.sh [--out DIR] [--cpu] [-- ARGS for gpu_check.py, e.g. --sections reduce failures]
# On a GPU machine: the CUDA tests (pytest -m cuda), then every section of benchmarks/gpu_check.py (writer race
# stress, recorded training against device snapshots, async vs sync, CPU vs GPU encoders, device vs CPU reduce,
# failure paths, set_sync_debug_mode("error"), TORCH_CUDA_SANITIZER / CUDA_LAUNCH_BLOCKING runs, one-GPU DDP,
# ResNet-18 performance and a profiler trace). Under 8 minutes on one H100; JSON + PNG under DIR.
# --cpu: every check that can run without a GPU (under 3 minutes on 2 cores), as CI runs it.
#
# Machines without zarr/numcodecs (the lent GPU machines cannot reach a package index): carry wheels with the tree.
# Once, on a machine with network access and the same Python version and platform as the GPU machine:
#   pip download zarr numcodecs crc32c safetensors donfig numpy-typing-compat typing_extensions packaging \
#       --only-binary=:all: -d wheels/
# then carry wheels/ to the machine (or point DELTASTORE_WHEELS at a folder holding them); this script installs
# from there with --no-index whatever is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=bench-out/gpu-check
DEVICE=cuda
EXTRA=()
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --cpu) DEVICE=cpu; shift ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) sed -n 2,16p "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (use --out DIR and/or --cpu)" >&2; exit 2 ;;
  esac
done
mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export CUBLAS_WORKSPACE_CONFIG="${CUBLAS_WORKSPACE_CONFIG:-:4096:8}"

if ! python3 -c "import zarr, numcodecs, crc32c, safetensors" 2>/dev/null; then
  WHEELS="${DELTASTORE_WHEELS:-$PWD/wheels}"
  if [ ! -d "$WHEELS" ]; then
    echo "gpu_check.sh: zarr/numcodecs/crc32c/safetensors are missing and there is no wheel folder $WHEELS;" \
         "see the comment at the top of this script (pip download ... -d wheels/)" >&2
    exit 2
  fi
  python3 -m pip install -q --no-index --find-links "$WHEELS" zarr numcodecs crc32c safetensors
fi

if [ "$DEVICE" = cuda ]; then
  if ! python3 -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
    echo "gpu_check.sh: no CUDA device here; run with --cpu" >&2
    exit 2
  fi
  set +e
  timeout 240 python3 -m pytest -q -m cuda -p no:cacheprovider tests > "$OUT/pytest-cuda.txt" 2>&1
  echo "{\"exit_status\": $?}" > "$OUT/pytest-cuda.json"
  set -e
  tail -3 "$OUT/pytest-cuda.txt"
fi
set +e
python3 benchmarks/gpu_check.py --device "$DEVICE" --out "$OUT" "${EXTRA[@]}"
status=$?
set -e
if [ "$DEVICE" = cuda ] && ! grep -q '"exit_status": 0' "$OUT/pytest-cuda.json"; then
  echo "the CUDA tests failed: see $OUT/pytest-cuda.txt" >&2
  exit 1
fi
exit $status
