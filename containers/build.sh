#!/usr/bin/env bash
# Build and check the opd image from containers/Dockerfile (build context: the repository root).
#
#   bash containers/build.sh gpu        # make container-build: the GPU image, Dockerfile defaults;
#                                       #   docker if an engine answers, else buildah. [IMAGE=name] [TAG=tag]
#                                       #   [ROLLOUT=vllm: the vLLM variant, containers/constraints-vllm.txt]
#   bash containers/build.sh cpu        # make container-build-cpu: constraints/cpu.txt on a local Debian
#                                       #   bookworm base made offline (debootstrap), buildah only
#   bash containers/build.sh cpu-test [PYTEST_ARGS...]
#                                       # make container-test-cpu: import opd and verl, then the unit
#                                       #   tests (or PYTEST_ARGS) inside the CPU image
#
# Environment: CPU_IMAGE (localhost/opd:cpu), BASE_IMAGE_CPU (localhost/opd-base:bookworm),
# DEBIAN_MIRROR (http://deb.debian.org/debian), OPD_CONTAINER_CACHE (~/.cache/opd/containers: scratch space
# for the base's root filesystem and the build's pip configuration), OPD_CONTAINER_TINY_DIR (cpu-test's tiny
# assets, kept between runs: $OPD_CONTAINER_CACHE/tiny; empty: built afresh in the working container).
set -euo pipefail

REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO"  # the build context is the repository root, wherever this is called from

DOCKERFILE=containers/Dockerfile
CPU_CONSTRAINTS=constraints/cpu.txt
CPU_IMAGE=${CPU_IMAGE:-localhost/opd:cpu}
BASE_IMAGE_CPU=${BASE_IMAGE_CPU:-localhost/opd-base:bookworm}
DEBIAN_MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
CACHE=${OPD_CONTAINER_CACHE:-$HOME/.cache/opd/containers}

log() { echo "[build.sh] $*" >&2; }
die() { log "error: $*"; exit 1; }

usage() {
    # the header comment above
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "${BASH_SOURCE[0]}" >&2
    exit 2
}

# Seconds since a phase began, with tenths: the phases take from seconds (warm) to many minutes (cold).
now() { date +%s.%N; }
elapsed() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# The version of NAME pinned by a constraints file (name==version), which the Dockerfile's version check
# compares with what pip installed.
pin() {
    local version
    version=$(sed -n "s/^$2==\([^[:space:];#]*\).*/\1/p" "$1" | head -n 1)
    [[ -n $version ]] || die "$1 pins no $2 (expected a line $2==VERSION)"
    echo "$version"
}

# --- the local base: Debian bookworm from the Debian mirror alone, no registry ---------------------------

# Unmount whatever debootstrap left mounted below the scratch root filesystem (proc, sys), deepest first.
unmount_below() {
    local mounts mount
    mounts=$(awk -v r="$1" 'index($2, r "/") == 1 { print $2 }' /proc/self/mounts | sort -r)
    [[ -n $mounts ]] || return 0
    while read -r mount; do umount "$mount" 2>/dev/null || umount -l "$mount"; done <<<"$mounts"
}

# --one-file-system: a mount that could not be detached is never descended into.
remove_rootfs() {
    [[ -e $1 ]] || return 0
    unmount_below "$1"
    rm -rf --one-file-system "$1"
}

