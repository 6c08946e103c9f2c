"""MODEL_PATH=... python -m opd.main_eval actor_rollout_ref.model.path=$MODEL_PATH [platform=cpu]   (jobs/eval_math.sh)
DATABASE_DIR=... python -m opd.main_eval task=travel actor_rollout_ref.model.path=...   (agents, tools on)

Validation only: sample ``VAL_N`` answers per problem from the model on the processed eval sets
(``INSTRUCTION_VARIANT``: boxed | dapo | none, written by ``python -m opd.data.process_eval_data``), score
them with ``REWARD_FUNCTION`` (math_reward | math_dapo) and report mean@n, pass@k and maj@k per data
source: a table on stdout, ``eval_results.json`` and every generation in ``generations.jsonl`` in the run
directory. Sampling: ``VAL_TEMPERATURE``, ``VAL_TOP_P``, ``VAL_TOP_K``. Options: ``opd/config/eval.yaml``.
verl's validation loop does the generation (same rollout engines, batching and reward workers as training).
With ``task=travel`` the agent plans with the travel tools (multi-turn, as in training) on the prepared
``agent_processed/val_travel_<lang>.parquet`` files, and opd.rewards.travel scores the plans.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf, open_dict

from opd.data.checks import InputError, as_list
from opd.evaluation import RESULTS_FILE, format_table
from opd.runtime import check_inputs, exit_on_input_error, prepare

INSTRUCTION_VARIANTS = ("boxed", "dapo", "none")
REWARD_FUNCTIONS = ("math_reward", "math_dapo", "boxed")


def check_eval_settings(config: DictConfig) -> None:
    """Known variant and reward, n >= 1, processed files present; fills the internal training file. A tool
    task (``task=travel``) brings its own prompts and reward, so only its files and n are checked."""
    OmegaConf.resolve(config)
    tool_task = config.get("agent") is not None and bool(config.agent.get("tools"))
    if tool_task:
        prepare = (
            f"`python -m opd.data.prepare_agent_data --data-dir data/deepplanning --output-dir "
            f"{config.run.data_dir}/agent_processed`"
        )
    else:
        variant = check_math_settings(config)
        prepare = (
            f"`python -m opd.data.process_eval_data --data-dir {config.run.data_dir} --instruction-variant "
            f"{variant}` (or `make data`)"
        )
    if int(config.actor_rollout_ref.rollout.val_kwargs.n) < 1:
        raise InputError("VAL_N must be >= 1 (samples per problem)")
    val_files = as_list(config.data.val_files)
    if not val_files:
        raise InputError(
            f"no eval files: set data.val_files=[...], or DATA_DIR and prepare them with {prepare}"
        )
    missing = [f for f in val_files if not Path(f).is_file()]
    if missing:
        raise InputError(f"eval file(s) {missing} not found: prepare them with {prepare}")
    with open_dict(config):
        # verl's TaskRunner always builds a training loader; point it at an eval file (never trained on).
        config.data.train_files = val_files[:1]


def check_math_settings(config: DictConfig) -> str:
    """Known instruction variant and reward function (a warning when they disagree); returns the variant."""
    variant, reward = config.eval.instruction_variant, config.eval.reward_function
    if variant not in INSTRUCTION_VARIANTS:
        raise InputError(f"INSTRUCTION_VARIANT={variant}: choose one of {', '.join(INSTRUCTION_VARIANTS)}")
    if reward not in REWARD_FUNCTIONS:
        raise InputError(f"REWARD_FUNCTION={reward}: choose one of {', '.join(REWARD_FUNCTIONS)}")
    if (variant == "dapo") != (reward == "math_dapo"):
        print(
            f"warning: INSTRUCTION_VARIANT={variant} with REWARD_FUNCTION={reward}: the prompts ask for "
            f"{'an Answer: line' if variant == 'dapo' else 'a boxed answer' if variant == 'boxed' else 'nothing'}"
            f" but the reward reads {'an Answer: line' if reward == 'math_dapo' else 'a boxed answer'}",
            file=sys.stderr,
        )
    return variant


CONFIG_NAME = "eval"


def check_config(config: DictConfig) -> None:
    """Eval settings and files, then the model."""
    check_eval_settings(config)
    check_inputs(config)


@hydra.main(config_path="config", config_name=CONFIG_NAME, version_base=None)
def main(config: DictConfig) -> None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    try:
        config = prepare(config, run_dir=str(run_dir), check=check_config)
    except InputError as error:
        exit_on_input_error(error)
    import ray
    from verl.trainer.main_ppo import run_ppo

    from opd.eval_trainer import EvalTaskRunner

    run_ppo(config, task_runner_class=ray.remote(num_cpus=1)(EvalTaskRunner))
    results = json.loads((Path(config.trainer.default_local_dir) / RESULTS_FILE).read_text())
    print(f"\n{format_table(results['results'])}\n")
    print(f"results: {Path(config.trainer.default_local_dir).resolve()}/{{{RESULTS_FILE},generations.jsonl}}")


if __name__ == "__main__":
    main()
