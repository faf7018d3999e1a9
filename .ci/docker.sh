#!/usr/bin/env bash
# The container part of CI, also behind `make image` and `make e2e`:
#   .ci/docker.sh daemon   start dockerd unless one answers (the caller stops it: `stop_daemon`)
#   .ci/docker.sh base     the Debian base image: debootstrap + docker import (reused when present)
#   .ci/docker.sh image    base, then the project image (BASE=debian; the layer cache makes reruns fast)
#   .ci/docker.sh e2e      the container tests (tests/test_container_*.py) against that image
#   .ci/docker.sh ci       all of CI's container part: install docker.io + debootstrap when missing, start
#                          dockerd (stopped at the end if started here), image, e2e; times in the log
# Machine facts it relies on: no image registry (so the base is built from Debian's packages), and a
# TLS-intercepting proxy whose CA is in this machine's bundle (given to the build as a secret, never a layer).
# Only loopback and host networking are used: builds run with --network host, tests reach loopback
# services with host networking.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian's docker.io client (/usr/bin/docker) has BuildKit built in; another client first on PATH may not.
DOCKER=${DOCKER:-$(command -v /usr/bin/docker || command -v docker)}
IMAGE=${IMAGE:-yolo-pipeline:local}
DEBIAN_BASE_IMAGE=${DEBIAN_BASE_IMAGE:-yolo-pipeline-base:bookworm}
CA_BUNDLE=${CA_BUNDLE:-/etc/ssl/certs/ca-certificates.crt}
DOCKERD_LOG=${DOCKERD_LOG:-/tmp/yolo-pipeline-dockerd.log}
PYTHON=${PYTHON:-.venv/bin/python}
export DOCKER IMAGE

log() { printf '[docker.sh %s] %s\n' "$(date +%H:%M:%S)" "$*" >&2; }

daemon_answers() { "$DOCKER" info >/dev/null 2>&1; }

# Start dockerd in the background when none answers; prints its pid (empty when one was already there).
start_daemon() {
  if daemon_answers; then
    log "dockerd already running: using it"
    return 0
  fi
  command -v dockerd >/dev/null || { log "dockerd not installed (apt-get install docker.io)"; return 1; }
  dockerd >"$DOCKERD_LOG" 2>&1 &
  local pid=$!
  for _ in $(seq 60); do
    if daemon_answers; then
      log "dockerd started (pid $pid, log $DOCKERD_LOG)"
      echo "$pid"
      return 0
    fi
    kill -0 "$pid" 2>/dev/null || break
    sleep 1
  done
  log "dockerd did not come up; last lines of $DOCKERD_LOG:"
  tail -20 "$DOCKERD_LOG" >&2
  return 1
}

# Stop a dockerd this script started (by its pid), waiting for it to exit.
stop_daemon() {
  local pid=${1:-}
  [ -n "$pid" ] || return 0
  kill "$pid" 2>/dev/null || return 0
  for _ in $(seq 30); do
    kill -0 "$pid" 2>/dev/null || { log "dockerd stopped"; return 0; }
    sleep 1
  done
  log "dockerd (pid $pid) still running after 30 s"
}

# The mirror apt is configured with here (deb822 or one-line sources), else Debian's CDN.
debian_mirror() {
  local uri
  uri=$(grep -hs -E '^(URIs:|deb )' /etc/apt/sources.list.d/*.sources /etc/apt/sources.list \
    | grep -E '/debian/?$|/debian ' | grep -v security | head -1 | sed -E 's/^URIs: *//; s/^deb (\[[^]]*\] )?//; s/ .*//')
  echo "${uri:-http://deb.debian.org/debian}"
}

