#!/usr/bin/env bash
# One command for the GPU checks: strongly typed TensorRT fp32/fp16 engines vs ONNX Runtime parity, verdicts on
# the bottle test set (when ../shared/data/mvtec/bottle is present) and latency at batch 1 and tiles per frame,
# printed as one table. The fp16 engine is built from the bundle's mixed-precision graph (written when missing).
#
#   benchmarks/gpu_check.sh [BUNDLE] [extra gpu_check.py options, e.g. --tiles 12 --precisions fp16]
#
# Without BUNDLE a bundle is fitted on DATA/train/good (needs torch; --kind patchcore for the memory-bank kind).
# DATA defaults to the bottle set. Runs on TensorRT 10.3+ and 11.
# Exit status: 0 all within limits, 1 a parity limit broken, 2 TensorRT/GPU unusable here.
set -euo pipefail
cd "$(dirname "$0")/.."

args=()
if [[ $# -ge 1 && "$1" != -* ]]; then
    args+=(--bundle "$1")
    shift
fi
DATA="${DATA:-../shared/data/mvtec/bottle}"
args+=(--data "$DATA")

if command -v nvidia-smi >/dev/null 2>&1; then
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm --format=csv,noheader || true
fi
python -c "import tensorrt as t; print('TensorRT', t.__version__)" 2>/dev/null || echo "TensorRT: not importable"

exec python benchmarks/gpu_check.py "${args[@]}" "$@"
