#!/usr/bin/env bash
# The pipeline image (Dockerfile), built and checked with docker where a daemon runs, else podman.
#   tools/image.sh build   build it (make image)
#   tools/image.sh check   build it, then run the digits pipeline and a Kubeflow component inside it (make image-check)
#   tools/image.sh clean   remove the images this script made (make image-clean)
#   tools/image.sh tag     print the image name it builds (the one Kubeflow runs: pipelines/config.py)
# Settings (environment or make variables):
#   DEVICE=cpu|gpu     which image (gpu: onnxruntime-gpu and CUDA torch)
#   TORCH_INDEX=URL    torch's wheel index; unset: the Dockerfile's `auto` (cpu: PyTorch's CPU index,
#                      gpu: PyPI); empty: PyPI, whose torch is the CUDA build
#   EXTRA_CA=FILE      a CA certificate (bundle) pip must trust during the build only (TLS-intercepting proxy)
#   ENGINE=docker|podman, IMAGE=name:tag (default: pipelines/config.py's name and the package version)
# When the base image cannot be pulled (no access to Docker Hub), an equivalent one is made from
# Debian packages with debootstrap (root needed) and used instead.
set -euo pipefail
cd "$(dirname "$0")/.."

DEVICE=${DEVICE:-cpu}
case $DEVICE in cpu | gpu) ;; *) echo "error: DEVICE=$DEVICE: expected cpu or gpu" >&2; exit 2 ;; esac
VERSION=$(sed -n 's/^version = "\(.*\)"/\1/p' pyproject.toml)
REVISION=$(git rev-parse HEAD 2>/dev/null || echo unknown)
REPOSITORY=$(sed -n 's/^REPOSITORY = "\(.*\)"/\1/p' pipelines/config.py)
IMAGE=${IMAGE:-$REPOSITORY:$VERSION$([ "$DEVICE" = gpu ] && echo -gpu || true)}
BASE_IMAGE=python:3.11-slim-bookworm
DEBOOTSTRAP_BASE=localhost/adalabelhash-base:bookworm  # made here when BASE_IMAGE cannot be pulled
MADE_BY=io.adalabelhash.made-by=tools/image.sh

engine=() run_opts=()
choose_engine() {
    if [ -z "${ENGINE:-}" ]; then
        if command -v docker >/dev/null && docker info >/dev/null 2>&1; then ENGINE=docker
        elif command -v podman >/dev/null; then ENGINE=podman
        else echo "error: no container engine: neither a running Docker daemon nor podman (apt-get install podman runc)" >&2; exit 1
        fi
    fi
    engine=("$ENGINE")
    run_opts=(--rm)
    if [ "$ENGINE" = podman ]; then
        # runc: crun refuses hosts with hybrid cgroups (v1 + v2), ours among them. Explicit ulimits: podman's
        # default nofile (1048576) is above our hosts' hard limit (20000) and runc then fails to start.
        engine+=(--runtime runc)
        run_opts+=(--ulimit nofile=1024:1024 --ulimit nproc=1024:1024)
    fi
}

base_image() {  # prints the base image to build on: BASE_IMAGE if present or pullable, else the debootstrap one
    if "${engine[@]}" image inspect "$BASE_IMAGE" >/dev/null 2>&1 || timeout 120 "${engine[@]}" pull -q "$BASE_IMAGE" >/dev/null 2>&1; then
        echo "$BASE_IMAGE"; return
    fi
    if ! "${engine[@]}" image inspect "$DEBOOTSTRAP_BASE" >/dev/null 2>&1; then
        echo "image: $BASE_IMAGE cannot be pulled; making $DEBOOTSTRAP_BASE from Debian packages (debootstrap)" >&2
        debootstrap_base >&2
    fi
    echo "$DEBOOTSTRAP_BASE"
}

