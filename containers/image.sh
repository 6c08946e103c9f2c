#!/usr/bin/env bash
# Published image <-> SIF files and GPU nodes (containers/README.md). Run by the Makefile:
#   image.sh push      push IMAGE:TAG (docker, else buildah) and record its digest in containers/published.env
#   image.sh pull      apptainer pull IMAGE@DIGEST to SIF_DIR/opd-<digest>.sif, with its sha256 next to it
#   image.sh sif       apptainer build of containers/opd.def from IMAGE@DIGEST (sites that build locally)
#   image.sh verify    inside the image on a GPU node: python -m opd.image verify
# Variables: IMAGE (default: published name), TAG (push), DIGEST (default: published digest), SIF_DIR
# (default: ~/.cache/opd/sif), OPD_IMAGE (verify: a SIF, else the docker image IMAGE@DIGEST).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=containers/published.env
source containers/published.env
IMAGE=${IMAGE:-$IMAGE_NAME}
DIGEST=${DIGEST:-$IMAGE_DIGEST}
SIF_DIR=${SIF_DIR:-$HOME/.cache/opd/sif}

die() { echo "containers/image.sh: $*" >&2; exit 2; }
need() { command -v "$1" >/dev/null || die "$1 is not on PATH: $2"; }
need_digest() {
    [[ $DIGEST =~ ^sha256:[0-9a-f]{64}$ ]] || die "no image digest (DIGEST='$DIGEST'): pass DIGEST=sha256:... or publish one with make container-push (containers/published.env)"
}
docker_engine() { command -v docker >/dev/null && docker info >/dev/null 2>&1; }
sif="$SIF_DIR/opd-${DIGEST#sha256:}.sif"  # named by the Docker digest it comes from (opd.launch.container.pulled_from)
record_sha256() { (cd "$SIF_DIR" && sha256sum "$(basename "$sif")" > "$(basename "$sif").sha256"); }

case ${1:-} in
push)
    TAG=${TAG:-$(git rev-parse --short HEAD)}
    digestfile=$(mktemp)
    trap 'rm -f "$digestfile"' EXIT
    if docker_engine; then
        docker push "$IMAGE:$TAG"
        docker inspect --format '{{index .RepoDigests 0}}' "$IMAGE:$TAG" | sed 's/.*@//' > "$digestfile"
    else
        need buildah "install buildah, or run on a machine with a Docker engine"
        buildah push --digestfile "$digestfile" "$IMAGE:$TAG" "docker://$IMAGE:$TAG"
    fi
    digest=$(cat "$digestfile")
    sed -i "s|^IMAGE_NAME=.*|IMAGE_NAME=$IMAGE|; s|^IMAGE_DIGEST=.*|IMAGE_DIGEST=$digest|" containers/published.env
    echo "pushed $IMAGE:$TAG as $IMAGE@$digest (recorded in containers/published.env: commit it)"
    ;;
pull)
    need_digest
    need apptainer "load it (module load apptainer) on a node that may pull images"
    mkdir -p "$SIF_DIR"
    if [[ -f $sif && -f $sif.sha256 ]]; then
        echo "already pulled: $sif"
    else
        apptainer pull "$sif.partial" "docker://$IMAGE@$DIGEST"
        mv "$sif.partial" "$sif"
        record_sha256
    fi
    echo "sha256 $(cut -d' ' -f1 "$sif.sha256")"
    echo "export OPD_IMAGE=$sif    # then: make sweep-opd ARGS='container=apptainer'"
    ;;
sif)
    need_digest
    need apptainer "load it (module load apptainer)"
    mkdir -p "$SIF_DIR"
    apptainer build --build-arg "IMAGE=$IMAGE" --build-arg "DIGEST=$DIGEST" "$sif" containers/opd.def
    record_sha256
    echo "export OPD_IMAGE=$sif"
    ;;
verify)
    if [[ -n ${OPD_IMAGE:-} ]]; then
        need apptainer "load it (module load apptainer), or unset OPD_IMAGE to verify with docker"
        apptainer exec --nv --cleanenv "$OPD_IMAGE" python -m opd.image verify
    elif docker_engine; then
        need_digest
        docker run --rm --gpus all "$IMAGE@$DIGEST" python -m opd.image verify
    else
        die "set OPD_IMAGE=/path/to/opd.sif (apptainer) or run where a Docker engine answers"
    fi
    ;;
*)
    echo "usage: containers/image.sh push|pull|sif|verify   (make container-push|container-pull|container-sif|container-verify)" >&2
    exit 2
    ;;
esac
