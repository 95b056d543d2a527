#!/usr/bin/env bash
# Cascade attention (shared-prefix decode) on the GPU, in one device call (~4-5 minutes of GPU):
#   1. the GPU tests: tests/model/test_cascade_attention.py (cascade == plain == torch on paged KV),
#      tests/model/test_triton_attention.py, tests/engine/test_cuda_graphs.py (cascade on vs off:
#      same greedy tokens through the decode graphs and eager mixed steps);
#   2. bench/bench_cascade_gpu.py --skip speed: one layer's decode attention, plain vs cascade
#      (128 rows in 8 x 16 / 32 x 4 groups over 2048-token prefixes, nothing shared, 32 rows);
#   3. the issue #18 workload (bench/probe_steps.py: 512 requests, 32 groups x 2048-token prefix,
#      +128 new, 128 out, Llama-3-8B shape) with cascade attention off, then on, over the same
#      weights in one process: 3 bursts each (the issue's shuffled arrivals: ~32 groups x 4 running;
#      grouped arrivals: ~8 groups x 16; shuffled again, warm), req/s and step times by kind;
#   4. bench/bench_cascade_gpu.py --skip kernels: the 8B speed table with cascade on, then off.
#
#   device:  bash bench/device_cascade.sh      (results in $OUT, default /tmp/cascade)
# Results: $OUT/cascade.log, $OUT/tests.log, $OUT/probe-cascade_{off,on}.json, $OUT/bench_cascade_gpu.json,
# $OUT/speed/benchmarks.md (the gpu-cascade section, kernels and speed table).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/cascade}
mkdir -p "$OUT"
source bench/device_env.sh
CACHES=$(mktemp -d /tmp/triton-caches.XXXXXX)
export TRITON_CACHE_DIR="$CACHES/a"
start=$(date +%s)
stamp() { echo "[device_cascade] $1 at +$(( $(date +%s) - start )) s"; }
{
  device_header
  stamp "1. GPU tests"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/model/test_cascade_attention.py \
    tests/model/test_triton_attention.py tests/engine/test_cuda_graphs.py > "$OUT/tests.log" 2>&1
  tail -15 "$OUT/tests.log"
  stamp "2. kernel micro-bench"
  timeout 60 python3 bench/bench_cascade_gpu.py --skip speed --out "$OUT" 2>&1 | grep -v '^$' | head -40
  cp "$OUT/bench_cascade_gpu.json" "$OUT/kernels.json" 2>/dev/null
  stamp "3. issue workload, cascade off then on"
  timeout 150 python3 bench/probe_steps.py --bursts 3 --arrival shuffled,grouped,shuffled --cascade off,on --json "$OUT/probe.json"
  stamp "4. 8B speed table, cascade off vs on"
  mkdir -p "$OUT/speed"
  timeout 120 python3 bench/bench_cascade_gpu.py --skip kernels --repeats 3 --previous "$OUT/kernels.json" --probe "$OUT" --out "$OUT/speed" 2>&1 \
    | grep -v '^$' | tail -14
  stamp "done"
  date -u
} 2>&1 | tee "$OUT/cascade.log"
rm -rf "$CACHES"
