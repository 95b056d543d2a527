#!/usr/bin/env bash
# Prefix-grouped admission (SchedulerConfig.policy "group") on the GPU, in one device call
# (~3 minutes of GPU):
#   1. the issue #18 workload (bench/probe_steps.py: 512 requests, 32 groups x 2048-token prefix,
#      +128 new, 128 out, Llama-3-8B shape, max 128 running) with cascade attention ON and
#      overlap_outputs on, on one engine: 6 bursts = a throw-away warm-up (shuffled, fcfs), then
#      shuffled arrivals with policy fcfs, group, fcfs, group (alternated: drift cancels), then
#      grouped arrivals with fcfs (the batches policy group should reproduce);
#   2. the same 6 bursts on a second engine with cascade attention OFF over the same weights
#      (what grouping does where no kernel reads a shared prefix once);
#   3. bench/admit_summary.py: the markdown table of both, group / fcfs over the warm bursts;
#   4. bench/bench_admission.py (host only, no GPU): decode rows per cascade chunk and the
#      ordering's host cost on this machine's CPU.
#
#   device:  bash bench/device_admit.sh      (results in $OUT, default /tmp/admit)
# Results: $OUT/admit.log, $OUT/probe-cascade_{on,off}.json, $OUT/summary.md, $OUT/admission.json.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-/tmp/admit}
mkdir -p "$OUT"
source bench/device_env.sh
CACHES=$(mktemp -d /tmp/triton-caches.XXXXXX)
export TRITON_CACHE_DIR="$CACHES/a"
start=$(date +%s)
stamp() { echo "[device_admit] $1 at +$(( $(date +%s) - start )) s"; }
{
  nvidia-smi --query-gpu=name,clocks.sm,clocks.mem --format=csv
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  lscpu | grep 'Model name'
  git log --oneline -1 2>/dev/null
  date -u
  stamp "1-2. issue workload, policy fcfs vs group, cascade on then off"
  timeout 200 python3 bench/probe_steps.py --bursts 6 --cascade on,off --overlap on \
    --arrival shuffled,shuffled,shuffled,shuffled,shuffled,grouped --policy fcfs,fcfs,group,fcfs,group,fcfs \
    --json "$OUT/probe.json"
  stamp "3. summary"
  python3 bench/admit_summary.py "$OUT/probe-cascade_on.json" "$OUT/probe-cascade_off.json" | tee "$OUT/summary.md"
  stamp "4. host-only admission bench"
  timeout 60 python3 bench/bench_admission.py --arrivals shuffled --json "$OUT/admission.json"
  stamp "done"
  date -u
} 2>&1 | tee "$OUT/admit.log"
rm -rf "$CACHES"
