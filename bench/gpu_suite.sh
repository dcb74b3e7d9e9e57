#!/bin/sh
# The GPU suite (issue 28 §4), for a session that is lent a device: SD1.5-, SDXL- and Flux-shaped
# models with random weights, eager vs torch.compile vs diffusers' pipeline, and the service at
# concurrency 32. Writes docs/bench_gpu.json and docs/bench_gpu.md; the Python script skips the points
# it has no time left for (--budget-s), and this wrapper stops it at 8 minutes whatever happens.
#   sh bench/gpu_wheels.sh           (here, first: the wheels the device image lacks, into .whl/)
#   sh bench/gpu_suite.sh            (on the device machine, from the repository root, carrying .whl)
set -e
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
# the packages the device image lacks (fetched beforehand by bench/gpu_wheels.sh, carried as .whl)
if ls .whl/*.whl >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}  # kdiff serve, started by the suite, inherits it
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
timeout 480 "$PY" bench/bench_gpu.py --device cuda --budget-s 420 --out docs/bench_gpu.json --md docs/bench_gpu.md "$@"
