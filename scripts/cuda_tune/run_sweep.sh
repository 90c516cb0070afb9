#!/usr/bin/env bash
# Build and run the 4-bit matmul tuning harness (gemm4_sweep.cu) for the GPU in this machine; the table
# goes to $OUT/gemm4_sweep.txt (./out elsewhere). Usage: bash scripts/cuda_tune/run_sweep.sh [--quick | --decode | --wide | --wide-b1 | --wgmma | --tma | --tma-quick | --b128 | --expand | --lut | --profile | --profile-tma]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
PY="${PYTHON:-python}"
ARCH=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')" 2>/dev/null || echo 90)
GENCODE="-gencode=arch=compute_$ARCH,code=sm_$ARCH"
[ "$ARCH" = 90 ] && GENCODE="-gencode=arch=compute_90a,code=sm_90a"  # wgmma needs the sm_90a target
nvcc -O3 -std=c++17 -fmad=false $GENCODE -I native/include -I native/cuda \
  scripts/cuda_tune/gemm4_sweep.cu native/cuda/error.cu -o /tmp/gemm4_sweep
/tmp/gemm4_sweep "$@" | tee "$OUT/gemm4_sweep.txt"
