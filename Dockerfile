# kdiffusion-service image: `kdiff serve` on port 8000 with the shipped default model.
#
# GPU host (default base, torch 2.13.0 from PyPI with its bundled CUDA libraries):
#   docker compose build            # or: docker build -t kdiffusion-service .
# CPU-only / offline-registry host (see docker/smoke-test.sh, which does all of this):
#   docker/build-base-image.sh kdiff-base:bookworm-py311
#   cp /path/to/torch-2.13.0+cpu-*.whl docker/local/wheels/
#   docker build --build-arg BASE_IMAGE=kdiff-base:bookworm-py311 \
#                --build-arg TORCH_SPEC=torch==2.13.0+cpu -t kdiffusion-service:cpu .
#
# Build arguments:
#   BASE_IMAGE   any Debian/Ubuntu image; python3 (>= 3.11, with venv) is apt-installed when absent.
#                The default is a CUDA runtime image. torch wheels from PyPI bundle their own CUDA
#                libraries, so a `-base-` CUDA tag works as well and is smaller.
#   TORCH_SPEC   pip requirement for torch; pinned because an unpinned torch may resolve to another
#                build. `torch==2.13.0+cpu` selects a CPU wheel dropped into docker/local/wheels/.
#   TORCH_INDEX_URL  extra index for torch only, e.g. https://download.pytorch.org/whl/cpu for
#                `torch==2.13.0+cpu` on a CPU host without a local wheel.
#   EXTRAS       optional extras of the package; "sd" adds diffusers + transformers (Stable Diffusion).
#
# docker/local/ (git-ignored, allowed by .dockerignore) may hold:
#   wheels/*.whl  local wheels pip may use (--find-links); for torch only when TORCH_SPEC carries a
#                 local version label such as +cpu
#   ca.crt        CA bundle for pip in the *builder* stage only (TLS-intercepting proxies); it never
#                 reaches the runtime image.

ARG BASE_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS builder
ARG TORCH_SPEC="torch==2.13.0"
ARG TORCH_INDEX_URL=""
ARG EXTRAS="sd"
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_DEFAULT_TIMEOUT=180 \
    PYTHONDONTWRITEBYTECODE=1 \
    DEBIAN_FRONTEND=noninteractive

# python3 + venv only where the base image lacks them (CUDA images ship no Python).
RUN if ! python3 -c 'import venv, ensurepip, tomllib' >/dev/null 2>&1; then \
        apt-get update && \
        apt-get install -y --no-install-recommends python3 python3-venv ca-certificates && \
        rm -rf /var/lib/apt/lists/*; \
    fi && \
    python3 -m venv /opt/venv

COPY docker/local/ /tmp/local/

# torch first, on its own layer (the largest and slowest to change). Local wheels are offered only
# for a spec with a local version label (torch==2.13.0+cpu): `torch==2.13.0` also matches
# 2.13.0+cpu, and a CPU wheel left in docker/local/wheels must never end up in the GPU image.
RUN if [ -f /tmp/local/ca.crt ]; then export PIP_CERT=/tmp/local/ca.crt; fi && \
    mkdir -p /tmp/local/wheels && \
    case "${TORCH_SPEC}" in *+*) links="--find-links /tmp/local/wheels" ;; *) links="" ;; esac && \
    /opt/venv/bin/pip install $links \
        ${TORCH_INDEX_URL:+--extra-index-url "$TORCH_INDEX_URL"} "${TORCH_SPEC}" && \
    /opt/venv/bin/python -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda)"

# Then the package's dependencies, read from pyproject.toml so that editing code reuses this layer.
COPY pyproject.toml README.md /src/
RUN if [ -f /tmp/local/ca.crt ]; then export PIP_CERT=/tmp/local/ca.crt; fi && \
    /opt/venv/bin/python -c "import sys, tomllib; \
p = tomllib.load(open('/src/pyproject.toml', 'rb'))['project']; \
extras = [e for e in sys.argv[1].split(',') if e]; \
reqs = p['dependencies'] + [r for e in extras for r in p['optional-dependencies'][e]]; \
open('/tmp/requirements.txt', 'w').write('\n'.join(reqs) + '\n')" "${EXTRAS}" && \
    cat /tmp/requirements.txt && \
    /opt/venv/bin/pip install --find-links /tmp/local/wheels -r /tmp/requirements.txt

# Finally the package itself (no dependency resolution: everything is already installed).
COPY service/ /src/service/
RUN if [ -f /tmp/local/ca.crt ]; then export PIP_CERT=/tmp/local/ca.crt; fi && \
    /opt/venv/bin/pip install --no-deps /src && \
    /opt/venv/bin/pip check && \
    /opt/venv/bin/kdiff --help >/dev/null && \
    find /opt/venv -name '__pycache__' -prune -exec rm -rf {} +

# ---------------------------------------------------------------------------------------------
# Small files, staged with their final modes so the runtime stage takes them in one layer (every
# layer is a full copy of the filesystem with the vfs storage driver).
FROM ${BASE_IMAGE} AS files
# The shipped default model; world-readable whatever its mode on the build host (the service runs
# as uid 10001). User models are mounted over it (docker-compose.yml mounts ./model_store).
COPY model_store/ /stage/opt/kdiff/model_store/
COPY docker/entrypoint.sh /stage/usr/local/bin/kdiff-entrypoint
COPY docker/healthcheck.py /stage/usr/local/bin/kdiff-healthcheck
RUN chmod -R u=rwX,go=rX /stage/opt/kdiff && \
    chmod 0755 /stage/usr/local/bin/kdiff-entrypoint /stage/usr/local/bin/kdiff-healthcheck

# ---------------------------------------------------------------------------------------------
FROM ${BASE_IMAGE} AS runtime
ENV DEBIAN_FRONTEND=noninteractive
RUN if ! command -v python3 >/dev/null 2>&1; then \
        apt-get update && \
        apt-get install -y --no-install-recommends python3 ca-certificates && \
        rm -rf /var/lib/apt/lists/*; \
    fi && \
    groupadd --system --gid 10001 kdiff && \
    useradd --system --uid 10001 --gid kdiff --create-home --home-dir /home/kdiff \
            --shell /usr/sbin/nologin kdiff && \
    install -d -o kdiff -g kdiff /var/lib/kdiff/state

COPY --from=files /stage/ /
COPY --from=builder /opt/venv /opt/venv

# HF_HUB_OFFLINE: Stable Diffusion models load from the mounted store only, never from the Hub
# (set it to 0 in the environment to allow downloads of missing tokenizer/config files).
ENV PATH=/opt/venv/bin:${PATH} \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HOME=/home/kdiff/.cache/huggingface \
    HF_HUB_OFFLINE=1 \
    KDIFF_MODEL_STORE=/opt/kdiff/model_store \
    KDIFF_HOST=0.0.0.0 \
    KDIFF_PORT=8000 \
    KDIFF_DRAIN_TIMEOUT_S=20

USER kdiff
WORKDIR /home/kdiff
EXPOSE 8000
STOPSIGNAL SIGTERM
# /readyz: models loaded and not draining. start-period covers model loading.
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD ["kdiff-healthcheck"]
ENTRYPOINT ["kdiff-entrypoint"]
CMD ["serve"]
