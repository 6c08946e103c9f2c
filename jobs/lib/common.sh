# shellcheck shell=bash
# Shared by the seed-compatible launchers in jobs/: Python, platform and GPU count, required variables,
# and the one mapping from the seed's environment variables to the project's Hydra overrides.
# Sourced after the launcher has set OPD_REPO; nothing here runs a job.

set -euo pipefail
OPD_REPO=$(cd "$OPD_REPO" && pwd)

# The venv `make setup` creates, else whatever python3 is first on PATH (e.g. the container's).
if [[ -z "${PYTHON:-}" ]]; then
    if [[ -x "$OPD_REPO/.venv/bin/python" ]]; then PYTHON="$OPD_REPO/.venv/bin/python"; else PYTHON=python3; fi
fi
# Open files: Ray and verl keep many sockets and shards open; raise the soft limit as far as allowed.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true

OVERRIDES=()

# require VAR... : one line naming every missing variable, then exit 2.
require() {
    local missing=() var
    for var in "$@"; do [[ -n "${!var:-}" ]] || missing+=("$var"); done
    if ((${#missing[@]})); then
        echo "error: $(basename "$0"): missing required variable(s): ${missing[*]} (e.g. ${missing[0]}=/path/to/... bash $0)" >&2
        exit 2
    fi
}

# map VAR key[,key...] ... : each variable that is set adds key=value overrides; unset ones keep the
# recipe's default (src/opd/config/experiment/*.yaml), so every default is stated in one place.
map() {
    local var keys key
    while (($#)); do
        var=$1 keys=$2
        shift 2
        [[ -n "${!var:-}" ]] || continue
        IFS=, read -ra key <<<"$keys"
        for k in "${key[@]}"; do OVERRIDES+=("$k=${!var}"); done
    done
}

# PLATFORM=gpu (default) uses every GPU of the node (N_GPUS_PER_NODE overrides); PLATFORM=cpu runs verl on
# CPU (tiny models, tests, laptops) with one training process, or N_GPUS_PER_NODE of them (gloo).
platform() {
    case "${PLATFORM:-gpu}" in
    cpu)
        OVERRIDES+=("platform=cpu")
        if [[ -n "${N_GPUS_PER_NODE:-}" ]]; then OVERRIDES+=("trainer.n_gpus_per_node=$N_GPUS_PER_NODE"); fi
        ;;
    gpu)
        local gpus=${N_GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-}}
        if [[ -z "$gpus" ]]; then gpus=$(nvidia-smi --list-gpus 2>/dev/null | wc -l || true); fi
        if [[ -z "$gpus" || "$gpus" == 0 ]]; then
            echo "error: $(basename "$0"): no GPU found: run on a GPU node, set N_GPUS_PER_NODE, or PLATFORM=cpu for a CPU run" >&2
            exit 2
        fi
        OVERRIDES+=("platform=gpu" "trainer.n_gpus_per_node=$gpus")
        ;;
    *)
        echo "error: $(basename "$0"): PLATFORM=$PLATFORM: use gpu or cpu" >&2
        exit 2
        ;;
    esac
}

# Variables of every launcher that generates: model, run identity, lengths, rollout engine, validation
# sampling (README: "Launcher variables"); then the data and output locations.
map_generation_variables() {
    map MODEL_PATH actor_rollout_ref.model.path \
        MODEL_NAME run.model_name \
        RUN_ID run.id \
        MAX_PROMPT_LENGTH data.max_prompt_length \
        MAX_RESPONSE_LENGTH data.max_response_length \
        LOG_PROB_MICRO_BATCH_SIZE_PER_GPU actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu,actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu \
        TP_SIZE actor_rollout_ref.rollout.tensor_model_parallel_size \
        GPU_MEMORY_UTIL actor_rollout_ref.rollout.gpu_memory_utilization \
        VAL_TEMPERATURE actor_rollout_ref.rollout.val_kwargs.temperature \
        VAL_TOP_P actor_rollout_ref.rollout.val_kwargs.top_p \
        VAL_TOP_K actor_rollout_ref.rollout.val_kwargs.top_k \
        VAL_N actor_rollout_ref.rollout.val_kwargs.n
    locations
}

# ... plus the training ones, shared by every training launcher.
map_training_variables() {
    map_generation_variables
    map TRAIN_BATCH_SIZE data.train_batch_size \
        PPO_MINI_BATCH_SIZE actor_rollout_ref.actor.ppo_mini_batch_size \
        PPO_MICRO_BATCH_SIZE_PER_GPU actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu \
        LEARNING_RATE actor_rollout_ref.actor.optim.lr \
        TOTAL_EPOCHS trainer.total_epochs \
        TOTAL_TRAINING_STEPS trainer.total_training_steps \
        SAVE_FREQ trainer.save_freq \
        TEST_FREQ trainer.test_freq \
        VAL_BEFORE_TRAIN trainer.val_before_train \
        ROLLOUT_N actor_rollout_ref.rollout.n \
        ENTROPY_COEFF actor_rollout_ref.actor.entropy_coeff \
        TEMPERATURE actor_rollout_ref.rollout.temperature \
        TOP_P actor_rollout_ref.rollout.top_p \
        TOP_K actor_rollout_ref.rollout.top_k
}

# Absolute data and output locations (the seed's defaults: <repo>/data, <repo>/outputs), so a job's
# working directory does not matter.
locations() {
    DATA_DIR=${DATA_DIR:-"$OPD_REPO/data"}
    OUTPUT_ROOT=${OUTPUT_ROOT:-"$OPD_REPO/outputs"}
    OVERRIDES+=("run.data_dir=$DATA_DIR" "run.output_root=$OUTPUT_ROOT")
}

# The seed's launchers prepare the data on every run (DAPO split: DAPO_TRAIN_RATIO, default 0.8): cheap,
# deterministic and written atomically, so concurrent jobs can share DATA_DIR. Processed files without
# the raw ones (copied from elsewhere) are used as they are.
prepare_grpo_data() {
    if [[ ! -e "$DATA_DIR/DAPO-Math-17k-dedup" && -f "$DATA_DIR/grpo_processed/train.parquet" ]]; then
        echo "no raw DAPO data under $DATA_DIR: using $DATA_DIR/grpo_processed as it is" >&2
        return
    fi
    "$PYTHON" -m opd.data.prepare_grpo_data --data-dir "$DATA_DIR" ${DAPO_TRAIN_RATIO:+--train-ratio "$DAPO_TRAIN_RATIO"} >&2
}

prepare_eval_data() {
    if [[ ! -e "$DATA_DIR/MATH-500" && -d "$DATA_DIR/eval_processed/$1" ]]; then
        echo "no raw eval data under $DATA_DIR: using $DATA_DIR/eval_processed/$1 as it is" >&2
        return
    fi
    "$PYTHON" -m opd.data.process_eval_data --data-dir "$DATA_DIR" --instruction-variant "$1" >&2
}

# DeepPlanning's travel layout (data/travelplanning_query_<lang>.json, database/) in $DATA_DIR/deepplanning
# -> $DATA_DIR/agent_processed (train.parquet, val_travel_<lang>.parquet), as the original launcher did.
prepare_agent_data() {
    if [[ ! -e "$DATA_DIR/deepplanning/data" && -f "$DATA_DIR/agent_processed/train.parquet" ]]; then
        echo "no raw DeepPlanning data under $DATA_DIR/deepplanning: using $DATA_DIR/agent_processed as it is" >&2
        return
    fi
    "$PYTHON" -m opd.data.prepare_agent_data --data-dir "$DATA_DIR/deepplanning" --database-dir "$DATABASE_DIR" \
        --output-dir "$DATA_DIR/agent_processed" --train-ratio "${AGENT_TRAIN_RATIO:-0.8}" >&2
}

# run MODULE ARGS... : print the command, then replace this shell with it (signals reach Python directly).
run() {
    echo "+ $PYTHON -m $*" >&2
    exec "$PYTHON" -m "$@"
}
