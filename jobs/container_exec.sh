#!/usr/bin/env bash
# Runs a command inside the opd image on this host: once per srun task (each node's opd.launch.node) and
# on the login node (the run's config composition). Written by opd.launch.container; see its docstring.
#
#   container_exec.sh RUNTIME IMAGE [--verify SIZE:MTIME:SHA256] [--option OPT]... [--bind PATH]... [--pass GLOB]... [--set NAME=VALUE]... -- COMMAND...
#
# --verify: the SIF file must still be the image recorded at submission. Its size and mtime are compared
# first (free); only when they moved is the file hashed again (a 10 GB image: about a minute).
#
# --cleanenv keeps the host environment out; apptainer passes in only APPTAINERENV_<NAME> variables. They
# are made here, in the task, so per-task values (SLURM_PROCID, SLURM_NODEID, CUDA_VISIBLE_DEVICES) are the
# task's own: every variable whose name matches a --pass glob, then the fixed --set values.
set -euo pipefail

if (($# < 3)); then
    echo "usage: container_exec.sh RUNTIME IMAGE [--option OPT]... [--bind PATH]... [--pass GLOB]... [--set NAME=VALUE]... -- COMMAND..." >&2
    exit 2
fi
runtime=$1 image=$2
shift 2
options=() binds=() patterns=() settings=() verify=
while (($#)); do
    case $1 in
        --verify) verify=$2; shift 2 ;;
        --option) options+=("$2"); shift 2 ;;
        --bind) binds+=(--bind "$2"); shift 2 ;;
        --pass) patterns+=("$2"); shift 2 ;;
        --set) settings+=("$2"); shift 2 ;;
        --) shift; break ;;
        *) echo "container_exec.sh: unknown argument '$1' (options end with --)" >&2; exit 2 ;;
    esac
done
if ! command -v "$runtime" >/dev/null; then
    echo "container_exec.sh: no '$runtime' on PATH of $(hostname): load it in cluster.setup (e.g. module load $runtime) or use container=none" >&2
    exit 127
fi

if [[ -n $verify ]]; then
    recorded_stat=${verify%:*} recorded_sha=${verify##*:}
    if [[ ! -f $image ]]; then
        echo "container_exec.sh: image $image is gone from $(hostname) (recorded sha256:$recorded_sha)" >&2
        exit 3
    fi
    if [[ $(stat -c '%s:%Y' "$image") != "$recorded_stat" ]]; then
        now=$(sha256sum "$image" | cut -d' ' -f1)
        if [[ $now != "$recorded_sha" ]]; then
            echo "container_exec.sh: image $image changed since submission (recorded sha256:$recorded_sha, now sha256:$now): pull the recorded image again (make container-pull) or resubmit the run" >&2
            exit 3
        fi
    fi
fi

case $runtime in
    singularity) prefix=SINGULARITYENV_ ;;
    *) prefix=APPTAINERENV_ ;;
esac
for name in $(compgen -e); do
    for pattern in "${patterns[@]}"; do
        # shellcheck disable=SC2053  # the pattern is a glob on purpose
        if [[ $name == $pattern ]]; then
            export "$prefix$name=${!name}"
            break
        fi
    done
done
for setting in "${settings[@]}"; do
    export "$prefix$setting"
done

exec "$runtime" exec "${options[@]}" "${binds[@]}" "$image" "$@"
