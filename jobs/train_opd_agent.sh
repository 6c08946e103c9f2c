#!/bin/bash
#SBATCH --job-name=train_opd_agent
# Multi-turn agent OPD on DeepPlanning travel planning: recipe src/opd/config/experiment/opd_agent.yaml over python -m opd.main_opd.
#   MODEL_PATH=/path/to/student TEACHER_MODEL_PATH=/path/to/teacher DATABASE_DIR=/path/to/deepplanning/database bash jobs/train_opd_agent.sh [hydra overrides...]
#   sbatch --nodes=1 --gpus-per-node=8 jobs/train_opd_agent.sh
# Prepares $DATA_DIR/agent_processed from DeepPlanning's layout in $DATA_DIR/deepplanning first
# (AGENT_TRAIN_RATIO, default 0.8). DATABASE_DIR defaults to $DATA_DIR/deepplanning/database when that
# exists. Agent variables: ENABLE_TOOLS, MAX_ASSISTANT_TURNS, MAX_TOOL_RESPONSE_LENGTH, TOOL_FORMAT,
# AGENT_NUM_WORKERS (README: "Agent OPD"); the others are train_opd.sh's.

for OPD_REPO in "${OPD_REPO:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-}" ""; do [[ -f "$OPD_REPO/jobs/lib/common.sh" ]] && break; done
[[ -n "$OPD_REPO" ]] || { echo "error: $(basename "$0"): cannot find the opd repository (sbatch runs a copy of this script): set OPD_REPO=/path/to/opd" >&2; exit 2; }
source "$OPD_REPO/jobs/lib/common.sh"

require MODEL_PATH TEACHER_MODEL_PATH
platform
map_training_variables
if [[ -z "${DATABASE_DIR:-}" && -d "$DATA_DIR/deepplanning/database" ]]; then
    DATABASE_DIR="$DATA_DIR/deepplanning/database"
fi
require DATABASE_DIR
map TEACHER_MODEL_PATH opd.teacher_path \
    OPD_LOSS_TYPE opd.loss_type \
    OPD_CHUNK_SIZE opd.chunk_size \
    OPD_MAX_LENGTH opd.max_length \
    OPD_REWARD_BETA opd.reward_beta \
    DATABASE_DIR agent.database_dir \
    ENABLE_TOOLS actor_rollout_ref.rollout.multi_turn.enable \
    MAX_ASSISTANT_TURNS actor_rollout_ref.rollout.multi_turn.max_assistant_turns \
    MAX_TOOL_RESPONSE_LENGTH actor_rollout_ref.rollout.multi_turn.max_tool_response_length \
    TOOL_FORMAT actor_rollout_ref.rollout.multi_turn.format \
    AGENT_NUM_WORKERS actor_rollout_ref.rollout.agent.num_workers
prepare_agent_data
run opd.main_opd experiment=opd_agent "${OVERRIDES[@]}" "$@"
