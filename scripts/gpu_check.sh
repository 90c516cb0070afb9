#!/usr/bin/env bash
# On the GPU machine, in one call: build the CUDA extension, run every CUDA test, check and time
# `qckpt convert --device cuda` against `--device cpu`, run the kernel and optimizer benchmarks.
# Logs and tables go under $OUT (the device tool's folder; ./out elsewhere), at most 8 files:
#   device.txt build.log tests.log convert_bench.log convert_bench.md bench_cuda.log bench_cuda.md details.tar.gz
# Expects the package importable from this checkout (`python -m pip install --no-deps --no-build-isolation -e .`)
# and bitsandbytes for the baseline. Each stage has its own time limit and the script keeps a total
# budget (GPU_CHECK_BUDGET_S, default 330 s): a stage that would not fit is skipped and says so.
# GPU_CHECK_CONVERT_ARGS adds arguments to bench_convert_cuda.py (e.g. --tiny for a smoke run).
#   bash scripts/gpu_check.sh [--no-bench] [--no-convert] [--no-optim] [--quick] [--convert-gb N]
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT="${OUT:-out}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY="${PYTHON:-python}"
BENCH=1 CONVERT=1 OPTIM=1 QUICK="" CONVERT_GB=6
BUDGET="${GPU_CHECK_BUDGET_S:-330}"
while [ $# -gt 0 ]; do
  case "$1" in
    --no-bench) BENCH=0 ;;
    --no-convert) CONVERT=0 ;;
    --no-optim) OPTIM=0 ;;
    --quick) QUICK="--quick" ;;
    --convert-gb) CONVERT_GB="$2"; shift ;;
  esac
  shift
done
T0=$(date +%s)
elapsed() { echo $(( $(date +%s) - T0 )); }
# run_stage NAME LIMIT_S NEED_S CMD...: run CMD under `timeout LIMIT_S` if NEED_S more seconds fit the budget
run_stage() {
  local name="$1" limit="$2" need="$3"; shift 3
  local left=$(( BUDGET - $(elapsed) ))
  if [ "$left" -lt "$need" ]; then
    echo "== $name SKIPPED: ${left} s of the ${BUDGET} s budget left, needs ~${need} s"; return 99
  fi
  [ "$limit" -gt "$left" ] && limit="$left"
  echo "== $name (limit ${limit} s, at $(elapsed) s)"
  timeout --kill-after=5 "$limit" "$@"
  local rc=$?
  [ "$rc" = 124 ] && echo "== $name TIMED OUT after ${limit} s"
  echo "== $name exit status $rc (at $(elapsed) s)"
  return "$rc"
}

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv | tee "$OUT/device.txt"
"$PY" -c "import torch, os; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cpus', os.cpu_count())" | tee -a "$OUT/device.txt"
date -u '+%Y-%m-%d %H:%M UTC' | tee -a "$OUT/device.txt"

# build for the card in this machine only (a quarter of the compile time; CI's --check covers the others)
ARCH=$("$PY" -c "import torch; a, b = torch.cuda.get_device_capability(); print(f'{a}{b}')" 2>/dev/null || echo 90)
export QCKPT_CUDA_ARCHES="$ARCH"
if ! run_stage "build (sm_$ARCH)" 200 30 "$PY" native/ffi/build_cuda.py > "$OUT/build.log" 2>&1; then
  cat "$OUT/build.log" | tail -40
  echo "CUDA build FAILED"
  exit 1
fi
tail -2 "$OUT/build.log"

# every test file that uses the GPU: the CUDA kernels, the build, the runtime, convert --device cuda
TESTS=$(ls tests/test_cuda_*.py; grep -l "mark.cuda" tests/test_*.py)
TESTS=$(printf '%s\n' $TESTS | sort -u | tr '\n' ' ')
run_stage "CUDA tests: $TESTS" 170 40 "$PY" -m pytest -q -p no:cacheprovider -m "not slow" -rs $TESTS > "$OUT/tests.log" 2>&1
tests_rc=$?
tail -25 "$OUT/tests.log"

# convert --device cuda vs cpu: byte check + timing on a Llama-7B-shaped checkpoint subset, with ceilings
convert_rc=0
if [ "$CONVERT" = 1 ]; then
  run_stage "convert benchmark (${CONVERT_GB} GB)" 150 60 "$PY" scripts/bench_convert_cuda.py --size-gb "$CONVERT_GB" \
    --work /tmp/qc7b --out /tmp/qc7b_out ${GPU_CHECK_CONVERT_ARGS:-} > "$OUT/convert_bench.log" 2>&1
  convert_rc=$?
  tail -20 "$OUT/convert_bench.log"
fi
cp /tmp/qc7b_out/convert_bench.md "$OUT/" 2>/dev/null
rm -rf /tmp/qc7b

if [ "$BENCH" = 1 ]; then
  run_stage "kernel benchmark" 150 45 "$PY" scripts/bench_cuda.py --out /tmp/bench_cuda $QUICK > "$OUT/bench_cuda.log" 2>&1
  tail -30 "$OUT/bench_cuda.log"
  cp /tmp/bench_cuda/bench_cuda.md "$OUT/" 2>/dev/null
  mkdir -p /tmp/bench_optim
  if [ "$OPTIM" = 1 ]; then
    run_stage "optimizer benchmark" 90 30 "$PY" scripts/bench_optim.py --device cuda --out /tmp/bench_optim \
      > /tmp/bench_optim/bench_optim.log 2>&1
    tail -14 /tmp/bench_optim/bench_optim.log
  fi
fi
tar -czf "$OUT/details.tar.gz" -C /tmp $(cd /tmp && ls -d bench_cuda bench_optim qc7b_out 2>/dev/null) 2>/dev/null
echo "gpu_check done in $(elapsed) s: tests exit $tests_rc, convert check exit $convert_rc"
[ "$tests_rc" = 0 ] && [ "$convert_rc" = 0 ]
