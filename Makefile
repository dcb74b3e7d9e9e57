# The README's two commands are `make serve` and `make test`; both set up .venv first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: setup serve test lint sample bench clean docker-smoke soak browser redis

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install --quiet torch==2.13.0
	$(BIN)/pip install --quiet -e '.[dev,sd]'
	# k-diffusion is the tests' oracle only; --no-deps because its own requirements are heavy extras.
	$(BIN)/pip install --quiet --no-deps k-diffusion==0.1.1.post1
	touch $(STAMP)

# spandrel (PyPI, MIT) is the upscaler tests' oracle only, never the runtime path. --no-deps: its
# torchvision requirement would pull a CUDA torch; the two torchvision functions it imports belong to
# architectures the tests never load (tests/support/upscaler_files.py stands in for them).
# controlnet_aux (PyPI) is the OpenPose annotator tests' oracle only (its open_pose package loaded
# alone by tests/support/openpose_files.py); --no-deps: it requires every detector's stack (timm,
# torchvision, scikit-image); OpenCV headless needs only numpy; scikit-image (its hand estimator's
# connected regions) brings imageio, networkx, tifffile, lazy-loader.
ORACLES := $(VENV)/.oracles
$(ORACLES): $(STAMP) Makefile
	$(BIN)/pip install --quiet --no-deps spandrel==0.4.2 einops==0.8.2
	$(BIN)/pip install --quiet --no-deps controlnet-aux==0.0.10 opencv-python-headless==4.12.0.88
	$(BIN)/pip install --quiet scikit-image==0.26.0
	touch $(ORACLES)

setup: $(STAMP) $(ORACLES)

serve: $(STAMP)
	$(BIN)/kdiff serve --host $(HOST) --port $(PORT)

sample: $(STAMP)
	$(BIN)/kdiff sample --model digits --class-label 7 -o seven.png

lint: $(STAMP) $(ORACLES)
	$(BIN)/ruff check service tests bench
	$(BIN)/ruff format --check service tests bench
	$(BIN)/mypy

# The playground's browser test drives Debian's chromium (Playwright, from the dev extra, launches it
# by path: its own browser download is not used). Installed here when missing and run as root;
# otherwise the test fails naming this install line.
browser:
	@command -v chromium >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null; } || \
		echo "the browser tests need chromium: apt-get install -y chromium"

# The Redis job store's tests (tests/deploy) start Debian's redis-server themselves, on a free port.
# Installed here when missing and run as root; otherwise the tests fail naming this install line.
redis:
	@command -v redis-server >/dev/null || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server >/dev/null; } || \
		echo "the Redis job store tests need redis-server: apt-get install -y redis-server"

test: lint browser redis
	$(BIN)/python -m pytest -m "not slow" -p no:cacheprovider

# The reliability suite at full size (1,500 mixed requests at concurrency 64, 9,000-request RSS soak,
# 200 fuzz examples per operation); `make test` runs the same suite smaller.
soak: $(STAMP)
	KDIFF_SOAK=1 $(BIN)/python -m pytest tests/reliability -p no:cacheprovider -s

bench: $(STAMP)
	$(BIN)/python bench/bench_sampler_overhead.py

clean:
	rm -rf $(VENV) build *.egg-info

# Build the image and run it with docker compose + the CPU override, for real (not part of `test`):
# local base image, CPU torch wheel from local disk, healthy, POST /sample -> PNG, SIGTERM drain.
docker-smoke:
	docker/smoke-test.sh
