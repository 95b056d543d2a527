# Sourced by the device scripts (bash bench/device_*.sh) after they cd to the repository root:
# installs the wheels carried in .whl/ (what the GPU image lacks for `radixserve serve`; fetch
# them here with `bash bench/device_suite.sh --download-wheels`) into /tmp/site and puts that
# and the checkout on PYTHONPATH. Without .whl/ the checkout alone is used.
PYTHON=${PYTHON:-python3}
if ls .whl/*.whl >/dev/null 2>&1; then
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    2>&1 | tail -3
  export PYTHONPATH="/tmp/site:$PWD"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1

# What a device script's log starts with: the GPU (driver, clocks), torch and Triton, the host
# CPU, the tree's commit (where the copy has one) and the time.
device_header() {
  nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv,noheader
  "$PYTHON" -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__)"
  lscpu | grep 'Model name'
  git log --oneline -1 2>/dev/null
  date -u
}
