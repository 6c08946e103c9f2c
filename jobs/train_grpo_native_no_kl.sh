#!/bin/bash
#SBATCH --job-name=train_grpo_native_no_kl
# Native GRPO without KL: recipe src/opd/config/experiment/grpo_native_no_kl.yaml over python -m opd.main_grpo.
#   MODEL_PATH=/path/to/model [MODEL_NAME=name] bash jobs/train_grpo_native_no_kl.sh [hydra overrides...]
#   sbatch --nodes=1 --gpus-per-node=8 jobs/train_grpo_native_no_kl.sh   (sbatch exports the variables to the job)
# Prepares data/grpo_processed from the raw files under DATA_DIR first. Variables: README, "Launcher
# variables"; unset ones keep the recipe's defaults; arguments are Hydra overrides applied last.

for OPD_REPO in "${OPD_REPO:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-}" ""; do [[ -f "$OPD_REPO/jobs/lib/common.sh" ]] && break; done
[[ -n "$OPD_REPO" ]] || { echo "error: $(basename "$0"): cannot find the opd repository (sbatch runs a copy of this script): set OPD_REPO=/path/to/opd" >&2; exit 2; }
source "$OPD_REPO/jobs/lib/common.sh"

require MODEL_PATH
platform
map_training_variables
prepare_grpo_data
run opd.main_grpo experiment=grpo_native_no_kl "${OVERRIDES[@]}" "$@"
