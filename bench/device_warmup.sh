#!/usr/bin/env bash
# Issue #18 items 2-3 on a GPU, in one device call (about 4 minutes of GPU time):
#   1. start-up with an EMPTY Triton cache (kernel warm-up on), then five bursts of the workload
#      (bench/probe_steps.py: 512 requests, 32 groups x 2048-token prefix, +128 new, 128 out,
#      Llama-3-8B shape, dummy weights) on one engine: the first burst after start-up (overlap
#      off), then warm bursts with overlap_outputs off, on, off, on; per-step timings by kind;
#   2. a restart over the now WARM Triton cache: start-up time and its first burst (128 requests);
#   3. kernel warm-up OFF over another empty cache: what the first burst pays without it (128);
#   4. the 8B speed table of bench/bench_gpu.py (cold prefill, cached TTFT, decode b1/b32).
#
#   device:  bash bench/device_warmup.sh          (results in $OUT, default /tmp/warmup)
# Results: $OUT/{cold,restart,no-warmup}.json, $OUT/speed/bench_gpu.json, $OUT/warmup.log.
set -uo pipefail
OUT=${OUT:-/tmp/warmup}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
CACHES=$(mktemp -d /tmp/triton-caches.XXXXXX)
{
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  lscpu | grep 'Model name'
  date -u
  echo "== 1. empty Triton cache, warm-up on: start-up, first burst, warm burst"
  timeout 200 python3 bench/probe_steps.py --triton-cache-dir "$CACHES/a" --bursts 5 --overlap off,off,on,off,on \
    --json "$OUT/cold.json"
  echo "== 2. restart over the warm Triton cache"
  timeout 90 python3 bench/probe_steps.py --triton-cache-dir "$CACHES/a" --bursts 1 --requests 128 --groups 8 \
    --json "$OUT/restart.json"
  echo "== 3. empty Triton cache, warm-up off"
  timeout 100 python3 bench/probe_steps.py --triton-cache-dir "$CACHES/b" --no-kernel-warmup --bursts 1 \
    --requests 128 --groups 8 --json "$OUT/no-warmup.json"
  echo "== 4. the 8B speed table"
  mkdir -p "$OUT/speed"
  timeout 170 python3 bench/bench_gpu.py --skip logits,identical,hf,serving --repeats 5 --out "$OUT/speed"
  date -u
} 2>&1 | tee "$OUT/warmup.log"
rm -rf "$CACHES"
