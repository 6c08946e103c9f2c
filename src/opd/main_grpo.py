"""python -m opd.main_grpo [platform=cpu] data.train_files=... data.val_files=... actor_rollout_ref.model.path=...

verl's GRPO (its PPO trainer with ``algorithm.adv_estimator=grpo``) with the project's config tree
(``opd/config/grpo_trainer.yaml``), reward function and backends. Every verl override works as usual.
"""

from __future__ import annotations

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from opd.data.checks import InputError
from opd.runtime import check_inputs, exit_on_input_error, prepare

CONFIG_NAME = "grpo_trainer"
check_config = check_inputs  # model, chat template, train/val parquet files


@hydra.main(config_path="config", config_name=CONFIG_NAME, version_base=None)
def main(config: DictConfig) -> None:
    try:
        config = prepare(config, run_dir=HydraConfig.get().runtime.output_dir, check=check_config)
    except InputError as error:
        exit_on_input_error(error)
    import ray
    from verl.trainer.main_ppo import run_ppo

    run_ppo(config, task_runner_class=ray.remote(num_cpus=1)(grpo_task_runner()))


def grpo_task_runner():
    """verl's TaskRunner with its own trainer plus the save-then-stop on the walltime signal
    (``opd.preemption``)."""
    from verl.trainer import main_ppo
    from verl.trainer.ppo.ray_trainer import RayPPOTrainer

    from opd.preemption import SaveThenStop
    from opd.runtime import trainer_class

    class GRPOTrainer(SaveThenStop, RayPPOTrainer):
        pass

    class GRPOTaskRunner(main_ppo.TaskRunner):
        def run(self, config):
            with trainer_class(GRPOTrainer):
                return super().run(config)

    return GRPOTaskRunner


if __name__ == "__main__":
    main()
