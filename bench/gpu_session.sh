#!/usr/bin/env bash
# One device call for issue 7: install the wheels bench/gpu_wheels.sh fetched into .whl/, run the
# opt-in GPU tests (correctness: a real CUDA out-of-memory split; context parallel when there are
# two GPUs), then bench/gpu.py for MODELS within BUDGET seconds. Everything lands under $OUT:
# pip.log, nvidia-smi.txt, gpu-tests.log, the result JSON, worker logs.
#
#   bash bench/gpu_wheels.sh                                   # here, once (33 MiB, git-ignored)
#   device: bash bench/gpu_session.sh      (carry .whl; MODELS=sd15 BUDGET=420 by default)
#
# Rehearsal on this CPU (no install, shrunk models; the GPU tests skip without CUDA):
#   PYTHON=.venv/bin/python SKIP_INSTALL=1 BENCH_ARGS=--rehearse OUT=/tmp/gpu-session \
#       bash bench/gpu_session.sh
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=${OUT:?set OUT to the folder results go to}
PYTHON=${PYTHON:-python3}
MODELS=${MODELS:-sd15}
BUDGET=${BUDGET:-420}
mkdir -p "$OUT/logs"
started=$(date +%s)

if [[ -z ${SKIP_INSTALL:-} ]]; then
    if ! "$PYTHON" -m pip install --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl >"$OUT/pip.log" 2>&1; then
        tail -n 20 "$OUT/pip.log"
        exit 1
    fi
    export PYTHONPATH=/tmp/site:worker
fi
nvidia-smi >"$OUT/nvidia-smi.txt" 2>&1 || echo "no nvidia-smi" >"$OUT/nvidia-smi.txt"

timeout 150 "$PYTHON" -m pytest -m gpu tests/gpu -p no:cacheprovider -q -rs >"$OUT/gpu-tests.log" 2>&1
echo "gpu tests: exit $? after $(($(date +%s) - started)) s (last lines of $OUT/gpu-tests.log:)"
tail -n 6 "$OUT/gpu-tests.log"

model_args=()
for model in $MODELS; do model_args+=(--model "$model"); done
# shellcheck disable=SC2086  # BENCH_ARGS holds several flags
"$PYTHON" bench/gpu.py "${model_args[@]}" --time-budget "$BUDGET" --out "$OUT" --log-dir "$OUT/logs" \
    ${BENCH_ARGS:-}
echo "bench/gpu.py: exit $? after $(($(date +%s) - started)) s"
ls -l "$OUT"
