"""bench/bench_gpu.py (the GPU suite, issue 28 §4) runs end to end on this CPU in its smoke mode: every
case builds its real-layout model, times it, and lands in the JSON and the markdown table, so the
script a GPU session runs is not first tried on the GPU. (Compilation is covered by
tests/models/test_compiled.py; here it would cost minutes of CPU compile time.)"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def test_gpu_suite_smoke_run_writes_every_case(tmp_path: Path) -> None:
    out, md = tmp_path / "gpu.json", tmp_path / "gpu.md"
    cmd = [sys.executable, str(REPO / "bench" / "bench_gpu.py"), "--smoke", "--device", "cpu", "--no-compile"]
    cmd += ["--iters", "1", "--out", str(out), "--md", str(md)]
    run = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    cases = {r["case"].split()[0] + " " + r["mode"].split()[0] for r in rows}
    assert {"sd15 eager", "sdxl eager", "flux eager", "sd15 ours", "sd15 diffusers", "sd15 kdiff"} <= cases
    assert not [r for r in rows if "error" in r or "skipped" in r]
    for r in rows:
        if r["mode"] == "eager":
            assert r["ms_per_call"] > 0 and r["tflops"] > 0 and r["first_call_s"] > 0
    service = next(r for r in rows if r["mode"].startswith("kdiff serve"))
    assert service["images"] > 0 and service["images_per_s"] > 0 and service["rows"] >= 1
    table = md.read_text()
    assert "SMOKE RUN" in table and table.count("\n| ") == len(rows) + 2  # header, rule, rows


# The Python packages of the lent GPU machines' image ('cuda'), as the device library's KINDS.md
# read them on a machine running it (2026-11-17). What the suite needs beyond them travels as
# wheels (bench/gpu_wheels.sh).
DEVICE_IMAGE = " ".join(
    (
        "absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs",
        "botorch build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy",
        "coverage cuda-bindings cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython",
        "diffrax e3nn einops equinox etils execnet filelock flatbuffers flax fonttools formulaic",
        "frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore httpx huggingface-hub humanize",
        "hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt jax-cuda13-plugin",
        "jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities",
        "linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl",
        "meson ml-dtypes mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind",
        "narwhals networkx ninja numba numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti",
        "nvidia-cuda-nvrtc nvidia-cuda-runtime nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile",
        "nvidia-curand nvidia-cusolver nvidia-cusparse nvidia-cusparselt-cu13 nvidia-ml-py",
        "nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx onnx-ir onnxruntime",
        "onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix orbax-checkpoint",
        "packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client",
        "propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks",
        "pyre-extensions pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist",
        "python-dateutil pytorch-lightning pyyaml regex requests rich sacrebleu safetensors",
        "scikit-build-core scikit-image scikit-learn scipy seaborn sentencepiece",
        "sentence-transformers setuptools shellingham simplejson six sortedcontainers statsmodels",
        "sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl tifffile",
        "tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics",
        "torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect",
        "urllib3 uvloop wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp",
    )
).split()


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def test_the_gpu_wheels_cover_what_the_device_image_lacks() -> None:
    """Every runtime dependency (and diffusers, the suite's reference) is in the device image or in the
    wheel list: a dependency added to pyproject.toml without a wheel would fail the first command of a GPU
    session. The whole set ran once in a venv holding only the image's packages (docs/BENCHMARKS.md)."""
    pyproject = (REPO / "pyproject.toml").read_text()
    deps = re.findall(
        r'^    "([^"]+)",', pyproject.split("\ndependencies = [", 1)[1].split("\n]", 1)[0], re.M
    )
    needed = [re.split(r"[<>=!~ ;\[]", dep, maxsplit=1)[0] for dep in deps] + ["diffusers"]
    assert "fastapi" in needed and "torch" in needed
    script = (REPO / "bench" / "gpu_wheels.sh").read_text()
    wheels = {_norm(n) for n in script.split('NAMES="', 1)[1].split('"', 1)[0].split()}
    image = {_norm(n) for n in DEVICE_IMAGE}
    assert len(image) == 197 and "torch" in image and "fastapi" not in image
    missing = [dep for dep in needed if _norm(dep) not in image | wheels]
    assert not missing, f"add to NAMES in bench/gpu_wheels.sh: {missing}"
