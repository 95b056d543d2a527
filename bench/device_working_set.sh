#!/usr/bin/env bash
# The serving suite's `working-set` workload on a GPU with the tiers off / host RAM / host RAM + disk
# (issue #13's last aim), in one device call of about 4 minutes:
#
#   here, once:  bash bench/device_suite.sh --download-wheels      (the server's wheels into .whl/)
#   device:      run(command="bash bench/device_working_set.sh", carry=[".whl"])
#
# Three servers of the Llama-3-8B shape (dummy weights, bf16) share the GPU, each with a device pool
# of 510 blocks (about 4 of the workload's 16 system prompts of ~2000 tokens):
#   device   no tiers: LRU evicts every prompt before its turn comes back
#   host     --host-cache-gb 8: the whole working set (about 4 GB of KV) fits in pinned host RAM
#   disk     --host-cache-gb 1 --kv-store disk:...: host RAM holds about 4 prompts, the rest on disk
# The suite then runs the workload against `host` and `disk` (its "on" column), each time with
# `device` as the "off" column (the same 48 requests, round robin x 3).
# Results in $OUT: working-set-{host,disk}.json, suite-{host,disk}.log, server-*.log.
set -uo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
OUTDIR=${OUT:-/tmp/working-set}
mkdir -p "$OUTDIR"
# shellcheck source=bench/device_env.sh
. bench/device_env.sh  # the carried wheels, PYTHONPATH
DISK=$(mktemp -d /tmp/working-set-disk.XXXXXX)
COMMON=(--device cuda --model dummy:llama3-8b --dtype bfloat16 --num-blocks 510 --max-model-len 4096
        --served-model-name dummy --log-level warning)
declare -A PORTS=([device]=18601 [host]=18602 [disk]=18603)
declare -A TIERS=([device]="" [host]="--host-cache-gb 8" [disk]="--host-cache-gb 1 --kv-store disk:$DISK --kv-store-gb 16")
PIDS=()
for name in device host disk; do
  # shellcheck disable=SC2086 # TIERS holds several flags
  "$PYTHON" -m radixserve serve --port "${PORTS[$name]}" "${COMMON[@]}" ${TIERS[$name]} \
    >"$OUTDIR/server-$name.log" 2>&1 &
  PIDS+=($!)
done
for name in device host disk; do
  for _ in $(seq 240); do
    curl -sf "http://127.0.0.1:${PORTS[$name]}/health" >/dev/null && break
    sleep 1
  done
  curl -sf "http://127.0.0.1:${PORTS[$name]}/health" >/dev/null || { echo "server $name did not start"; tail -20 "$OUTDIR/server-$name.log"; }
done
echo "servers up at +${SECONDS} s"
for name in host disk; do
  timeout 200 "$PYTHON" -m radixserve bench suite --workloads working-set --no-docs --no-progress \
    --on-url "http://127.0.0.1:${PORTS[$name]}" --off-url "http://127.0.0.1:${PORTS[device]}" --served-model dummy \
    --label "gpu-working-set-$name" --json "$OUTDIR/working-set-$name.json" \
    --note "on = tiers: ${TIERS[$name]}; off = the device pool alone (both cache, --num-blocks 510)" \
    >"$OUTDIR/suite-$name.log" 2>&1
  echo "== $name (rc $?)"
  grep -E "^\| working-set" "$OUTDIR/suite-$name.log"
done
curl -s "http://127.0.0.1:${PORTS[disk]}/metrics" | grep -E "^radixserve_tier_(hit_tokens|load_decisions|prefetched)" \
  | tee "$OUTDIR/metrics-disk.txt"
kill "${PIDS[@]}" 2>/dev/null
wait
rm -rf "$DISK"
echo "done at +${SECONDS} s"
