#!/usr/bin/env bash
# Everything that needs the GPU, in one command on the device machine:
#   install the project on the image's torch and triton (plus wheels carried in .whl/),
#   run the GPU-marked tests, the kernel microbenchmarks, the codec and LM-step benchmarks against Kyutai,
#   run the demo at Moshi's real size, and keep the logs and JSON results under $OUT.
# Usage (from the repository root): GIT_SHA=$(git rev-parse --short HEAD) bash bench/gpu_check.sh [steps]
#   steps: a comma-separated subset of tests,kernels,mimi,lm,frame,cadence,profile,buckets,pdl,host,load,demo
#   (default: all; cadence: the frame at one conversation, both engines, frames started 80 ms apart as a real-time
#   caller's; host: bench_host_step.py, the engine's own host work a step),
#   or sweep (not in the default): time launch-plan candidates (SWEEP_OPS, default paged_fp8; SWEEP_BATCHES,
#   default 1,8,64; SWEEP_NAMES, case-name prefixes, default all) and write the updated kernels/tuned_tiles.json
#   beside the sweep under $OUT
#   TEST_ARGS: extra pytest arguments for the GPU tests, e.g. TEST_ARGS='tests/test_lm_fast.py'
#   MIMI_ARGS, LM_ARGS, FRAME_ARGS, PROFILE_ARGS, BUCKET_ARGS, PDL_ARGS: extra arguments of bench_mimi.py,
#   bench_lm_step.py, bench_frame.py, profile_frame.py, bench_buckets.py, pdl_sweep.py (e.g. FRAME_ARGS=--without-pdl:
#   the same engine without programmatic dependent launch, timed in the same run; --triton-sampling: with the Triton
#   sampler instead of the CUDA one; MIMI_ARGS=--fused-norms: the codec with every LayerNorm fused, same run;
#   FRAME_ARGS='--batches 64 --skip kyutai,fast --kv-cache fp8': only the e4m3-cache engine, where the others do
#   not fit the GPU, e.g. B = 64 on 80 GB; --compare-table PATH, in any of the three: the same engine planned from
#   another tuned-tiles JSON, e.g. the table before a sweep)
#   BENCH_ARGS: extra pytest arguments for the kernel benchmarks, e.g. BENCH_ARGS='-k "not tiles"'
#   (leaves out the sampling kernel's tile sweep)
#   ISOLATED_TESTS, ISOLATED_BENCH: test and benchmark files run first, each in a process of its own (for kernels
#   not yet run on a GPU: a bad memory access poisons the CUDA context of the process it happens in, and every later
#   test or benchmark there fails with it, and a kernel that hangs holds the step until its timeout),
#   ISOLATED_TIMEOUT seconds at most each (default 300); by default none (every kernel has run on a GPU)
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
steps=",${1:-tests,kernels,mimi,lm,frame,cadence,profile,buckets,pdl,host,load,demo},"
status=0
isolated_tests=${ISOLATED_TESTS-}
isolated_bench=${ISOLATED_BENCH-}
ignored_tests=$(for f in $isolated_tests; do printf -- ' --ignore=%s' "$f"; done)
ignored_bench=$(for f in $isolated_bench; do printf -- ' --ignore=%s' "$f"; done)
if [[ $steps == *,tests,* ]]; then
    for f in $isolated_tests; do
        timeout "${ISOLATED_TIMEOUT:-300}" python3 -m pytest -q -m gpu -s "$f" 2>&1 \
            | tee -a "$OUT/pytest_isolated.log" | tail -5 || status=1
    done
    eval "python3 -m pytest -q -m gpu -s $ignored_tests ${TEST_ARGS:-}" 2>&1 | tee "$OUT/pytest_gpu.log" | tail -40 \
        || status=1
fi
if [[ $steps == *,kernels,* ]]; then
    if [[ -n $isolated_bench ]]; then
        timeout "${ISOLATED_TIMEOUT:-300}" python3 -m pytest -q $isolated_bench -o python_files='bench_*.py' \
            --benchmark-json="$OUT/kernels_isolated.json" > "$OUT/kernels_isolated.log" 2>&1 || status=1
        python3 bench/summarize.py "$OUT/kernels_isolated.json" | tee "$OUT/kernels_isolated.txt"
    fi
    eval "python3 -m pytest -q bench/ $ignored_bench -o python_files='bench_*.py' \
        --benchmark-json=\"\$OUT/kernels.json\" ${BENCH_ARGS:-}" > "$OUT/kernels.log" 2>&1 || status=1
    python3 bench/summarize.py "$OUT/kernels.json" | tee "$OUT/kernels.txt"
