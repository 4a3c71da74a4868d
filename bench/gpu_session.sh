#!/usr/bin/env bash
# One device call for issue 7: install the wheels bench/gpu_wheels.sh fetched into .whl/, check
# the stack imports, run bench/gpu.py for MODELS (correctness, then timings), then the opt-in GPU
# tests (a real CUDA out-of-memory split; context parallel when there are two GPUs) in what is
# left of SESSION seconds. The device returns at most 8 files from $OUT, so it gets five: pip.log,
# nvidia-smi.txt, gpu-tests.log, the result JSON (rewritten after every phase, so a run cut short
# keeps what it finished) and logs.tar.gz (the worker logs, packed at the end).
#
#   bash bench/gpu_wheels.sh                                   # here, once (35 MiB, git-ignored)
#   device: bash bench/gpu_session.sh      (carry .whl; timeout_s 600; MODELS=sd15 by default)
#
# Rehearsal on this CPU (no install, shrunk models; the GPU tests skip without CUDA):
#   PYTHON=.venv/bin/python SKIP_INSTALL=1 BENCH_ARGS=--rehearse OUT=/tmp/gpu-session \
#       bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:?set OUT to the folder results go to}
PYTHON=${PYTHON:-python3}
MODELS=${MODELS:-sd15}
# Seconds the whole script may take: the device call's 600 s, less time to pack the logs.
SESSION=${SESSION:-570}
# Of those, seconds kept for the GPU tests after the benchmark, and between the benchmark's planning
# deadline and its hard stop.
TESTS_RESERVE=${TESTS_RESERVE:-60}
STOP_MARGIN=${STOP_MARGIN:-10}
LOGS=$(mktemp -d)
export HF_HUB_OFFLINE=1
started=$(date +%s)
elapsed() { echo $(($(date +%s) - started)); }

if [[ -z ${SKIP_INSTALL:-} ]]; then
    if ! "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1; then
        tail -n 20 "$OUT/pip.log"
        exit 1
    fi
    export PYTHONPATH=/tmp/site:worker
fi
# The device's own packages (torch, numpy, accelerate, peft, ...) meet the carried ones here: a
# clash fails in seconds, not minutes into the benchmark.
if ! "$PYTHON" -c "import torch, diffusers, transformers, fastapi, uvicorn, pydantic, httpx, diffusion_worker.app
from diffusers import FluxPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline" >>"$OUT/pip.log" 2>&1; then
    "$PYTHON" -m pip list >>"$OUT/pip.log" 2>&1
    echo "the stack does not import:"
    tail -n 20 "$OUT/pip.log"
    exit 1
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" >"$OUT/nvidia-smi.txt"
# torch.compile's Triton builds its launcher with a C compiler and Python.h: without them both
# compiled phases fail (at once, with the reason in their logs); said here first.
if ! command -v cc >/dev/null && ! command -v gcc >/dev/null; then
    echo "warning: no C compiler on PATH: compiled phases will fail"
fi
"$PYTHON" -c "import os, sysconfig, sys; h = os.path.join(sysconfig.get_paths()['include'], 'Python.h')
sys.exit(0 if os.path.exists(h) else f'warning: no {h}: compiled phases will fail')"

model_args=()
for model in $MODELS; do model_args+=(--model "$model"); done
# The benchmark's deadline is this script's end, so its own start-up (imports, CUDA) counts too;
# BUDGET, if set, caps it further (seconds from the benchmark's start).
# shellcheck disable=SC2086  # BENCH_ARGS holds several flags
# A hard stop too (a phase the estimates got wrong), STOP_MARGIN after the deadline the benchmark
# plans by, so that its last phase's record is written first: the phases it finished are in the
# result file already, and the logs still get packed below. The GPU tests get TESTS_RESERVE.
bench_end=$((started + SESSION - TESTS_RESERVE))
timeout --kill-after=5 $((bench_end + STOP_MARGIN - $(date +%s))) \
    "$PYTHON" bench/gpu.py "${model_args[@]}" --end-at $((bench_end - STOP_MARGIN)) \
    --time-budget "${BUDGET:-0}" --out "$OUT" --log-dir "$LOGS" ${BENCH_ARGS:-}
echo "bench/gpu.py: exit $? after $(elapsed) s (session $SESSION s)"

# After the benchmark (its own correctness check, the worker's image against raw diffusers', comes
# first within it), in what is left: run before it, their 30-90 s could cost the compiled phase.
# The device's own pytest plugins (xdist, cov, benchmark, hypothesis, ...) would load, in versions
# nobody chose, next to the carried pytest: autoload none, and load the one the tests need by name
# (pytest-timeout: pyproject's `timeout = 300`, and @pytest.mark.timeout under --strict-markers).
tests_left=$((SESSION - $(elapsed)))
PYTEST_DISABLE_PLUGIN_AUTOLOAD=1 timeout $((tests_left > 20 ? tests_left : 20)) "$PYTHON" -m pytest \
    -p pytest_timeout -p no:cacheprovider -m gpu tests/gpu -q -rs >"$OUT/gpu-tests.log" 2>&1
echo "gpu tests: exit $? after $(elapsed) s (last lines of $OUT/gpu-tests.log:)"
tail -n 6 "$OUT/gpu-tests.log"
tar -czf "$OUT/logs.tar.gz" -C "$LOGS" . && rm -rf "$LOGS"
ls -l "$OUT"
