#!/bin/sh
# The wheels bench/gpu_suite.sh needs on the lent GPU machine (issue 28 §4), fetched here, before any
# device time is spent. That machine cannot reach PyPI; its image has PyTorch, transformers,
# huggingface_hub, numpy, scipy, httpx and the like (/work/.library/device/KINDS.md), but not the
# serving stack or diffusers. This downloads what is missing, as Python 3.12 manylinux wheels (the
# image's python3), into .whl/ (git-ignored), at the versions this checkout's .venv runs, so the GPU
# run uses the code the tests here passed with:
#   sh bench/gpu_wheels.sh          (here, from the repository root)
# then on the device machine carry .whl; bench/gpu_suite.sh installs it into /tmp/site by itself.
set -e
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
# Not in the device image: the service (FastAPI stack, settings, SSE, uploads, offline docs), the SDE
# noise (torchsde), diffusers (the reference pipeline), and what those need beyond the image. The
# small common ones (typing_extensions, anyio, click, h11, annotated-doc) go along at this venv's
# versions: the image's may be older than fastapi and pydantic accept.
NAMES="fastapi starlette pydantic pydantic_core pydantic-settings python-dotenv annotated-types
typing-inspection typing_extensions anyio annotated-doc click h11 opentelemetry-api importlib_metadata
lazy-importer zipp uvicorn websockets sse-starlette python-multipart fastapi_offline torchsde trampoline
diffusers"
PINS=$("$PY" - $NAMES <<'EOF'
import importlib.metadata as md
import sys
print(" ".join(f"{name}=={md.version(name)}" for name in sys.argv[1:]))
EOF
)
rm -rf .whl && mkdir .whl
# shellcheck disable=SC2086 # one argument per pin
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl $PINS
ls .whl
du -sh .whl  # a run carries at most 64 MiB of working tree and carried paths together
