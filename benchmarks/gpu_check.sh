#!/usr/bin/env bash
# Every GPU check in one go: CUDA tests, then the GPU benchmark. Results go to $1 (or $OUT).
# Usage, on a machine with a CUDA GPU, from the repository root:  bash benchmarks/gpu_check.sh out/
# FULL=1 also runs the torch.compile test on CUDA, last (slow: compiles twice).
# Time limits (s): TEST_TIMEOUT, BENCH_TIMEOUT, COMPILE_TIMEOUT; BENCH_ARGS go to bench_gpu.py.
set -uo pipefail
out=${1:-${OUT:-gpu-results}}
mkdir -p "$out"
export PYTHONPATH="$PWD/src:$PWD/tests:${PYTHONPATH:-}" PYTHONUNBUFFERED=1
unset TRITON_INTERPRET
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu.txt"
python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" \
  | tee -a "$out/gpu.txt"
status=0
timeout "${TEST_TIMEOUT:-300}" python3 -m pytest -q -ra -p no:cacheprovider -m cuda \
  tests/test_cuda.py tests/test_cuda_signals.py tests/test_triton_kernel.py 2>&1 \
  | tee "$out/cuda-tests.txt" || status=1
timeout "${BENCH_TIMEOUT:-240}" python3 benchmarks/bench_gpu.py ${BENCH_ARGS:-} \
  --json "$out/bench_gpu.json" 2>&1 | tee "$out/bench_gpu.txt" || status=1
if [ "${FULL:-0}" = 1 ]; then
  timeout "${COMPILE_TIMEOUT:-300}" python3 -m pytest -q -p no:cacheprovider tests/test_compile.py -k cuda 2>&1 \
    | tee -a "$out/cuda-tests.txt" || status=1
fi
exit $status
