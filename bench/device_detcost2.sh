#!/usr/bin/env bash
# Deterministic mode's cost, second pass (issue #17), in one device call (about 5 minutes of GPU).
# From the repository root (results under $OUT, default /tmp/detcost2):
#
#   bash bench/device_detcost2.sh [STAGES]      STAGES: comma-separated, default sweep,profile,table,tests
#
# sweep:   bench/bench_deterministic_sweep.py: candidate kernels (nested / flat / flat_tma), tiles, warps,
#          stages and load widths per M bucket (1, 32, 64, 4096) on the Llama-3-8B shapes; each
#          checked bitwise against the shipped prefill launch at M = 1 ... 4096, timed against
#          cuBLAS; deterministic attention launch configs (bits vs the shipped one, time vs default)
#          -> $OUT/matmul_sweep.md (+ .json)
# bits:    bench/bench_batch_invariant_matmul.py --quick: the shipped buckets and split rule give
#          every row the prefill tile's bits (0 mismatches expected) -> $OUT/bits.log
# profile: bench/profile_deterministic_gpu.py: GPU time per kernel, default vs deterministic, for
#          the table's four workloads -> $OUT/profile_deterministic.md (+ .json)
# table:   bench/bench_deterministic_gpu.py --skip identical --repeats 3: the 8B speed table,
#          default vs --deterministic in one run -> $OUT/speed.log, bench_deterministic_gpu.json
# tests:   tests/engine/test_deterministic_gpu.py tests/model/test_batch_invariant.py (100/100
#          token-identical, bitwise logits in every configuration) -> $OUT/tests.log
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
PYTHON=${PYTHON:-python3}
# shellcheck source=bench/device_env.sh
source bench/device_env.sh
OUTDIR=${OUT:-/tmp/detcost2}
mkdir -p "$OUTDIR"
STAGES=",${1:-sweep,profile,table,tests},"
exec > >(tee -a "$OUTDIR/detcost2.log") 2>&1  # everything below is also logged to $OUT
start=$(date +%s)
stamp() { echo "[device_detcost2] $1 at +$(( $(date +%s) - start )) s"; }
device_header

if [[ $STAGES == *,sweep,* ]]; then
  stamp "matmul + attention sweep"
  timeout 240 $PYTHON bench/bench_deterministic_sweep.py --out "$OUTDIR" > "$OUTDIR/sweep.log" 2>&1
  grep -E 'BITS DIFFER|Error|error' "$OUTDIR/sweep.log" | head -20
  cat "$OUTDIR/matmul_sweep.md" 2>/dev/null || tail -20 "$OUTDIR/sweep.log"
fi
if [[ $STAGES == *,bits,* ]]; then
  stamp "shipped buckets' bits"
  timeout 100 $PYTHON bench/bench_batch_invariant_matmul.py --quick --out "$OUTDIR" > "$OUTDIR/bits.log" 2>&1
  grep '^\[bits\]' "$OUTDIR/bits.log" | tail -8
fi
if [[ $STAGES == *,profile,* ]]; then
  stamp "per-kernel profile"
  timeout 150 $PYTHON bench/profile_deterministic_gpu.py --out "$OUTDIR" > "$OUTDIR/profile.log" 2>&1
  grep -A10 '^### ' "$OUTDIR/profile_deterministic.md" 2>/dev/null | grep -v '^top kernels' || tail -20 "$OUTDIR/profile.log"
fi
if [[ $STAGES == *,table,* ]]; then
  stamp "engine speed table"
  timeout 150 $PYTHON bench/bench_deterministic_gpu.py --skip identical --repeats 3 --out "$OUTDIR" > "$OUTDIR/speed.log" 2>&1
  grep -A8 'Llama-3-8B shape' "$OUTDIR/speed.log" | tail -8; grep -i 'error\|Traceback' "$OUTDIR/speed.log" | head -5
fi
if [[ $STAGES == *,tests,* ]]; then
  stamp "determinism tests"
  timeout 180 $PYTHON -m pytest tests/engine/test_deterministic_gpu.py tests/model/test_batch_invariant.py -q -s -p no:cacheprovider \
    > "$OUTDIR/tests.log" 2>&1
  grep -E 'passed|failed|error|FAIL|token-identical|bitwise' "$OUTDIR/tests.log" | tail -25
fi
stamp "done"