fi
if [[ $steps == *,mimi,* ]]; then
    eval "python3 bench/bench_mimi.py --json \"\$OUT/mimi.json\" ${MIMI_ARGS:-}" 2>&1 | tee "$OUT/mimi.log" || status=1
fi
if [[ $steps == *,lm,* ]]; then
    eval "python3 bench/bench_lm_step.py --json \"\$OUT/lm_step.json\" ${LM_ARGS:-}" 2>&1 | tee "$OUT/lm_step.log" || status=1
fi
if [[ $steps == *,frame,* ]]; then
    eval "python3 bench/bench_frame.py --json \"\$OUT/frame.json\" --plot \"\$OUT/frame.png\" ${FRAME_ARGS:-}" 2>&1 \
        | tee "$OUT/frame.log" || status=1
fi
if [[ $steps == *,cadence,* ]]; then
    python3 bench/bench_frame.py --batches 1 --frames 30 --cadence-ms 80 --json "$OUT/frame_cadence80.json" 2>&1 \
        | tee "$OUT/frame_cadence80.log" || status=1
fi
if [[ $steps == *,profile,* ]]; then
    # Every kernel of the frame, timed by the CUDA profiler and grouped by phase, at one and eight conversations.
    eval "python3 bench/profile_frame.py --batches 1,8 --json \"\$OUT/profile.json\" ${PROFILE_ARGS:-}" 2>&1 \
        | tee "$OUT/profile.log" || status=1
fi
if [[ $steps == *,buckets,* ]]; then
    eval "python3 bench/bench_buckets.py --json \"\$OUT/buckets.json\" ${BUCKET_ARGS:-}" 2>&1 | tee "$OUT/buckets.log" \
        || status=1
fi
if [[ $steps == *,pdl,* ]]; then
    eval "python3 bench/pdl_sweep.py --json \"\$OUT/pdl_sweep.json\" ${PDL_ARGS:-}" 2>&1 | tee "$OUT/pdl_sweep.log" \
        || status=1
fi
if [[ $steps == *,host,* ]]; then
    python3 bench/bench_host_step.py --json "$OUT/host_step.json" 2>&1 | tee "$OUT/host_step.log" || status=1
fi
if [[ $steps == *,sweep,* ]]; then
    python3 bench/sweep_tiles.py --ops "${SWEEP_OPS:-paged_fp8}" --batches "${SWEEP_BATCHES:-1,8,64}" \
        --names "${SWEEP_NAMES:-}" --json "$OUT/sweep.json" 2>&1 | tee "$OUT/sweep.log" || status=1
    # The table before the sweep stays beside it, for bench_mimi.py / bench_frame.py --compare-table.
    cp kernels/tuned_tiles.json "$OUT/tuned_tiles_before.json"
    python3 bench/sweep_tiles.py --table "$OUT/sweep.json" --update && cp kernels/tuned_tiles.json "$OUT/" || status=1
fi
if [[ $steps == *,load,* ]]; then
    # The server at Moshi's real size on the fast engine, and LOAD_CLIENTS real-time Kyutai-protocol clients.
    clients=${LOAD_CLIENTS:-64}
    python3 -m moshi_fast serve --max-conversations "$clients" --port 8998 > "$OUT/serve.log" 2>&1 &
    server=$!
    for _ in $(seq 300); do
        python3 -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8998/api/stats', timeout=2)" \
            2> /dev/null && break
        sleep 1
    done
    python3 -m moshi_fast loadtest --clients "$clients" --seconds "${LOAD_SECONDS:-30}" \
        --output "$OUT/loadtest.json" 2>&1 | tee "$OUT/loadtest.log" || status=1
    kill "$server"
    wait "$server"
    # The load test's report carries no device: record it beside the clients' and the server's figures.
    python3 - "$OUT/loadtest.json" <<'PY'
import json, os, sys, torch, triton
report = json.load(open(sys.argv[1]))
info = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
        "git_sha": os.environ["GIT_SHA"]}
json.dump({**info, "report": report}, open(sys.argv[1], "w"), indent=1)
PY
fi
if [[ $steps == *,demo,* ]]; then
    python3 -m moshi_fast demo --seconds 4 --output "$OUT/demo.wav" 2>&1 | tee "$OUT/demo.log" || status=1
    rm -f "$OUT/demo.wav"
fi
exit $status
