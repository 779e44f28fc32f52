#!/usr/bin/env bash
# Build the Dockerfile without Docker, start the image and check it end to end:
#   1. a Debian bookworm root filesystem (debootstrap minbase + python3, python3-venv),
#      imported as the local base image localhost/apcm-base:bookworm;
#   2. `buildah bud` of the unchanged Dockerfile with that base as PYTHON_IMAGE,
#      chroot isolation and vfs storage (no daemon, no overlay, no user namespaces);
#   3. torch from the source this machine's pip uses (a pip download into a local
#      PEP 503 index, bind-mounted into the build as TORCH_INDEX), the rest from PyPI;
#   4. the image run as a buildah working container (chroot isolation, host network:
#      podman cannot start containers here, see docs/deploy.md), its own HEALTHCHECK
#      until SERVING, one Compress/Decompress round trip through
#      apcm.client.MemoryClient, then SIGTERM and a clean exit.
#
#   sudo scripts/build_image.sh        (from anywhere; needs root)
#
# Needs: root; apt-get install debootstrap buildah; the repository .venv
# (`make install`) for the client and the pip download. Everything it creates lives
# under $APCM_IMAGE_CACHE (default /var/tmp/apcm-image: the base rootfs, the torch
# index, its own container storage), so a second run reuses the base and the layers.
#
# Env: APCM_IMAGE_CACHE, DEBIAN_MIRROR (default: the host's deb.debian.org mirror),
# TORCH_VERSION (2.13.0), TORCH_INDEX (set it to skip the local index and use a
# reachable one, e.g. https://download.pytorch.org/whl/cpu), IMAGE (apcm:check),
# APCM_CHECK_PORT (gRPC port on the host network, default 50071), SERVING_TIMEOUT_S (180),
# SKIP_BUILD=1 (check the image built before without rebuilding it).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV_BIN=${VENV_BIN:-$ROOT/.venv/bin}
CACHE=${APCM_IMAGE_CACHE:-/var/tmp/apcm-image}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
BASE=localhost/apcm-base:$SUITE
IMAGE=${IMAGE:-apcm:check}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
PORT=${APCM_CHECK_PORT:-50071}
METRICS_PORT=$((PORT + 1))
SERVING_TIMEOUT_S=${SERVING_TIMEOUT_S:-180}
NAME=apcm-check-$$

step() { printf '\n== %s\n' "$*"; }
die() { echo "build_image: $*" >&2; exit 1; }

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, buildah with chroot isolation)"
for tool in debootstrap buildah; do
  command -v "$tool" >/dev/null || die "$tool missing: apt-get install debootstrap buildah"
done
[ -x "$VENV_BIN/python" ] || die "no $VENV_BIN/python: run make install first"

mkdir -p "$CACHE"
# Container storage of our own: vfs (plain copies, no overlay mounts), chroot isolation.
STORE=(--root "$CACHE/storage" --runroot "$CACHE/run" --storage-driver vfs)
export BUILDAH_ISOLATION=chroot
bah() { buildah "${STORE[@]}" "$@"; }

step "base image $BASE (debootstrap $SUITE from $MIRROR)"
if bah inspect --type image "$BASE" >/dev/null 2>&1; then
  echo "cached"
