#!/usr/bin/env bash
# Deterministic mode at M in (16, 64] (issue #17: the cached TTFT's 64 new tokens, decode b32), in
# one device call (under 4 minutes of GPU). From the repository root (results under $OUT,
# default /tmp/detm64):
#
#   bash bench/device_detm64.sh [STAGES]      STAGES: comma-separated, default sweep,table
#
# sweep: bench/bench_deterministic_sweep.py --ms 32,64 --precompile 12: every M = 32 / 64 candidate
#        (flat_tma tiles, stages, load widths, stream_tma runs per SM) on the Llama-3-8B shapes,
#        each checked bitwise against the prefill launch at M = 1 ... 4096, CUDA-graph timed against
#        cuBLAS; names the fastest one-tile bucket per M with equal bits; then the deterministic
#        attention configs (the flat walk among them: unmeasured so far), bits vs the shipped one
#        -> $OUT/matmul_sweep.md (+ .json), $OUT/best_buckets.json
# table: bench/bench_deterministic_gpu.py --skip identical --repeats 3 --buckets $OUT/best_buckets.json:
#        the 8B speed table, default vs --deterministic on the sweep's buckets, in one run
#        -> $OUT/speed.log, bench_deterministic_gpu.json (skipped if the sweep left < 80 s)
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
PYTHON=${PYTHON:-python3}
# shellcheck source=bench/device_env.sh
source bench/device_env.sh
OUTDIR=${OUT:-/tmp/detm64}
mkdir -p "$OUTDIR"
STAGES=",${1:-sweep,table},"
BUDGET=230  # seconds of this call, all stages together
exec > >(tee -a "$OUTDIR/detm64.log") 2>&1  # everything below is also logged to $OUT
start=$(date +%s)
elapsed() { echo $(( $(date +%s) - start )); }
stamp() { echo "[device_detm64] $1 at +$(elapsed) s"; }
device_header

if [[ $STAGES == *,sweep,* ]]; then
  stamp "matmul sweep at M = 32, 64, then the attention configs"
  timeout 190 $PYTHON bench/bench_deterministic_sweep.py --ms 32,64 --precompile 12 --out "$OUTDIR" > "$OUTDIR/sweep.log" 2>&1
  echo "sweep rc $?"
  grep -E 'BITS DIFFER|Error|error' "$OUTDIR/sweep.log" | head -20
  cat "$OUTDIR/matmul_sweep.md" 2>/dev/null || tail -20 "$OUTDIR/sweep.log"
fi
if [[ $STAGES == *,table,* ]]; then
  left=$(( BUDGET - $(elapsed) ))
  buckets=()
  [[ -s $OUTDIR/best_buckets.json ]] && buckets=(--buckets "$OUTDIR/best_buckets.json")
  if (( left >= 80 )); then
    stamp "engine speed table ${buckets[*]} (${left} s left)"
    timeout "$left" $PYTHON bench/bench_deterministic_gpu.py --skip identical --repeats 3 "${buckets[@]}" --out "$OUTDIR" \
      > "$OUTDIR/speed.log" 2>&1
    echo "table rc $?"
    grep -E '^matmul buckets' "$OUTDIR/speed.log"
    grep -A8 'Llama-3-8B shape' "$OUTDIR/speed.log" | tail -8; grep -i 'error\|Traceback' "$OUTDIR/speed.log" | head -5
  else
    stamp "engine speed table skipped (${left} s left)"
  fi
fi
stamp "done"
