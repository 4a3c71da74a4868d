#!/usr/bin/env bash
# Download into .whl/ the wheels bench/gpu.py needs on the GPU machine, which has Python 3.12 and
# torch (2.11, CUDA 13) but not the worker's stack, and no network. Versions are this repo's
# .venv's, so the GPU run uses what the tests here use. torch is not included: the machine's own
# is used. Packages the machine already has in a compatible version (numpy, pillow, pyyaml, regex,
# requests, tqdm, packaging, filelock, click, accelerate, ...) are not included either.
#
#   bench/gpu_wheels.sh                      # then, on the device (carry .whl):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
#       --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:worker && \
#       python3 bench/gpu.py --all --out $OUT
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-.venv/bin/python}
DEST=${DEST:-.whl}
PACKAGES=(
    # the pipelines (transformers checks regex's version at import; huggingface-hub imports httpx2)
    diffusers transformers huggingface-hub hf-xet tokenizers safetensors regex importlib-metadata zipp
    lazy-importer httpx2 httpcore2 truststore idna
    # the worker's HTTP layer and settings (fastapi imports opentelemetry-api)
    fastapi starlette uvicorn h11 anyio pydantic pydantic-core pydantic-settings python-dotenv
    typing-extensions typing-inspection annotated-types annotated-doc opentelemetry-api
    prometheus-client fsspec isal
    # the benchmark's client
    httpx httpcore
    # the opt-in GPU tests (python3 -m pytest -m gpu tests/gpu) after the benchmark
    pytest pluggy iniconfig pygments pytest-timeout
)

pins=()
for name in "${PACKAGES[@]}"; do
    version=$("$PYTHON" -c 'import sys; from importlib.metadata import version; print(version(sys.argv[1]))' "$name")
    pins+=("$name==$version")
    # Two versions of one package stop the whole install on the device: drop other versions.
    stem=$(echo "$name" | tr '[:upper:]-' '[:lower:]_')
    for wheel in "$DEST/$stem"-*.whl; do
        [[ -e $wheel && $(basename "$wheel") != "$stem-$version-"* ]] && rm -v "$wheel"
    done
done

"$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d "$DEST" "${pins[@]}"

ls -1 "$DEST"/*.whl
du -ch "$DEST"/*.whl | tail -n 1
if ! git check-ignore -q "$DEST/x.whl"; then
    echo "warning: $DEST/ is not git-ignored; it would travel with every device call." \
        "Ignore it locally: echo /$DEST/ >> .git/info/exclude" >&2
fi
