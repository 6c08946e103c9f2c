#!/bin/bash
#SBATCH --job-name=eval_math
# Math evaluation (MATH-500, AIME 2024, AIME 2025): python -m opd.main_eval, validation only.
#   MODEL_PATH=/path/to/model [INSTRUCTION_VARIANT=boxed] [REWARD_FUNCTION=math_reward] [VAL_N=16] bash jobs/eval_math.sh
#   sbatch --nodes=1 --gpus-per-node=8 jobs/eval_math.sh
# Prepares data/eval_processed/<INSTRUCTION_VARIANT> first; writes a table, eval_results.json and
# generations.jsonl under OUTPUT_ROOT/eval/<name>. Variables: README, "Launcher variables".

for OPD_REPO in "${OPD_REPO:-}" "$(dirname "${BASH_SOURCE[0]}")/.." "${SLURM_SUBMIT_DIR:-}" ""; do [[ -f "$OPD_REPO/jobs/lib/common.sh" ]] && break; done
[[ -n "$OPD_REPO" ]] || { echo "error: $(basename "$0"): cannot find the opd repository (sbatch runs a copy of this script): set OPD_REPO=/path/to/opd" >&2; exit 2; }
source "$OPD_REPO/jobs/lib/common.sh"

require MODEL_PATH
platform
INSTRUCTION_VARIANT=${INSTRUCTION_VARIANT:-boxed}
map_generation_variables
map INSTRUCTION_VARIANT eval.instruction_variant \
    REWARD_FUNCTION eval.reward_function
prepare_eval_data "$INSTRUCTION_VARIANT"
run opd.main_eval "${OVERRIDES[@]}" "$@"