ensure_base() {
    if buildah inspect --type image "$BASE_IMAGE_CPU" >/dev/null 2>&1; then
        log "base: reusing $BASE_IMAGE_CPU (buildah rmi it to rebuild)"
        return
    fi
    command -v debootstrap >/dev/null || die "debootstrap is not installed (apt-get install debootstrap)"
    [[ $(id -u) -eq 0 ]] || die "debootstrap needs root to make the base image"
    local start rootfs="$CACHE/rootfs-bookworm" debootstrap_log="$CACHE/debootstrap.log"
    start=$(now)
    mkdir -p "$CACHE"
    remove_rootfs "$rootfs"  # a previous run that was interrupted
    log "base: debootstrap --variant=minbase bookworm from $DEBIAN_MIRROR (log: $debootstrap_log)"
    if ! debootstrap --variant=minbase bookworm "$rootfs" "$DEBIAN_MIRROR" >"$debootstrap_log" 2>&1; then
        tail -n 20 "$debootstrap_log" >&2
        remove_rootfs "$rootfs"
        die "debootstrap failed (full log: $debootstrap_log)"
    fi
    # Its proc/sys mounts must not end up in the tarball, nor be removed through.
    unmount_below "$rootfs"
    rm -rf "${rootfs:?}"/var/cache/apt/archives/*.deb "${rootfs:?}"/var/lib/apt/lists/*
    tar -C "$rootfs" --numeric-owner -c . | podman import --quiet - "$BASE_IMAGE_CPU" >/dev/null
    remove_rootfs "$rootfs"
    log "base: $BASE_IMAGE_CPU made in $(elapsed "$start") s"
}

# --- this machine's pip configuration, lent read-only to the build's RUN steps ---------------------------

# Where pip finds the CPU torch wheel here (find-links, local file:// indexes) and which CA bundle it trusts
# (the network's TLS proxy signs with its own CA) live in this machine's pip configuration, not in the
# Dockerfile. The build's RUN steps get one pip.conf, merged from the host's as pip reads it (files, then
# PIP_* variables), at /etc/pip.conf; the local directories and the CA bundle it names, read-only under
# /run/opd-build (not over the image's /etc/ssl/certs, which its ca-certificates package writes).
# buildah 1.28 leaves the mount points behind, empty: /etc/pip.conf and /run/opd-build/ are all that stay.
# Fills PIP_VOLUMES with --volume arguments.
PIP_VOLUMES=()
pip_volumes() {
    local conf_dir="$CACHE/pip" line
    if ! command -v python3 >/dev/null; then
        log "warning: no python3 here to read pip's configuration; the build uses pip's defaults"
        return
    fi
    mkdir -p "$conf_dir"
    while IFS= read -r line; do
        [[ -n $line ]] && PIP_VOLUMES+=(--volume "$line")
    done < <(python3 - "$conf_dir/pip.conf" /run/opd-build <<'EOF'
import configparser, os, sys
from pathlib import Path
from urllib.parse import unquote, urlparse

out, inside = sys.argv[1], Path(sys.argv[2])
home = Path.home()
files = ["/etc/xdg/pip/pip.conf", "/etc/pip.conf", home / ".pip/pip.conf", home / ".config/pip/pip.conf"]
files += [os.environ["PIP_CONFIG_FILE"]] if os.environ.get("PIP_CONFIG_FILE") else []
parser = configparser.RawConfigParser()
parser.read(files)
settings = {}
for section in ("global", "install"):  # pip: [install] overrides [global], PIP_* overrides both
    if parser.has_section(section):
        settings.update((key.replace("_", "-"), value) for key, value in parser.items(section))
for key in ("index-url", "extra-index-url", "find-links", "trusted-host", "cert"):
    if os.environ.get("PIP_" + key.upper().replace("-", "_")):
        settings[key] = os.environ["PIP_" + key.upper().replace("-", "_")]
mounts = {}  # host directory or file -> its path in the build


def lend(host: Path) -> Path:
    if host not in mounts:
        mounts[host] = inside / f"{len(mounts) + 1}-{host.name}"
    return mounts[host]


def localise(location: str, index: bool) -> str:
    """A local location as the build sees it; anything else as it is."""
    path = Path(unquote(urlparse(location).path) if location.startswith("file:") else location)
    if not path.is_absolute() or not path.exists():
        return location
    # a local PEP 503 index (ROOT/simple) links its files relative to itself (ROOT/files): lend ROOT
    root = path.parent if index and path.name == "simple" else path
    moved = lend(root.resolve()) / path.relative_to(root)
    return moved.as_uri() if location.startswith("file:") else str(moved)


lines = ["[global]"]
for key, index in (("index-url", True), ("extra-index-url", True), ("find-links", False)):
    if settings.get(key):
        lines.append(f"{key} = " + " ".join(localise(x, index) for x in settings[key].split()))
if settings.get("trusted-host"):
    lines.append(f"trusted-host = {settings['trusted-host']}")
if settings.get("cert") and Path(settings["cert"]).is_file():
    lines.append(f"cert = {lend(Path(settings['cert']).resolve())}")
Path(out).write_text("\n".join(lines) + "\n")
print(f"{out}:/etc/pip.conf:ro")
for host, path in mounts.items():
    print(f"{host}:{path}:ro")
EOF
    )
}

# --- the images -------------------------------------------------------------------------------------------

image_summary() {  # the built image's id, digest and size
    buildah images --format '{{.Name}}:{{.Tag}}  id {{.ID}}  size {{.Size}}' "$1" >&2
    log "digest: $(buildah inspect --type image --format '{{.FromImageDigest}}' "$1")"
}

build_cpu() {
    command -v buildah >/dev/null || die "buildah is not installed (apt-get install buildah)"
    local start args=()
    start=$(now)
    ensure_base
    log "base phase: $(elapsed "$start") s"

    # The CPU variant of the Dockerfile: the local base, the CPU lock and extras, no flash-attn and no
    # sglang (labelled absent), and the version ARGs from the lock, which the build checks pip against.
    args+=(--build-arg "BASE_IMAGE=$BASE_IMAGE_CPU" --build-arg "CONSTRAINTS=$CPU_CONSTRAINTS")
    args+=(--build-arg "EXTRAS=train,launch,dev" --build-arg FLASH_ATTN_WHEEL=)
    args+=(--build-arg FLASH_ATTN_VERSION=absent --build-arg SGLANG_VERSION=absent)
    args+=(--build-arg "TORCH_VERSION=$(pin "$CPU_CONSTRAINTS" torch)")
    args+=(--build-arg "VERL_VERSION=$(pin "$CPU_CONSTRAINTS" verl)")
    args+=(--build-arg "TRANSFORMERS_VERSION=$(pin "$CPU_CONSTRAINTS" transformers)")
    args+=(--build-arg "TENSORDICT_VERSION=$(pin "$CPU_CONSTRAINTS" tensordict)")
    args+=(--build-arg "RAY_VERSION=$(pin "$CPU_CONSTRAINTS" ray)")
    pip_volumes
    args+=("${PIP_VOLUMES[@]}")

    start=$(now)
    log "build: $CPU_IMAGE from $DOCKERFILE on $BASE_IMAGE_CPU"
    # chroot isolation: no user namespaces or runc needed here. --format docker: the OCI format drops the
    # Dockerfile's SHELL (bash, pipefail), and its RUN steps need bash. --layers: reuse unchanged steps.
    # --pull=never: the base is local and nothing may be fetched from a registry.
    buildah bud --isolation chroot --format docker --layers --pull=never \
        -f "$DOCKERFILE" -t "$CPU_IMAGE" "${args[@]}" .
    log "build phase: $(elapsed "$start") s"
    image_summary "$CPU_IMAGE"
}

git_tag() {  # the commit, marked -dirty when the working tree differs from it (the image would too)
    local sha
    sha=$(git rev-parse --short HEAD 2>/dev/null) || die "not a git checkout: set TAG"
    if [[ -n $(git status --porcelain 2>/dev/null) ]]; then sha+=-dirty; fi
    echo "$sha"
}

build_gpu() {
    local image=${IMAGE:-ghcr.io/opd-project/opd} tag=${TAG:-} start args=()
    [[ -n $tag ]] || tag=$(git_tag)
    # The Dockerfile's defaults are the GPU image with sglang: CUDA base by digest, containers/constraints.txt,
    # the flash-attn release wheel. ROLLOUT=vllm: the vLLM variant, its lock and versions (tag -vllm).
    case ${ROLLOUT:-sglang} in
        sglang) ;;
        vllm)
            local lock=containers/constraints-vllm.txt
            args+=(--build-arg "CONSTRAINTS=$lock" --build-arg "EXTRAS=train,launch,vllm")
            args+=(--build-arg SGLANG_VERSION=absent --build-arg "VLLM_VERSION=$(pin "$lock" vllm)")
            args+=(--build-arg "TORCH_VERSION=$(pin "$lock" torch)" --build-arg "VERL_VERSION=$(pin "$lock" verl)")
            args+=(--build-arg "TRANSFORMERS_VERSION=$(pin "$lock" transformers)")
            args+=(--build-arg "TENSORDICT_VERSION=$(pin "$lock" tensordict)" --build-arg "RAY_VERSION=$(pin "$lock" ray)")
            tag+=-vllm
            ;;
        *) die "ROLLOUT=$ROLLOUT: choose sglang (default) or vllm" ;;
    esac
    start=$(now)
    # Docker where an engine answers; else buildah with its default isolation.
    if command -v docker >/dev/null && timeout 60 docker info >/dev/null 2>&1; then
        log "build: $image:$tag with docker"
        docker build -f "$DOCKERFILE" -t "$image:$tag" "${args[@]}" .
        log "build phase: $(elapsed "$start") s"
        docker image inspect --format '{{.Id}}  size {{.Size}} bytes' "$image:$tag" >&2
    elif command -v buildah >/dev/null; then
        log "build: $image:$tag with buildah (no Docker engine answers)"
        # --format docker keeps the Dockerfile's SHELL, which the OCI format would drop.
        buildah bud --format docker --layers -f "$DOCKERFILE" -t "$image:$tag" "${args[@]}" .
        log "build phase: $(elapsed "$start") s"
        image_summary "$image:$tag"
    else
        die "neither a Docker engine nor buildah is available"
    fi
}

# --- inside the CPU image ---------------------------------------------------------------------------------

# Unit tests that cannot pass against the installed package: they find checkout files through the package's
# own location (opd.launch.CONFIGS, opd.image.LOCK: <package>/../../configs and the like), which in the
# image's non-editable install points into /opt/venv/lib. Both are the login/maintainer side, which runs
# from the checkout (make test covers them there).
CPU_TEST_DESELECT=(
    --ignore=tests/test_launch_config.py  # login configs: opd.launch.CONFIGS
    --ignore=tests/test_containers.py     # the image's lock vs constraints/cpu.txt: opd.image.LOCK
)

cpu_test() {
    command -v buildah >/dev/null || die "buildah is not installed (apt-get install buildah)"
    buildah inspect --type image "$CPU_IMAGE" >/dev/null 2>&1 ||
        die "no image $CPU_IMAGE: run bash containers/build.sh cpu (make container-build-cpu) first"
    local start status=0
    # The working container and the tarball are scratch: removed however this ends (globals, for the trap).
    TESTS_TAR=$(mktemp --suffix=.tar)
    CONTAINER=
    trap 'rm -f "$TESTS_TAR"; [[ -z $CONTAINER ]] || buildah rm "$CONTAINER" >/dev/null 2>&1 || true' EXIT
    CONTAINER=$(buildah from --pull=never "$CPU_IMAGE")
    log "working container $CONTAINER"

    start=$(now)
    buildah run --isolation chroot "$CONTAINER" -- python -c \
        'import opd, verl, torch; print(f"opd {opd.__file__}; verl {verl.__version__}; torch {torch.__version__}")'
    log "import check: $(elapsed "$start") s"

    # The tests run from a copy of the checkout without src/ (tests/, pyproject.toml for pytest's settings,
    # and the jobs/, configs/, constraints/ and README.md that tests read), so that `opd` can only be the
    # image's installed package; a copy, not a bind: nothing is written into the checkout. No .git.
    git ls-files -z --cached --others --exclude-standard | grep -zv '^src/' |
        tar --null --no-recursion --ignore-failed-read -T - -cf "$TESTS_TAR"
    buildah add --quiet "$CONTAINER" "$TESTS_TAR" /opt/opd-tests/ >/dev/null

    # Arguments after cpu-test replace the default selection (e.g. cpu-test tests/test_losses.py -x).
    local pytest_args=(-m "not e2e and not slurm" -q -p no:cacheprovider "${CPU_TEST_DESELECT[@]}")
    if (($# > 0)); then pytest_args=(-p no:cacheprovider "$@"); fi
    # The tiny models and data (opd.tiny, minutes to build: a teacher is trained) are kept between runs in
    # a host directory bound read-write, rebuilt there by the image's opd.tiny when its recipe changes; set
    # OPD_CONTAINER_TINY_DIR= (empty) to build them afresh inside the working container instead.
    # opd.tiny builds beside OPD_TINY_DIR and renames into it, so the mount is its parent, not itself.
    local tiny_dir=${OPD_CONTAINER_TINY_DIR-$CACHE/tiny} volumes=() tiny_in=/tmp/opd-tiny
    if [[ -n $tiny_dir ]]; then
        mkdir -p "$tiny_dir"
        volumes=(--volume "$tiny_dir:/opt/opd-tiny")
        tiny_in=/opt/opd-tiny/assets
    fi
    start=$(now)
    # From /opt/opd-tests (no src/ there), so that `opd` can only come from the installed package.
    buildah run --isolation chroot --workingdir /opt/opd-tests "${volumes[@]}" "$CONTAINER" -- \
        env OPD_TINY_DIR="$tiny_in" python -m pytest "${pytest_args[@]}" || status=$?
    log "unit tests: $(elapsed "$start") s, exit status $status"
    return "$status"
}

case ${1:-} in
    cpu) build_cpu ;;
    cpu-test) cpu_test "${@:2}" ;;
    gpu) build_gpu ;;
    *) usage ;;
esac
