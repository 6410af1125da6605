#!/usr/bin/env bash
# `make compose-smoke`: docker-compose.yml run for real. Builds the images (the Debian base locally
# when no registry answers), checks what the service image holds, starts redis + api + worker,
# waits for health, runs one /predict and one /adapt to a new active version
# (scripts/compose_smoke.py), prints the timings and tears the stack down, on failure too.
# With --scale (`make compose-scale`): 2 API replicas (each on a host port of its own) and 2 workers
# sharing the model store and Redis; traffic to both replicas while an /adapt job runs and the
# worker that took it is killed (scripts/compose_scale.py; docs/service.md, "Several replicas").
#
# Needs a Docker engine, docker compose (the v2 plugin or docker-compose), the venv (make install)
# and MNIST in $CAMA_DATA_DIR (default ./data, training.data); to build the base, root and mmdebstrap.
# Settings: BASE_IMAGE (skip the registry probe and use this base), SKIP_BUILD=1 (use the images
# of an earlier run), SMOKE_ARGS (passed to the
# client, e.g. "--n 500 --manipulation rotation --level 30"), CAMA_PORT (default: a free port).
# The CPU torch wheel comes from pip's configured find-links directories (or WHEEL_DIRS).
set -euo pipefail
cd "$(dirname "$0")/.."
SCALE=0
if [ "${1:-}" = "--scale" ]; then SCALE=1; fi
PY="${PY:-.venv/bin/python}"
export COMPOSE_PROJECT_NAME="${COMPOSE_PROJECT_NAME:-cama-smoke-$$}"
API_REPLICAS=1
WORKERS=1
if [ "$SCALE" = 1 ]; then
    API_REPLICAS=2
    WORKERS=2
    CAMA_PORT=""  # each replica on a free host port (docker-compose.yml: ${CAMA_PORT-8000})
fi
export CAMA_IMAGE_TAG="${CAMA_IMAGE_TAG:-smoke}"
CAMA_TOKEN="$("$PY" -c 'import secrets; print(secrets.token_hex(24))')"
REDIS_PASSWORD="$("$PY" -c 'import secrets; print(secrets.token_hex(24))')"
if [ "$SCALE" = 0 ]; then
    CAMA_PORT="${CAMA_PORT:-$("$PY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
fi
export CAMA_TOKEN REDIS_PASSWORD CAMA_PORT
LOG_DIR=logs/compose_smoke
mkdir -p "$LOG_DIR"

if docker compose version >/dev/null 2>&1; then
    compose() { docker compose "$@"; }
elif command -v docker-compose >/dev/null; then
    compose() { docker-compose "$@"; }
else
    echo "docker compose is missing (apt-get install docker-compose)" >&2
    exit 1
fi
docker info >/dev/null || { echo "no Docker engine answers (start dockerd)" >&2; exit 1; }
"$PY" -c 'from training.data import load_mnist; load_mnist()' || exit 1  # the client's batch, before building

