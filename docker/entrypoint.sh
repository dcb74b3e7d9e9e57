#!/bin/sh
# Container entrypoint (installed as /usr/local/bin/kdiff-entrypoint).
#
#   (no args) | serve [FLAGS]   exec `kdiff serve` on $KDIFF_HOST:$KDIFF_PORT; extra FLAGS are appended
#   -FLAG ...                   same, FLAGS appended to `kdiff serve`
#   sample|train|eval|bench ... exec that kdiff subcommand (e.g. `docker run IMAGE sample --help`)
#   anything else               exec it as a program (e.g. `docker run -it IMAGE bash`)
#
# `exec` keeps kdiff as the process that receives SIGTERM from `docker stop` / `docker compose stop`
# (directly, or forwarded by the init process when compose sets `init: true`). On SIGTERM the
# server reports not-ready on /readyz, answers new work with 503, lets running jobs finish for at
# most $KDIFF_DRAIN_TIMEOUT_S seconds (default 20), closes connections (uvicorn allows 5 s more) and
# exits 0. Keep the container stop timeout (compose `stop_grace_period`, `docker stop -t`) above
# KDIFF_DRAIN_TIMEOUT_S + 5, or Docker sends SIGKILL first. All other settings are read by kdiff
# itself from KDIFF_* variables (service/api/settings.py).
set -eu

serve() {
    exec kdiff serve \
        --host "${KDIFF_HOST:-0.0.0.0}" \
        --port "${KDIFF_PORT:-8000}" \
        --drain-timeout "${KDIFF_DRAIN_TIMEOUT_S:-20}" \
        "$@"
}

if [ "$#" -eq 0 ]; then
    serve
fi
case "$1" in
    serve) shift; serve "$@" ;;
    -*) serve "$@" ;;
    sample|train|eval|bench) exec kdiff "$@" ;;
    *) exec "$@" ;;
esac
