#!/usr/bin/env bash
# Prefix-grouped admission (SchedulerConfig.policy "group") on the GPU, in one device call
# (~2 minutes of GPU):
#   1. the issue #18 workload (bench/probe_steps.py: 512 requests, 32 groups x 2048-token prefix,
#      +128 new, 128 out, Llama-3-8B shape, max 128 running) with cascade attention on and
#      overlap_outputs on, on one engine: 7 bursts = two throw-away warm-ups (shuffled, fcfs then
#      group: the first grouped batches meet new step shapes), then shuffled arrivals with policy
#      fcfs, group, fcfs, group (alternated: drift cancels), then grouped arrivals with fcfs (the
#      batches policy group should reproduce). `--cascade-off` adds the same on a second engine
#      with cascade attention off (first run, 00:01 UTC: group / fcfs 0.996x there);
#   3. bench/admit_summary.py: the markdown table, group / fcfs over the warm bursts;
#   4. bench/bench_admission.py (host only, no GPU): decode rows per cascade chunk and the
#      ordering's host cost on this machine's CPU.
#
#   device:  bash bench/device_admit.sh      (results in $OUT, default /tmp/admit)
# Results: $OUT/admit.log, $OUT/probe-cascade_{on,off}.json, $OUT/summary.md, $OUT/admission.json.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/admit}
mkdir -p "$OUT"
CASCADE=on
[ "${1:-}" = --cascade-off ] && CASCADE=on,off
source bench/device_env.sh
CACHES=$(mktemp -d /tmp/triton-caches.XXXXXX)
export TRITON_CACHE_DIR="$CACHES/a"
start=$(date +%s)
stamp() { echo "[device_admit] $1 at +$(( $(date +%s) - start )) s"; }
{
  device_header
  stamp "1-2. issue workload, policy fcfs vs group, cascade $CASCADE"
  timeout 200 python3 bench/probe_steps.py --bursts 7 --cascade "$CASCADE" --overlap on \
    --arrival shuffled,shuffled,shuffled,shuffled,shuffled,shuffled,grouped --policy fcfs,group,fcfs,group,fcfs,group,fcfs \
    --json "$OUT/probe.json"
  [ "$CASCADE" = on ] && cp "$OUT/probe.json" "$OUT/probe-cascade_on.json"
  stamp "3. summary"
  python3 bench/admit_summary.py --warmup 2 "$OUT"/probe-cascade_*.json | tee "$OUT/summary.md"
  stamp "4. host-only admission bench"
  timeout 60 python3 bench/bench_admission.py --arrivals shuffled --json "$OUT/admission.json"
  stamp "done"
  date -u
} 2>&1 | tee "$OUT/admit.log"
rm -rf "$CACHES"
