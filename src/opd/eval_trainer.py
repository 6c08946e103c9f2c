"""verl's trainer in validation-only mode, keeping every sample for ``opd.evaluation``'s metrics.

verl's ``_validate`` already generates and scores the eval sets; this subclass only catches the per-sample
results on their way to verl's own metrics (which are bootstrap estimates and drop the data source from the
dumped generations) and writes ``generations.jsonl`` and ``eval_results.json`` to the run directory.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from verl.trainer import main_ppo
from verl.trainer.ppo.ray_trainer import RayPPOTrainer

from opd.evaluation import summarize, write_results
from opd.runtime import trainer_class


class EvalTrainer(RayPPOTrainer):
    def _dump_generations(self, inputs, outputs, gts, scores, reward_extra_infos_dict, dump_path):
        self._generations = {"input": inputs, "output": outputs, "ground_truth": gts, "score": scores}

    def _val_metrics_update(self, data_sources, sample_uids, reward_extra_infos_dict, sample_turns):
        records = []
        for i, (source, uid) in enumerate(zip(data_sources, sample_uids, strict=True)):
            record = {"data_source": str(source), "uid": str(uid)}
            record.update({key: values[i] for key, values in self._generations.items()})
            for key in ("acc", "pred"):
                if key in reward_extra_infos_dict:
                    record[key] = reward_extra_infos_dict[key][i]
            record.setdefault("acc", float(record["score"] > 0))
            records.append(record)
        eval_config = OmegaConf.to_container(self.config.eval, resolve=True)
        summary = summarize(records, ks=eval_config["k"], maj_draws=eval_config["maj_draws"])
        val_kwargs = OmegaConf.to_container(self.config.actor_rollout_ref.rollout.val_kwargs, resolve=True)
        settings = {
            "model": self.config.actor_rollout_ref.model.path,
            "instruction_variant": eval_config["instruction_variant"],
            "reward_function": eval_config["reward_function"],
            "val_files": list(self.config.data.val_files),
            "sampling": {k: val_kwargs[k] for k in ("n", "temperature", "top_p", "top_k", "do_sample")},
            "max_response_length": self.config.data.max_response_length,
        }
        write_results(Path(self.config.trainer.default_local_dir), records, summary, settings)
        metrics = super()._val_metrics_update(
            data_sources, sample_uids, reward_extra_infos_dict, sample_turns
        )
        for source, scores in summary.items():
            metrics.update({f"eval/{source}/{name}": value for name, value in scores.items() if "@" in name})
        return metrics


class EvalTaskRunner(main_ppo.TaskRunner):
    def run(self, config):
        with trainer_class(EvalTrainer):
            return super().run(config)
