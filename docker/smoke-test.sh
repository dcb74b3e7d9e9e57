#!/usr/bin/env bash
# Docker smoke test (`make docker-smoke`; not part of `make test`): build the image and run it with
# docker compose + the CPU override, for real, on a host without GPU and without registry pulls.
#
#   1. local base image (debootstrap bookworm + python3, `docker import`), unless it exists
#   2. local inputs in docker/local/: the CPU torch wheel from this machine's disk, the CA bundle
#   3. docker compose build --build-arg BASE_IMAGE=<local base> --build-arg TORCH_SPEC=torch==<v>+cpu
#      (prints `docker image ls` for the image)
#   4. docker compose up -d with docker/docker-compose.cpu.yml; wait for the container to be healthy;
#      non-root user check; the sd extra (diffusers, transformers) imports in the container
#   5. POST /sample (Accept: image/png, and JSON) -> valid PNGs
#   6. start a long POST /sample, then `docker compose stop`: /readyz must stop answering 200, a new
#      POST /sample must get 503, the in-flight request must still succeed (drain), and the
#      container must exit with code 0
#   7. docker compose down (also on failure, unless SMOKE_KEEP=1)
#
# Needs: root or docker group, dockerd running (e.g. `dockerd --storage-driver=vfs &`), Docker
# Compose v2.24+ (`docker compose`), curl, python3; debootstrap only when the base image is missing.
# Knobs (environment): SMOKE_PORT (18000), SMOKE_PROJECT (kdiff-smoke), SMOKE_NO_CACHE=1 (cold
# build), SMOKE_KEEP=1 (leave the stack up), SMOKE_RESULTS=<file> (key=value timings and sizes),
# KDIFF_MODELS_DIR (host model store to mount, default ./model_store),
# KDIFF_BASE_IMAGE (kdiff-base:bookworm-py311), KDIFF_TORCH_WHEEL (path to the CPU torch wheel),
# TORCH_VERSION (2.13.0), SMOKE_HEALTH_TIMEOUT (300 s).
set -euo pipefail

cd "$(dirname "$0")/.."
ROOT=$PWD
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"
PROJECT="${SMOKE_PROJECT:-kdiff-smoke}"
PORT="${SMOKE_PORT:-18000}"
HEALTH_TIMEOUT="${SMOKE_HEALTH_TIMEOUT:-300}"
URL="http://127.0.0.1:${PORT}"
WORK="$(mktemp -d /tmp/kdiff-smoke.XXXXXX)"

export KDIFF_BASE_IMAGE="${KDIFF_BASE_IMAGE:-kdiff-base:bookworm-py311}"
export KDIFF_IMAGE="${KDIFF_IMAGE:-kdiffusion-service:cpu}"
export KDIFF_TORCH_SPEC="torch==${TORCH_VERSION}+cpu"
export KDIFF_TORCH_INDEX_URL=""          # the wheel comes from docker/local/wheels, not an index
export KDIFF_HOST_PORT="$PORT"
COMPOSE=(docker compose -p "$PROJECT" -f docker-compose.yml -f docker/docker-compose.cpu.yml)