else
  if [ ! -f "$CACHE/rootfs/.complete" ]; then
    rm -rf "$CACHE/rootfs"
    debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates \
      "$SUITE" "$CACHE/rootfs" "$MIRROR" > "$CACHE/debootstrap.log" 2>&1 \
      || { tail -20 "$CACHE/debootstrap.log"; die "debootstrap failed"; }
    rm -rf "$CACHE"/rootfs/var/cache/apt/archives/*.deb "$CACHE"/rootfs/var/lib/apt/lists/*
    touch "$CACHE/rootfs/.complete"
  fi
  ctr=$(bah from scratch)
  mnt=$(bah mount "$ctr")
  tar -C "$CACHE/rootfs" --exclude=./.complete -cf - . | tar -C "$mnt" -xpf -
  bah umount "$ctr" >/dev/null
  bah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --cmd /bin/bash "$ctr"
  bah commit --quiet --rm "$ctr" "$BASE" >/dev/null
fi

build_args=(--build-arg "PYTHON_IMAGE=$BASE" --build-arg "TORCH_VERSION=$TORCH_VERSION")
volumes=()
if [ -n "${TORCH_INDEX:-}" ]; then
  build_args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
else
  step "torch $TORCH_VERSION from this machine's pip sources, as a local index"
  index="$CACHE/torch-index"
  if ! ls "$index/files"/torch-"$TORCH_VERSION"[-+]*.whl >/dev/null 2>&1; then
    rm -rf "$index"
    "$VENV_BIN/python" -m pip download -q --only-binary=:all: --dest "$index/files" \
      "torch==$TORCH_VERSION"
  fi
  # PEP 503: simple/<normalized name>/index.html linking each wheel.
  "$VENV_BIN/python" - "$index" <<'PY'
import hashlib, re, sys
from pathlib import Path
index = Path(sys.argv[1])
projects: dict[str, list[Path]] = {}
for wheel in sorted((index / "files").glob("*.whl")):
    name = re.sub(r"[-_.]+", "-", wheel.name.split("-")[0]).lower()
    projects.setdefault(name, []).append(wheel)
for name, wheels in projects.items():
    page = index / "simple" / name / "index.html"
    page.parent.mkdir(parents=True, exist_ok=True)
    links = "".join(
        f'<a href="../../files/{w.name}#sha256={hashlib.sha256(w.read_bytes()).hexdigest()}">'
        f"{w.name}</a>\n" for w in wheels)
    page.write_text(f"<!DOCTYPE html><html><body>\n{links}</body></html>\n")
print(f"{len(projects)} projects: {', '.join(sorted(projects))}")
PY
  volumes=(--volume "$index:/torch-index:ro")
  build_args+=(--build-arg "TORCH_INDEX=file:///torch-index/simple")
fi

# The RUN steps share the host network (chroot isolation). Where this machine's pip
# trusts an extra CA (an egress proxy: `pip config get global.cert`, or PIP_CERT),
# the build's pip gets the same bundle through bind mounts that stay out of the image
# (an empty /etc/pip.conf mount point is all that is left behind).
ca=${BUILD_CA_BUNDLE:-${PIP_CERT:-$("$VENV_BIN/python" -m pip config get global.cert 2>/dev/null || true)}}
if [ -n "$ca" ] && [ -f "$ca" ]; then
  printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$CACHE/pip.conf"
  volumes+=(--volume "$CACHE/pip.conf:/etc/pip.conf:ro"
            --volume "$(readlink -f "$ca"):/etc/ssl/certs/ca-certificates.crt:ro")
  echo "build trusts $ca (pip and openssl)"
fi

step "buildah bud -t $IMAGE (chroot isolation, vfs storage)"
start=$(date +%s)
if [ -n "${SKIP_BUILD:-}" ] && bah inspect --type image "$IMAGE" >/dev/null 2>&1; then
  echo "SKIP_BUILD set: checking the image built before"
else
  # --format docker keeps HEALTHCHECK (the OCI image config has no such field).
  bah bud --isolation chroot --format docker --layers --pull=false \
    "${build_args[@]}" "${volumes[@]}" -t "$IMAGE" -f Dockerfile .
fi
build_s=$(($(date +%s) - start))
size=$(bah images --format '{{.Size}}' "$IMAGE")
echo "built in ${build_s} s: $IMAGE $size"

# `podman run` cannot start containers here (crun 1.8: "cgroups in hybrid mode not
# supported, drop all controllers from cgroupv2"; see docs/deploy.md), so the image runs
# the way its RUN steps did: a buildah working container, chroot isolation, host network.
# The command, user, working directory and environment are the image's own.
step "run $IMAGE (buildah run, chroot isolation, host network: gRPC :$PORT, metrics :$METRICS_PORT)"
bah rm "$NAME" >/dev/null 2>&1 || true
descendants() { local c; for c in $(ps -o pid= --ppid "$1"); do echo "$c"; descendants "$c"; done; }
cleanup() {
  if [ -n "${runner:-}" ] && kill -0 "$runner" 2>/dev/null; then
    kill $(descendants "$runner") "$runner" 2>/dev/null || true
    wait "$runner" 2>/dev/null || true
  fi
  bah rm "$NAME" >/dev/null 2>&1 || true
}
trap cleanup EXIT
start=$(date +%s)
bah from --quiet --name "$NAME" "$IMAGE" >/dev/null
echo "working container in $(($(date +%s) - start)) s (vfs copies the image)"
entry=$(bah inspect --format '{{range .Docker.Config.Entrypoint}}{{.}} {{end}}{{range .Docker.Config.Cmd}}{{.}} {{end}}' "$NAME")
health=$(bah inspect --format '{{range .Docker.Config.Healthcheck.Test}}{{.}} {{end}}' "$NAME")
[ "${health%% *}" = CMD ] || die "the image has no exec-form HEALTHCHECK: '$health'"
health=${health#CMD }
env=(-e "APCM_GRPC_PORT=$PORT" -e "APCM_METRICS_PORT=$METRICS_PORT" -e APCM_HOST=127.0.0.1)
start=$(date +%s)
# shellcheck disable=SC2086  # the image's entrypoint and cmd, word-split on purpose
bah run --isolation chroot --network host "${env[@]}" "$NAME" -- $entry \
  > "$CACHE/server.log" 2>&1 &
runner=$!
echo "$entry(log: $CACHE/server.log)"

step "the image's HEALTHCHECK ($health) until SERVING (at most ${SERVING_TIMEOUT_S} s)"
# shellcheck disable=SC2086
until bah run --isolation chroot --network host "${env[@]}" "$NAME" -- $health \
    >/dev/null 2>"$CACHE/health.err"; do
  if ! kill -0 "$runner" 2>/dev/null; then
    tail -30 "$CACHE/server.log"
    die "the server exited before SERVING"
  fi
  if [ $(($(date +%s) - start)) -ge "$SERVING_TIMEOUT_S" ]; then
    tail -30 "$CACHE/server.log"; cat "$CACHE/health.err"
    die "not SERVING after $SERVING_TIMEOUT_S s"
  fi
  sleep 2
done
serving_s=$(($(date +%s) - start))
echo "SERVING ${serving_s} s after start"

step "Compress/Decompress round trip through apcm.client.MemoryClient"
"$VENV_BIN/python" - "127.0.0.1:$PORT" <<'PY'
import sys

import numpy as np

from apcm.client import MemoryClient

with MemoryClient(sys.argv[1]) as client:
    client.wait_until_serving(timeout=30)
    info = client.model_info()
    x = np.random.default_rng(0).standard_normal((2, *info.input_shape)).astype(np.float32)
    codes = client.compress(x)
    y = client.decompress(codes)
    assert y.shape == x.shape, (y.shape, x.shape)
    print(f"model {info.name}: input {tuple(info.input_shape)} float32 -> codes "
          f"{codes.shape} {codes.dtype} -> decoded {y.shape} {y.dtype}")
PY

step "stop (SIGTERM to the server, as docker stop would send)"
# Killing `buildah run` itself SIGKILLs the command; signal the server process instead.
# The server is the child of buildah-chroot-exec (the re-executed buildah above it
# would SIGKILL it on SIGTERM too).
server=
for p in $(descendants "$runner"); do
  parent=$(ps -o ppid= -p "$p" | tr -d ' ')  # ps -p rejects the padded number
  if [[ "$(ps -o args= -p "$parent")" == buildah-chroot-exec* ]]; then  # comm is "exe"
    server=$p; break
  fi
done
[ -n "$server" ] || die "server process not found"
kill -TERM "$server"
for _ in $(seq 60); do kill -0 "$runner" 2>/dev/null || break; sleep 1; done
if kill -0 "$runner" 2>/dev/null; then die "the server did not stop within 60 s of SIGTERM"; fi
wait "$runner" && echo "server exited with status 0" || die "server exited with status $?"
runner=
cleanup
trap - EXIT
echo
echo "image $IMAGE: $size, built in ${build_s} s, SERVING ${serving_s} s after start; round trip ok; ${SECONDS} s in all"
echo "cache $CACHE: $(du -sh "$CACHE" | cut -f1) (vfs keeps a full copy per layer)"
