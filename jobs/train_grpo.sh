#!/bin/bash
#SBATCH --job-name=train_grpo
# The seed's main GRPO (DAPO-style): recipe src/opd/config/experiment/grpo.yaml over python -m opd.main_grpo.
#   MODEL_PATH=/path/to/model [MODEL_NAME=name] bash jobs/train_grpo.sh [hydra overrides...]
#   sbatch --nodes=1 --gpus-per-node=8 jobs/train_grpo.sh   (sbatch exports the variables to the job)
# Prepares data/grpo_processed from the raw files under DATA_DIR first. Variables: README, "Launcher
# variables"; unset ones keep the recipe's defaults; arguments are Hydra overrides applied last.

for OPD_REPO in "${OPD_REPO:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-}" ""; do [[ -f "$OPD_REPO/jobs/lib/common.sh" ]] && break; done
[[ -n "$OPD_REPO" ]] || { echo "error: $(basename "$0"): cannot find the opd repository (sbatch runs a copy of this script): set OPD_REPO=/path/to/opd" >&2; exit 2; }
source "$OPD_REPO/jobs/lib/common.sh"

require MODEL_PATH
platform
map_training_variables
map KL_LOSS_COEF actor_rollout_ref.actor.kl_loss_coef \
    CLIP_RATIO_LOW actor_rollout_ref.actor.clip_ratio_low \
    CLIP_RATIO_HIGH actor_rollout_ref.actor.clip_ratio_high \
    CLIP_RATIO_C actor_rollout_ref.actor.clip_ratio_c \
    USE_DYNAMIC_BSZ actor_rollout_ref.actor.use_dynamic_bsz \
    LOSS_AGG_MODE actor_rollout_ref.actor.loss_agg_mode
prepare_grpo_data
run opd.main_grpo experiment=grpo "${OVERRIDES[@]}" "$@"
