#!/usr/bin/env bash
# Issue #18 items 2-3 on a GPU, in one device call (about 4-5 minutes of GPU time):
#   1. start-up with an EMPTY Triton cache (kernel warm-up on), then four bursts of the workload
#      (bench/probe_steps.py: 512 requests, 32 groups x 2048-token prefix, +128 new, 128 out,
#      Llama-3-8B shape, dummy weights) on one engine: the first burst after start-up (overlap
#      off), then warm bursts with overlap_outputs on, off, on; per-step timings by kind;
#   2. the GPU tests of what this changed: warm-up coverage (no kernel variant met while serving
#      after it, same tokens as without it), CUDA graphs, the Triton attention kernels;
#   3. a restart over the now WARM Triton cache: start-up time and its first burst (128 requests);
#   4. the 8B speed table of bench/bench_gpu.py (cold prefill, cached TTFT, decode b1/b32);
#   5. kernel warm-up OFF over another empty cache: the variants the first burst meets (64 requests).
#
#   device:  bash bench/device_warmup.sh          (results in $OUT, default /tmp/warmup)
#            bash bench/device_warmup.sh --restart-only   (~2 min: start-up over an empty, then a
#            warm Triton cache, the warm start's first burst, and the speed table)
# Results: $OUT/{cold,restart,no-warmup}.json, $OUT/speed/bench_gpu.json, $OUT/warmup.log.
set -uo pipefail
OUT=${OUT:-/tmp/warmup}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CACHES=$(mktemp -d /tmp/triton-caches.XXXXXX)
if [ "${1:-}" = "--restart-only" ]; then
  {
    nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
    lscpu | grep 'Model name'
    date -u
    echo "== start-up over an empty Triton cache (no burst)"
    timeout 120 python3 bench/probe_steps.py --triton-cache-dir "$CACHES/a" --bursts 0 --json "$OUT/startup-empty.json"
    echo "== restart over the warm Triton cache, its first burst"
    timeout 90 python3 bench/probe_steps.py --triton-cache-dir "$CACHES/a" --bursts 1 --requests 128 --groups 8 \
      --json "$OUT/restart.json"
    echo "== the 8B speed table"
    mkdir -p "$OUT/speed"
    TRITON_CACHE_DIR="$CACHES/a" timeout 150 python3 bench/bench_gpu.py --skip logits,identical,hf,serving \
      --repeats 5 --out "$OUT/speed"
    date -u
  } 2>&1 | tee "$OUT/restart.log"
  rm -rf "$CACHES"
  exit 0
fi
{
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  lscpu | grep 'Model name'
  date -u
  echo "== 1. empty Triton cache, warm-up on: start-up, first burst, warm bursts (overlap off/on)"
  timeout 220 python3 bench/probe_steps.py --triton-cache-dir "$CACHES/a" --bursts 4 --overlap off,on,off,on \
    --json "$OUT/cold.json"
  echo "== 2. GPU tests"
  TRITON_CACHE_DIR="$CACHES/t" timeout 150 python3 -m pytest -q -p no:cacheprovider tests/engine/test_warmup_cuda.py \
    tests/engine/test_cuda_graphs.py tests/model/test_triton_attention.py
  echo "== 3. restart over the warm Triton cache"
  timeout 90 python3 bench/probe_steps.py --triton-cache-dir "$CACHES/a" --bursts 1 --requests 128 --groups 8 \
    --json "$OUT/restart.json"
  echo "== 4. the 8B speed table"
  mkdir -p "$OUT/speed"
  TRITON_CACHE_DIR="$CACHES/a" timeout 150 python3 bench/bench_gpu.py --skip logits,identical,hf,serving --repeats 5 \
    --out "$OUT/speed"
  echo "== 5. empty Triton cache, warm-up off"
  timeout 80 python3 bench/probe_steps.py --triton-cache-dir "$CACHES/b" --no-kernel-warmup --bursts 1 \
    --requests 64 --groups 4 --json "$OUT/no-warmup.json"
  date -u
} 2>&1 | tee "$OUT/warmup.log"
rm -rf "$CACHES"
