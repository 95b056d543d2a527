#!/usr/bin/env bash
# Host time between GPU steps (issue #18, branch hostcut) on a GPU machine, in one device call
# (~3-4 minutes):
#   1. the GPU tests of what changed on the GPU path: decode CUDA graphs against eager decode
#      (DecodeGraphs.fill now writes only the block-table rows that changed and reuses the
#      previous step's cascade plan), cascade against plain attention, and the decode graphs'
#      host buffer against a fresh build at every step of a CPU engine run;
#   2. the issue #18 workload (bench/probe_steps.py, Llama-3-8B shape, 512 requests, cascade on,
#      overlap_outputs on, policy group, shuffled) on one engine, 5 bursts: a warm-up, then the
#      garbage collector's start-up heap not frozen / frozen / not / frozen (SchedulerConfig.
#      freeze_gc's gc.freeze, alternated): req/s and host time outside the GPU;
#   3. host only (no GPU): bench/bench_host_step.py --workload issue18 on this machine's CPU, the
#      GPU runner's host code per step kind and the collector's pauses, gc not frozen and frozen
#      (the figures the 2-core box has in docs/benchmarks.md#host-step-cut, on the device's host).
# The end-to-end req/s of the issue workload: `bash bench/device_admit.sh` on the same tree.
#
#   device:  bash bench/device_hostcut.sh      (results in $OUT, default /tmp/hostcut)
# Results: $OUT/hostcut.log, $OUT/probe.json, $OUT/host_step{,-frozen}.json.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/hostcut}
mkdir -p "$OUT"
source bench/device_env.sh
CACHES=$(mktemp -d /tmp/triton-caches.XXXXXX)
export TRITON_CACHE_DIR="$CACHES/a"
{
  device_header
  echo "== 1. GPU tests"
  timeout 300 python3 -m pytest -q -p no:cacheprovider tests/engine/test_cuda_graphs.py \
    tests/engine/test_decode_graph_buffer.py tests/model/test_cascade_attention.py 2>&1 | tail -15
  echo "== 2. issue workload, gc frozen or not (alternated after a warm-up burst)"
  timeout 240 python3 bench/probe_steps.py --bursts 5 --cascade on --overlap on --policy group \
    --freeze-gc off,off,on,off,on --json "$OUT/probe.json"
  echo "== 3. host only: bench_host_step.py --workload issue18, gc not frozen, then frozen"
  timeout 100 python3 bench/bench_host_step.py --workload issue18 --bursts 3 --json "$OUT/host_step.json"
  timeout 100 python3 bench/bench_host_step.py --workload issue18 --bursts 3 --freeze-gc --json "$OUT/host_step-frozen.json"
  date -u
} 2>&1 | tee "$OUT/hostcut.log"
rm -rf "$CACHES"
