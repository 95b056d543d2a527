#!/usr/bin/env bash
# A/B of the GPU speed table (cold prefill 4096, cached TTFT 4032+64, decode batch 1 and 32) between
# a baseline tree and this working tree, interleaved in one device call (A B, the GPU tests, B A: each side runs once early and once late), so both sides see
# the same machine. Then the GPU tests of this tree.
#
#   here:    mkdir -p .baseline && git archive REV radixserve bench | tar -x -C .baseline
#            mkdir -p .baseline/docs && cp docs/benchmarks.md .baseline/docs/   (.baseline is git-ignored)
#   device:  run(command="bash bench/device_ab.sh", carry=[".baseline"])
# Results: $OUT/{after,before}-{1,2}.json and $OUT/ab.log; summarise with bench/ab_summary.py.
set -uo pipefail
OUT=${OUT:-/tmp/ab}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
speed() {  # $1: tree, $2: label
  local dir; dir=$(mktemp -d)
  (cd "$1" && timeout 170 python3 bench/bench_gpu.py --skip logits,identical,hf,serving --repeats 5 --out "$dir") \
    && cp "$dir/bench_gpu.json" "$OUT/$2.json"
}
{
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
  speed .baseline before-1; speed . after-1
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/engine/test_cuda_graphs.py tests/model/test_triton_attention.py
  speed . after-2; speed .baseline before-2
} 2>&1 | tee "$OUT/ab.log"
