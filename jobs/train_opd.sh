#!/bin/bash
#SBATCH --job-name=train_opd
# Single-turn math OPD from a separate teacher: recipe src/opd/config/experiment/opd.yaml over python -m opd.main_opd.
#   MODEL_PATH=/path/to/student TEACHER_MODEL_PATH=/path/to/teacher bash jobs/train_opd.sh [hydra overrides...]
#   sbatch --nodes=1 --gpus-per-node=8 jobs/train_opd.sh
# Prepares data/grpo_processed first. ENABLE_THINKING=True renders prompts with the chat template's thinking
# mode and validates at temperature 0.6; False (and the default: the seed's effective behaviour for Qwen3)
# renders without it, at 0.6 by default and 0.7 when ENABLE_THINKING=False is given. Variables: README.

for OPD_REPO in "${OPD_REPO:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-}" ""; do [[ -f "$OPD_REPO/jobs/lib/common.sh" ]] && break; done
[[ -n "$OPD_REPO" ]] || { echo "error: $(basename "$0"): cannot find the opd repository (sbatch runs a copy of this script): set OPD_REPO=/path/to/opd" >&2; exit 2; }
source "$OPD_REPO/jobs/lib/common.sh"

require MODEL_PATH TEACHER_MODEL_PATH
platform
map_training_variables
map TEACHER_MODEL_PATH opd.teacher_path \
    OPD_LOSS_TYPE opd.loss_type \
    OPD_CHUNK_SIZE opd.chunk_size \
    OPD_MAX_LENGTH opd.max_length \
    OPD_REWARD_BETA opd.reward_beta \
    ENABLE_THINKING data.apply_chat_template_kwargs.enable_thinking
if [[ "${ENABLE_THINKING:-}" =~ ^([Ff]alse|FALSE|0)$ && -z "${VAL_TEMPERATURE:-}" ]]; then
    OVERRIDES+=("actor_rollout_ref.rollout.val_kwargs.temperature=0.7")
fi
prepare_grpo_data
run opd.main_opd experiment=opd "${OVERRIDES[@]}" "$@"