T0=$(date +%s.%N)
declare -a RESULTS=()
now() { date +%s.%N; }
elapsed() { python3 -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$(now)"; }
log() { printf '[smoke %6ss] %s\n' "$(elapsed "$T0")" "$*"; }
fail() { log "FAIL: $*"; exit 1; }
record() { RESULTS+=("$1=$2"); log "$1 = $2"; }

container_id() { "${COMPOSE[@]}" ps -a -q kdiff 2>/dev/null | head -n1; }

cleanup() {
    local rc=$?
    if [[ $rc -ne 0 ]]; then
        log "logs of the service (last 60 lines):"
        "${COMPOSE[@]}" logs --no-color --tail 60 kdiff 2>/dev/null || true
    fi
    if [[ "${SMOKE_KEEP:-0}" == 1 ]]; then
        log "SMOKE_KEEP=1: leaving project $PROJECT as it is"
    else
        "${COMPOSE[@]}" down --remove-orphans --timeout 5 >/dev/null 2>&1 || true
    fi
    [[ -n "${CURL_PID:-}" ]] && kill "$CURL_PID" 2>/dev/null || true
    rm -rf "$WORK"
    if [[ $rc -eq 0 ]]; then log "PASS"; else log "FAILED (exit $rc)"; fi
}
trap cleanup EXIT

# --- 0. preflight --------------------------------------------------------------------------------
docker info >/dev/null 2>&1 || fail "no docker daemon (start one: dockerd --storage-driver=vfs &)"
docker compose version >/dev/null 2>&1 || fail "Docker Compose v2 (\`docker compose\`) is required"
command -v curl >/dev/null || fail "curl is required"
MODELS_DIR="${KDIFF_MODELS_DIR:-model_store}"   # mounted read-only into the container
[[ -f "$MODELS_DIR/digits/manifest.json" ]] || fail "$MODELS_DIR/digits/manifest.json missing (train the default model first)"
unreadable=$(find "$MODELS_DIR" ! -perm -o=r -print | head -n 3)
[[ -z "$unreadable" ]] || fail "the service runs as uid 10001 and cannot read: $unreadable (chmod -R a+rX $MODELS_DIR)"
"${COMPOSE[@]}" config --quiet || fail "compose files do not validate (Compose v2.24+ needed for !reset)"
log "docker $(docker version -f '{{.Server.Version}}'), $(docker compose version), project $PROJECT, port $PORT"

# --- 1. base image -------------------------------------------------------------------------------
t=$(now)
if docker image inspect "$KDIFF_BASE_IMAGE" >/dev/null 2>&1; then
    log "base image $KDIFF_BASE_IMAGE present"
    record base_image_build_s 0
else
    docker/build-base-image.sh "$KDIFF_BASE_IMAGE"
    record base_image_build_s "$(elapsed "$t")"
fi

# --- 2. local build inputs -----------------------------------------------------------------------
mkdir -p docker/local/wheels
shopt -s nullglob
wheels=(docker/local/wheels/torch-"${TORCH_VERSION}"+cpu-*.whl)
if [[ ${#wheels[@]} -eq 0 ]]; then
    src="${KDIFF_TORCH_WHEEL:-}"
    if [[ -z "$src" ]]; then
        for d in /opt/wheels ${PIP_FIND_LINKS:-}; do
            for f in "$d"/torch-"${TORCH_VERSION}"+cpu-*.whl; do src=$f; break 2; done
        done
    fi
    if [[ -n "$src" ]]; then
        cp "$src" docker/local/wheels/
    elif [[ -x .venv/bin/pip ]]; then  # the project venv's pip resolves torch from local disk here
        .venv/bin/pip download --no-deps -d docker/local/wheels "torch==${TORCH_VERSION}"
    fi
    wheels=(docker/local/wheels/torch-"${TORCH_VERSION}"+cpu-*.whl)
    [[ ${#wheels[@]} -gt 0 ]] || fail "no CPU torch ${TORCH_VERSION} wheel found (set KDIFF_TORCH_WHEEL)"
fi
log "torch wheel: ${wheels[0]}"
if [[ ! -f docker/local/ca.crt && -f /etc/ssl/certs/ca-certificates.crt ]]; then
    cp /etc/ssl/certs/ca-certificates.crt docker/local/ca.crt   # pip trusts the host's CAs in the builder
fi

# --- 3. build ------------------------------------------------------------------------------------
t=$(now)
# The build args are the CPU override's defaults made explicit: local base image, CPU torch wheel
# from docker/local/wheels (no index).
build_flags=(--build-arg "BASE_IMAGE=$KDIFF_BASE_IMAGE" --build-arg "TORCH_SPEC=$KDIFF_TORCH_SPEC"
             --build-arg "TORCH_INDEX_URL=")
[[ "${SMOKE_NO_CACHE:-0}" == 1 ]] && build_flags+=(--no-cache)
log "${COMPOSE[*]} build ${build_flags[*]} kdiff"
"${COMPOSE[@]}" build "${build_flags[@]}" kdiff
record build_s "$(elapsed "$t")"
docker image ls "${KDIFF_IMAGE%%:*}"
record image_size "$(docker image ls --format '{{.Size}}' "$KDIFF_IMAGE")"
size=$(docker image inspect -f '{{.Size}}' "$KDIFF_IMAGE")
record image_size_mb "$((size / 1000000))"

# --- 4. up, wait for healthy ---------------------------------------------------------------------
"${COMPOSE[@]}" down --remove-orphans --timeout 5 >/dev/null 2>&1 || true
t=$(now)
"${COMPOSE[@]}" up -d --no-build kdiff
cid=$(container_id)
[[ -n "$cid" ]] || fail "no container"
deadline=$(( $(date +%s) + HEALTH_TIMEOUT ))
while :; do
    status=$(docker inspect -f '{{if .State.Health}}{{.State.Health.Status}}{{end}}' "$cid")
    running=$(docker inspect -f '{{.State.Running}}' "$cid")
    [[ "$status" == healthy ]] && break
    [[ "$running" == true ]] || fail "container exited before becoming healthy"
    [[ "$status" == unhealthy ]] && fail "container unhealthy"
    (( $(date +%s) < deadline )) || fail "not healthy after ${HEALTH_TIMEOUT}s (status: $status)"
    sleep 2
done
record up_to_healthy_s "$(elapsed "$t")"
curl -fsS "$URL/readyz" >/dev/null || fail "/readyz not 200 from the host"
uid=$(docker exec "$cid" id -u)
[[ "$uid" != 0 ]] || fail "service runs as root"
docker exec "$cid" python -c "import diffusers, transformers; print('sd extra: diffusers', diffusers.__version__, 'transformers', transformers.__version__)" \
    || fail "the sd extra (diffusers, transformers) is not importable in the image"
log "healthy; runs as uid $uid; models: $(curl -fsS "$URL/models" | head -c 300)"

# --- 5. POST /sample -> PNG ----------------------------------------------------------------------
t=$(now)
body='{"model": "digits", "class_label": 7, "steps": 20, "seed": 1}'
code=$(curl -sS -o "$WORK/seven.png" -w '%{http_code}' -H 'Content-Type: application/json' \
            -H 'Accept: image/png' -d "$body" "$URL/sample")
[[ "$code" == 200 ]] || { cat "$WORK/seven.png"; echo; fail "POST /sample (image/png) -> HTTP $code"; }
python3 docker/check_png.py "$WORK/seven.png" || fail "/sample returned an invalid PNG"
record sample_png_s "$(elapsed "$t")"
code=$(curl -sS -o "$WORK/sample.json" -w '%{http_code}' -H 'Content-Type: application/json' \
            -d '{"model": "digits", "class_label": [1, 2], "n": 2, "steps": 10, "seed": [5, 6]}' "$URL/sample")
[[ "$code" == 200 ]] || { cat "$WORK/sample.json"; echo; fail "POST /sample (JSON) -> HTTP $code"; }
python3 docker/check_png.py --json "$WORK/sample.json" || fail "/sample JSON carries an invalid PNG"
[[ -n "${SMOKE_SAVE_PNG:-}" ]] && cp "$WORK/seven.png" "$SMOKE_SAVE_PNG"

# --- 6. SIGTERM drains an in-flight request and exits 0 -------------------------------------------
# Size the in-flight request from a timed probe so that it runs for about DRAIN_TARGET_S seconds:
# long enough to be in flight when SIGTERM arrives, well inside the drain timeout (20 s).
probe='{"model": "digits", "class_label": 3, "n": 4, "steps": 40, "sampler": "heun", "seed": 3}'
t=$(now)
curl -fsS -o /dev/null -H 'Content-Type: application/json' -d "$probe" "$URL/sample" || fail "probe request failed"
probe_s=$(elapsed "$t")
long_steps=$(python3 -c "import sys; print(max(40, min(500, int(40 * float(sys.argv[2]) / max(float(sys.argv[1]), 0.05)))))" \
             "$probe_s" "${DRAIN_TARGET_S:-6}")
log "probe (heun, 40 steps, n=4) took ${probe_s}s -> in-flight request: ${long_steps} steps"
long="{\"model\": \"digits\", \"class_label\": 3, \"n\": 4, \"steps\": ${long_steps}, \"sampler\": \"heun\", \"seed\": 2}"
t_req=$(now)
curl -sS -o "$WORK/inflight.png" -w '%{http_code}' -H 'Content-Type: application/json' \
     -H 'Accept: image/png' -d "$long" "$URL/sample" > "$WORK/inflight.code" 2>"$WORK/inflight.err" &
CURL_PID=$!
sleep 1
kill -0 "$CURL_PID" 2>/dev/null || fail "the long request finished before SIGTERM; make it longer"
t=$(now)
"${COMPOSE[@]}" stop kdiff > "$WORK/stop.log" 2>&1 &
STOP_PID=$!
# While draining, readiness must be off: poll until /readyz answers something other than 200.
ready_off=no
for _ in $(seq 1 40); do
    rc=$(curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$URL/readyz" || true)
    if [[ "$rc" != 200 ]]; then ready_off="yes (HTTP ${rc:-000})"; break; fi
    sleep 0.25
done
[[ "$ready_off" != no ]] || fail "/readyz still 200 after SIGTERM"
# ... and new work is refused with 503 while the in-flight request still runs.
new_work=$(curl -s -o /dev/null -w '%{http_code}' --max-time 5 -H 'Content-Type: application/json' \
                -d "$body" "$URL/sample" || true)
if kill -0 "$CURL_PID" 2>/dev/null; then
    [[ "$new_work" == 503 ]] || fail "POST /sample while draining -> HTTP $new_work, expected 503"
fi
wait "$STOP_PID" || { cat "$WORK/stop.log"; fail "docker compose stop failed"; }
record stop_s "$(elapsed "$t")"
wait "$CURL_PID" || true
CURL_PID=""
code=$(cat "$WORK/inflight.code")
record inflight_request_s "$(elapsed "$t_req")"
[[ "$code" == 200 ]] || { cat "$WORK/inflight.err" "$WORK/inflight.png" 2>/dev/null; echo; fail "in-flight request not drained: HTTP $code"; }
python3 docker/check_png.py "$WORK/inflight.png" || fail "drained request returned an invalid PNG"
exit_code=$(docker inspect -f '{{.State.ExitCode}}' "$cid")
oom=$(docker inspect -f '{{.State.OOMKilled}}' "$cid")
[[ "$exit_code" == 0 && "$oom" == false ]] || fail "container exit code $exit_code (OOMKilled $oom)"
log "in-flight request drained (HTTP 200, valid PNG); readiness off during drain: $ready_off; new work during drain: HTTP $new_work; exit code 0"
docker logs "$cid" 2>&1 | grep -iE 'drain|shutdown|signal' | tail -5 || true

record total_s "$(elapsed "$T0")"
if [[ -n "${SMOKE_RESULTS:-}" ]]; then printf '%s\n' "${RESULTS[@]}" > "$SMOKE_RESULTS"; fi