build_base() {
  if "$DOCKER" image inspect "$DEBIAN_BASE_IMAGE" >/dev/null 2>&1; then
    log "base $DEBIAN_BASE_IMAGE present: reused"
    return 0
  fi
  command -v debootstrap >/dev/null || { log "debootstrap not installed (apt-get install debootstrap)"; return 1; }
  local rootfs start mirror
  rootfs=$(mktemp -d /tmp/yolo-pipeline-rootfs.XXXXXX)
  mirror=$(debian_mirror)
  start=$SECONDS
  log "debootstrap bookworm (minbase) from $mirror"
  debootstrap --variant=minbase bookworm "$rootfs" "$mirror" >"$rootfs.log" 2>&1 \
    || { tail -20 "$rootfs.log" >&2; rm -rf "$rootfs"; return 1; }
  # Same shape as the registry's debian:bookworm-slim: no apt lists, the mirror it came from.
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb
  tar -C "$rootfs" -c . | "$DOCKER" import --change 'CMD ["bash"]' - "$DEBIAN_BASE_IMAGE" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
  log "base $DEBIAN_BASE_IMAGE built in $((SECONDS - start)) s"
}

build_image() {
  build_base
  local start secret=()
  [ -s "$CA_BUNDLE" ] && secret=(--secret "id=ca,src=$CA_BUNDLE")
  start=$SECONDS
  log "building $IMAGE (BASE=debian on $DEBIAN_BASE_IMAGE)"
  local build_log=/tmp/yolo-pipeline-image-build.log
  # The plain progress goes to $build_log; the console gets one line per step (and the tail on failure).
  if ! DOCKER_BUILDKIT=1 "$DOCKER" build --network host --progress plain "${secret[@]}" \
    --build-arg BASE=debian \
    --build-arg "DEBIAN_BASE_IMAGE=$DEBIAN_BASE_IMAGE" \
    --build-arg "BASE_DIGEST=$("$DOCKER" image inspect -f '{{.Id}}' "$DEBIAN_BASE_IMAGE")" \
    --build-arg "GIT_SHA=$(git rev-parse HEAD 2>/dev/null || echo unknown)" \
    -t "$IMAGE" . >"$build_log" 2>&1; then
    tail -40 "$build_log" >&2
    log "image build failed (full log: $build_log)"
    return 1
  fi
  grep -E '^#[0-9]+ (\[|CACHED)' "$build_log" >&2 || true
  local cached steps
  cached=$(grep -cE '^#[0-9]+ CACHED' "$build_log" || true)
  steps=$(grep -cE '^#[0-9]+ \[' "$build_log" || true)
  log "image $IMAGE built in $((SECONDS - start)) s ($cached cached of $steps steps)"
}

run_e2e() {
  local start=$SECONDS rc=0
  log "container tests against $IMAGE"
  YOLO_PIPELINE_TEST_IMAGE=$IMAGE "$PYTHON" -m pytest tests/test_container_*.py -x -q -p no:cacheprovider --durations=0 || rc=$?
  log "container tests took $((SECONDS - start)) s (exit $rc)"
  return "$rc"
}

as_root() { if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi; }

run_ci() {
  local start=$SECONDS dockerd_pid
  if ! command -v dockerd >/dev/null || ! command -v debootstrap >/dev/null || [ ! -x /usr/bin/docker ]; then
    log "installing docker.io and debootstrap (Debian packages)"
    as_root apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      docker.io debootstrap >/dev/null
    export DOCKER=/usr/bin/docker
  fi
  dockerd_pid=$(start_daemon)
  # shellcheck disable=SC2064  # the pid is known now
  trap "stop_daemon '$dockerd_pid'" EXIT
  build_image
  run_e2e
  log "container part took $((SECONDS - start)) s"
}

case "${1:-}" in
  daemon) start_daemon ;;
  stop) stop_daemon "${2:-}" ;;
  base) build_base ;;
  image) build_image ;;
  e2e) run_e2e ;;
  ci) run_ci ;;
  *) echo "usage: $0 daemon|stop PID|base|image|e2e|ci" >&2; exit 2 ;;
esac
