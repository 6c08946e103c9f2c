"""verl's trainer in validation-only mode, keeping every sample for ``opd.evaluation``'s metrics.

verl's ``_validate`` already generates and scores the eval sets; this subclass only catches the per-sample
results on their way to verl's own metrics (which are bootstrap estimates and drop the data source from the
dumped generations) and writes ``generations.jsonl`` and ``eval_results.json`` to the run directory.
With ``eval.save_rollouts=true`` it also keeps every response's exact token ids (prompt, response, tool
mask) on their way out of the rollout engine and writes them with their scores to ``rollouts.parquet``
(``opd.distill.stored``): the teacher's rollouts that an off-policy warm-up trains on.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import OmegaConf
from verl.trainer import main_ppo
from verl.trainer.ppo.ray_trainer import RayPPOTrainer

from opd.distill import stored
from opd.evaluation import summarize, write_results
from opd.runtime import trainer_class


class _Recording:
    """The rollout manager, keeping (generation input, output) of every call (padding rows dropped)."""

    def __init__(self, manager, trainer: EvalTrainer):
        self._manager, self._trainer = manager, trainer

    def generate_sequences(self, batch):
        output = self._manager.generate_sequences(batch)
        n_rows = self._trainer._unpadded_rows
        # the prompt's training-data columns (the rendered prompt travels as verl's raw_prompt)
        keys = {column: "raw_prompt" if column == "prompt" else column for column in stored.DATA_COLUMNS}
        data = {
            column: batch.non_tensor_batch[key][:n_rows]
            for column, key in keys.items()
            if key in batch.non_tensor_batch
        }
        self._trainer._recorded.append((stored.rows_from_generation(output)[:n_rows], data))
        return output

    def __getattr__(self, name):
        return getattr(self._manager, name)


class EvalTrainer(RayPPOTrainer):
    _unpadded_rows: int = 0

    def init_workers(self):
        super().init_workers()
        self._recorded = []
        if self.config.eval.get("save_rollouts", False):
            self.async_rollout_manager = _Recording(self.async_rollout_manager, self)

    def _get_gen_batch(self, batch):
        # called on each validation batch before it is padded to the workers' multiple: the rows to keep
        self._unpadded_rows = len(batch)
        return super()._get_gen_batch(batch)

    def _write_rollouts(self, scores) -> None:
        rows = [row for chunk, _ in self._recorded for row in chunk]
        data = {}
        for _, chunk in self._recorded:
            for column, values in chunk.items():
                data.setdefault(column, []).extend(values)
        if len(rows) != len(scores):
            raise RuntimeError(f"recorded {len(rows)} responses but scored {len(scores)}")
        path = Path(self.config.trainer.default_local_dir) / stored.ROLLOUTS_FILE
        stored.write(path, stored.records(rows, scores, data))
        print(f"rollouts: {len(rows)} responses with their token ids in {path}")

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
        if self.config.eval.get("save_rollouts", False):
            self._write_rollouts(self._generations["score"])
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
