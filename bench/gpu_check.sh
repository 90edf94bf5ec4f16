#!/usr/bin/env bash
# Everything that needs the GPU, in one command on the device machine:
#   install the project on the image's torch and triton (plus wheels carried in .whl/),
#   run the GPU-marked tests, run the demo at Moshi's real size, and keep the logs under $OUT.
# Usage (from the repository root): bash bench/gpu_check.sh [pytest -k expression]
set -uo pipefail
OUT=${OUT:-$(mktemp -d)}
export PYTHONUNBUFFERED=1
if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
        && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH} || exit 1
fi
python3 -m pip install -q -e . --no-deps --no-build-isolation > "$OUT/install.log" 2>&1 || { cat "$OUT/install.log"; exit 1; }
# The device gets a copy of the working tree without .git: pass GIT_SHA=$(git rev-parse --short HEAD).
export GIT_SHA=${GIT_SHA:-$(git rev-parse --short HEAD 2>/dev/null || echo unknown)}
python3 - <<'PY' | tee "$OUT/device.txt"
import os, torch, triton
print("device:", torch.cuda.get_device_name(), "| torch", torch.__version__, "| triton", triton.__version__)
print("git:", os.environ["GIT_SHA"])
PY
status=0
python3 -m pytest -q -m gpu ${1:+-k "$1"} -s 2>&1 | tee "$OUT/pytest_gpu.log" || status=1
python3 -m moshi_fast demo --seconds 4 --output "$OUT/demo.wav" 2>&1 | tee "$OUT/demo.log" || status=1
rm -f "$OUT/demo.wav"
exit $status
