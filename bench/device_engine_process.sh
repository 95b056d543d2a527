#!/usr/bin/env bash
# Issue #18 item 1 on a GPU, in one device call (about 3-4 min): the shared-prefix workload
# (Llama-3-8B-shaped dummy weights; 16 groups x 16 requests, 2048-token prefixes + 128 new tokens,
# 128 out, 128 concurrent streaming clients over 4 client processes) with the engine in-process, then over HTTP with the
# engine core on a thread (--engine-process off) and in its own process (on), both servers up at
# once (an explicit pool of 12000 blocks, 24 GiB, each), passes alternating (off, on, on, off).
#
#   here, once:  bash bench/device_suite.sh --download-wheels   (its wheel list has pyzmq and msgspec)
#   device:      run(command="bash bench/device_engine_process.sh", carry=[".whl"])
# Results in $OUT: bench_engine_process.{json,md}, server-{off,on}.log, engine_process.log.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
OUT=${OUT:-/tmp/engine-process}; mkdir -p "$OUT"
# shellcheck source=bench/device_env.sh
. bench/device_env.sh  # the carried wheels, PYTHONPATH
"$PYTHON" -c "import zmq, msgspec, fastapi, uvicorn, torch; print('zmq', zmq.__version__, 'msgspec', msgspec.__version__, torch.cuda.get_device_name())" \
  || { echo "environment check failed (carry .whl with pyzmq and msgspec)"; exit 1; }
nvidia-smi --query-gpu=name,memory.used,memory.total --format=csv | tee "$OUT/nvidia-smi.txt"
timeout 300 "$PYTHON" bench/bench_engine_process.py --device cuda --model dummy:llama3-8b --max-model-len 8192 \
  --groups 16 --per-group 16 --warmup-groups 8 --prefix-len 2048 --new-len 128 --out-len 128 --concurrency 128 --client-processes 4 \
  --max-num-seqs 128 --max-num-batched-tokens 4096 --num-blocks 12000 --rounds 2 --out "$OUT" \
  2>&1 | tee "$OUT/engine_process.log"