START=$EPOCHREALTIME
since() { awk -v a="$1" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.1f", b - a }'; }
staged=()
teardown() {
    local status=$?
    if [ "$status" -ne 0 ]; then
        compose logs --no-color --tail=60 2>/dev/null || true
    fi
    compose down --volumes --remove-orphans >/dev/null 2>&1 || true
    if [ "${#staged[@]}" -gt 0 ]; then rm -f "${staged[@]}"; fi
    if [ "$status" -eq 0 ]; then
        echo "compose-smoke: passed in $(since "$START") s"
    else
        echo "compose-smoke: FAILED (exit $status) after $(since "$START") s; build log in $LOG_DIR" >&2
    fi
}
trap teardown EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# 1. the base: the registry's when it answers, else one built here
if [ -z "${BASE_IMAGE:-}" ]; then
    if timeout 120 docker pull -q python:3.11-slim-bookworm >/dev/null 2>&1 \
        && timeout 120 docker pull -q debian:bookworm-slim >/dev/null 2>&1; then
        echo "base: python:3.11-slim-bookworm and debian:bookworm-slim from the registry"
    else
        export BASE_IMAGE=cama-base:bookworm
        if docker image inspect "$BASE_IMAGE" >/dev/null 2>&1; then
            echo "base: no registry; $BASE_IMAGE already built here"
        else
            t=$EPOCHREALTIME
            scripts/docker_base.sh "$BASE_IMAGE" >"$LOG_DIR/base.log" 2>&1 || { tail -20 "$LOG_DIR/base.log" >&2; exit 1; }
            echo "base: no registry; built $BASE_IMAGE with mmdebstrap in $(since "$t") s"
        fi
    fi
else
    echo "base: $BASE_IMAGE"
fi

# 2. a CPU-only torch from pip's find-links directories, so that the image carries no CUDA
wheel_dirs="${WHEEL_DIRS:-${PIP_FIND_LINKS:-$("$PY" -m pip config get global.find-links 2>/dev/null || true)}}"
for dir in $wheel_dirs; do
    dir="${dir#file://}"
    [ -d "$dir" ] || continue
    for wheel in "$dir"/torch-*+cpu-*.whl; do
        [ -e "$wheel" ] || continue
        target="wheels/$(basename "$wheel")"
        if [ ! -e "$target" ]; then
            ln "$wheel" "$target" 2>/dev/null || cp "$wheel" "$target"
            staged+=("$target")
        fi
        echo "wheels: $(basename "$wheel") from $dir"
    done
done

# 3. build both images (SKIP_BUILD=1: use the images an earlier run built under this tag)
t=$EPOCHREALTIME
if [ "${SKIP_BUILD:-0}" = 1 ]; then
    echo "build: skipped; cama-serve:$CAMA_IMAGE_TAG built $(docker image inspect -f '{{.Created}}' "cama-serve:$CAMA_IMAGE_TAG")"
else
    compose build >"$LOG_DIR/build.log" 2>&1 || { tail -40 "$LOG_DIR/build.log" >&2; exit 1; }
    echo "build: cama-serve:$CAMA_IMAGE_TAG and cama-redis:$CAMA_IMAGE_TAG in $(since "$t") s"
fi

# 4. what the service image holds: the service imports (no connection is made at import), no
#    training extra, no CUDA wheels on CPU
docker run --rm -e CAMA_REDIS_URL=redis://redis:6379/0 "cama-serve:$CAMA_IMAGE_TAG" python -c '
import importlib.metadata as md, os, sys
import app.main, worker.tasks, torch
names = {d.metadata["Name"].lower() for d in md.distributions()}
train = sorted({"matplotlib", "pandas", "pyarrow", "tqdm"} & (names | set(sys.modules)))
cuda = sorted(n for n in names if n.startswith("nvidia-"))
print(f"image: torch {torch.__version__}; import app.main, worker.tasks: ok; "
      f"training extra: {train or None}; CUDA wheels: {cuda or None}")
sys.exit(1 if train or (cuda and os.environ.get("DEVICE", "cpu") == "cpu") else 0)
'

# 5. start and wait until every container of every service is healthy
t=$EPOCHREALTIME
compose up -d --scale "api=$API_REPLICAS" --scale "worker=$WORKERS" >"$LOG_DIR/up.log" 2>&1 \
    || { cat "$LOG_DIR/up.log" >&2; exit 1; }
declare -A want=([redis]=1 [api]=$API_REPLICAS [worker]=$WORKERS)
for _ in $(seq 1 150); do
    health="$(for s in redis api worker; do
        ids="$(compose ps -q "$s")"
        [ "$(echo "$ids" | grep -c .)" -eq "${want[$s]}" ] || { printf '%s=missing ' "$s"; continue; }
        for id in $ids; do printf '%s=%s ' "$s" "$(docker inspect -f '{{.State.Health.Status}}' "$id")"; done
    done)"
    case "$health" in *starting* | *missing*) sleep 2 ;; *) break ;; esac
done
case "$health" in
    *unhealthy* | *starting* | *missing*) echo "health: $health" >&2; exit 1 ;;
esac
echo "healthy: redis, api x $API_REPLICAS, worker x $WORKERS in $(since "$t") s after up ($health)"

if [ "$SCALE" = 1 ]; then
    # 6'. traffic to both replicas, an /adapt job, its worker killed (scripts/compose_scale.py)
    urls=""
    for id in $(compose ps -q api); do urls="$urls${urls:+,}http://$(docker port "$id" 8000 | head -1)"; done
    workers="$(compose ps -q worker | paste -sd, -)"
    t=$EPOCHREALTIME
    # shellcheck disable=SC2086  # SMOKE_ARGS is a list of arguments
    "$PY" scripts/compose_scale.py --urls "$urls" --workers "$workers" --token "$CAMA_TOKEN" ${SMOKE_ARGS:-}
    echo "client: traffic, adapt, kill and swap in $(since "$t") s"
    exit 0
fi

# 6. one /predict and one /adapt through the published port
t=$EPOCHREALTIME
# shellcheck disable=SC2086  # SMOKE_ARGS is a list of arguments
"$PY" scripts/compose_smoke.py --url "http://127.0.0.1:$CAMA_PORT" --token "$CAMA_TOKEN" ${SMOKE_ARGS:-}
echo "client: predict, adapt and follow-up in $(since "$t") s"