debootstrap_base() {  # python:3.11-slim-bookworm's equivalent: Debian bookworm's Python 3.11 + pip
    command -v debootstrap >/dev/null || { echo "error: debootstrap is not installed (apt-get install debootstrap)" >&2; exit 1; }
    [ "$(id -u)" = 0 ] || { echo "error: debootstrap needs root (run as root or under sudo)" >&2; exit 1; }
    # The Debian mirror apt already uses here (this network may allow no other).
    local mirror
    mirror=$(grep -rhoE '^(URIs:|deb) +[^ ]+' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null |
             awk '{print $2}' | grep -E '/debian/?$' | head -n1)
    mirror=${mirror:-http://deb.debian.org/debian}
    rootfs=$(mktemp -d "${TMPDIR:-/tmp}/adalabelhash-rootfs.XXXXXX")
    trap 'rm -rf "$rootfs"' EXIT
    debootstrap --variant=minbase --include=python3,python3-pip,python3-venv,ca-certificates,netbase,passwd \
        bookworm "$rootfs" "$mirror" >/dev/null
    printf 'deb %s bookworm main\ndeb %s bookworm-updates main\n' "$mirror" "$mirror" > "$rootfs/etc/apt/sources.list"
    rm -f "$rootfs/usr/lib/python3.11/EXTERNALLY-MANAGED"  # the image's Python is the image's own, as in python:slim
    ln -sf python3 "$rootfs/usr/bin/python"
    rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
    tar -C "$rootfs" -c . | "${engine[@]}" import --change 'ENV LANG=C.UTF-8' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' --change 'CMD ["python3"]' \
        --change "LABEL $MADE_BY" - "$DEBOOTSTRAP_BASE" >/dev/null
    rm -rf "$rootfs"
}

build() {
    local base args=(--build-arg "DEVICE=$DEVICE" --build-arg "VERSION=$VERSION" --label "$MADE_BY")
    base=$(base_image)
    args+=(--build-arg "BASE_IMAGE=$base" --build-arg "REVISION=$REVISION")
    [ -n "${TORCH_INDEX+set}" ] && args+=(--build-arg "TORCH_INDEX=$TORCH_INDEX")
    if [ -n "${EXTRA_CA:-}" ]; then
        [ -s "$EXTRA_CA" ] || { echo "error: EXTRA_CA=$EXTRA_CA: no such file (a PEM CA certificate)" >&2; exit 1; }
        args+=(--secret "id=extra_ca,src=$EXTRA_CA")
    fi
    echo "image: building $IMAGE (DEVICE=$DEVICE, torch from ${TORCH_INDEX-auto}${TORCH_INDEX+${TORCH_INDEX:-PyPI}}," \
         "base $base) with $ENGINE"
    [ "$ENGINE" = docker ] && export DOCKER_BUILDKIT=1  # build secrets
    local start=$SECONDS
    "${engine[@]}" build "${args[@]}" -t "$IMAGE" .
    label_image
    echo "image: built $IMAGE in $((SECONDS - start)) s, $(size) MB"
}

label_image() {  # the torch the image really holds (a Dockerfile label cannot say it), and its commit
    local torch cuda
    read -r torch cuda < <("${engine[@]}" run "${run_opts[@]}" --entrypoint python "$IMAGE" -c \
        'import torch; print(torch.__version__, torch.version.cuda or "none")')
    # podman reuses a cached LABEL step even when REVISION changed: set the commit here too
    local labels=(--label "io.adalabelhash.torch=$torch" --label "org.opencontainers.image.revision=$REVISION"
                  --label "org.opencontainers.image.version=$VERSION" --label "$MADE_BY")
    [ "$cuda" != none ] && labels+=(--label "io.adalabelhash.nvidia-driver-min=580")  # CUDA 13 wheels
    local old context
    old=$("${engine[@]}" image inspect --format '{{.Id}}' "$IMAGE")
    context=$(mktemp -d "${TMPDIR:-/tmp}/adalabelhash-label.XXXXXX")
    echo "FROM $IMAGE" > "$context/Dockerfile"
    "${engine[@]}" build -q "${labels[@]}" -t "$IMAGE" "$context" >/dev/null
    rm -rf "$context"
    "${engine[@]}" rmi "$old" >/dev/null 2>&1 || true  # the unlabelled copy (shares every layer)
    echo "image: $IMAGE holds torch $torch$([ "$cuda" != none ] && echo " (CUDA $cuda: needs NVIDIA driver >= 580)")"
    if [ "$DEVICE" = cpu ] && [ "$cuda" != none ]; then
        echo "image: warning: the CPU image holds the CUDA build of torch ($torch, $(size) MB): built from" \
             "${TORCH_INDEX:-PyPI}, which has no CPU-only torch"
    fi
}

size() { "${engine[@]}" image inspect --format '{{.Size}}' "$IMAGE" | awk '{printf "%d", $1 / 1e6}'; }

check() {
    build
    local start=$SECONDS
    echo "image: checking $IMAGE: digits pipeline (dvc repro, 1 epoch) + a Kubeflow component, as the image's user"
    "${engine[@]}" run "${run_opts[@]}" "$IMAGE" --help | grep -q "get-data"  # the default entrypoint: the CLI
    "${engine[@]}" run "${run_opts[@]}" -i -e "DEVICE=$DEVICE" --entrypoint bash "$IMAGE" -s < tools/image_check.sh
    echo "image: check passed in $((SECONDS - start)) s"
}

clean() {  # the images this script made: pipeline images, their cached build steps, the debootstrap base
    local ids
    ids=$({ "${engine[@]}" images -a -q --filter "label=org.opencontainers.image.title=adalabelhash"
            "${engine[@]}" images -a -q --filter "label=$MADE_BY"; } | sort -u)
    if [ -n "$ids" ]; then "${engine[@]}" rmi -f $ids >/dev/null; fi
    echo "image: removed $(echo $ids | wc -w) images made by tools/image.sh"
}

case ${1:-} in
    tag) echo "$IMAGE" ;;
    build) choose_engine; build ;;
    check) choose_engine; check ;;
    clean) choose_engine; clean ;;
    *) echo "usage: tools/image.sh build|check|clean|tag" >&2; exit 2 ;;
esac
