#!/usr/bin/env bash
# A/B of the attention kernels between a baseline tree and this working tree in one device call
# (about 5 minutes of GPU), then the GPU tests of this tree's attention and warm-up paths:
#   1. bench/bench_deterministic_sweep.py --skip matmul (default and deterministic launches of
#      one Llama-3-8B layer: fresh prefill 4096, 64 new over 4032 cached, decode b1 / b32, eager
#      and as a CUDA graph launches them), baseline then this tree;
#   2. bench/bench_cascade_gpu.py --skip speed (the cascade prefix kernel vs plain decode), both;
#   3. tests: the Triton attention, cascade, batch-invariant, deterministic, warm-up and CUDA-graph
#      tests of this tree;
#   4. bench/probe_sdpa_first_call.py: the first SDPA call at a new length vs warm ones.
#
#   here:    rm -rf .baseline && mkdir -p .baseline/docs && git archive REV radixserve bench | tar -x -C .baseline
#            cp docs/benchmarks.md .baseline/docs/   (bench_cascade_gpu.py writes its section there)
#   device:  run(command="mkdir -p .whl && cp .devwhl/*.whl .whl/ && bash bench/device_ab_attention.sh",
#                carry=[".baseline", ".devwhl"])
# Results: $OUT/ab_attention.log, $OUT/{before,after}-sweep.log, $OUT/{before,after}-cascade.log, $OUT/tests.log
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/ab_attention}
mkdir -p "$OUT"
source bench/device_env.sh
start=$(date +%s)
stamp() { echo "[device_ab_attention] $1 at +$(( $(date +%s) - start )) s"; }
side() {  # $1: tree, $2: label
  (cd "$1" && PYTHONPATH="/tmp/site:$PWD" timeout 120 python3 bench/bench_deterministic_sweep.py --skip matmul \
    > "$OUT/$2-sweep.log" 2>&1)
  grep -A12 '^Attention, one 8B layer' "$OUT/$2-sweep.log" || tail -20 "$OUT/$2-sweep.log"
  (cd "$1" && PYTHONPATH="/tmp/site:$PWD" timeout 90 python3 bench/bench_cascade_gpu.py --skip speed \
    > "$OUT/$2-cascade.log" 2>&1)
  grep -E '^\|' "$OUT/$2-cascade.log" | head -20 || tail -20 "$OUT/$2-cascade.log"
}
{
  device_header
  stamp "1-2. baseline kernels"; side .baseline before
  stamp "1-2. this tree's kernels"; side . after
  stamp "3. GPU tests"
  timeout "${TESTS_TIMEOUT:-240}" python3 -m pytest -q -p no:cacheprovider tests/model/test_triton_attention.py \
    tests/model/test_cascade_attention.py tests/model/test_batch_invariant.py tests/engine/test_deterministic_gpu.py \
    tests/engine/test_warmup_cuda.py tests/engine/test_cuda_graphs.py > "$OUT/tests.log" 2>&1
  grep -E 'passed|failed|error|FAIL' "$OUT/tests.log" | tail -15
  stamp "4. SDPA first calls"
  timeout 60 python3 bench/probe_sdpa_first_call.py
  stamp "done"
} 2>&1 | tee "$OUT/ab_attention.log"
