#!/bin/bash
#SBATCH --job-name=convert_checkpoint
# verl FSDP actor checkpoint -> Hugging Face model directory, verified against the shards (python -m opd.checkpoint).
#   CHECKPOINT_PATH=/path/to/global_step_54[/actor] [TARGET_DIR=dir] bash jobs/convert_checkpoint.sh
# Default target: <actor dir>/huggingface (where verl keeps the config and tokenizer).

for OPD_REPO in "${OPD_REPO:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-}" ""; do [[ -f "$OPD_REPO/jobs/lib/common.sh" ]] && break; done
[[ -n "$OPD_REPO" ]] || { echo "error: $(basename "$0"): cannot find the opd repository (sbatch runs a copy of this script): set OPD_REPO=/path/to/opd" >&2; exit 2; }
source "$OPD_REPO/jobs/lib/common.sh"

require CHECKPOINT_PATH
run opd.checkpoint convert "$CHECKPOINT_PATH" ${TARGET_DIR:+--target "$TARGET_DIR"} "$@"
