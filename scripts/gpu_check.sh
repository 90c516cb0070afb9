#!/usr/bin/env bash
# On the GPU machine, in one call: build the CUDA extension, run the CUDA tests, run the benchmarks.
# Logs and tables go under $OUT (the device tool's folder; ./out elsewhere). Expects the package
# installed (`pip install --no-deps --no-build-isolation -e .`) and bitsandbytes for the baseline.
#   bash scripts/gpu_check.sh [--no-bench] [--quick]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
BENCH=1 QUICK=""
for arg in "$@"; do
  case "$arg" in
    --no-bench) BENCH=0 ;;
    --quick) QUICK="--quick" ;;
  esac
done

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/device.txt"
python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)" | tee -a "$OUT/device.txt"

start=$(date +%s)
if ! python native/ffi/build_cuda.py > "$OUT/build.log" 2>&1; then
  tail -40 "$OUT/build.log"
  echo "CUDA build FAILED"
  exit 1
fi
echo "CUDA extension built in $(( $(date +%s) - start )) s"

python -m pytest -q -p no:cacheprovider -m "not slow" tests/test_cuda_kernels.py tests/test_cuda_build.py 2>&1 | tee "$OUT/tests.log"
tests_rc=${PIPESTATUS[0]}
echo "CUDA tests exit status: $tests_rc"

if [ "$BENCH" = 1 ]; then
  python scripts/bench_cuda.py --out "$OUT" $QUICK 2>&1 | tee "$OUT/bench.log"
fi
exit "$tests_rc"
