"""OPD on verl's PPO trainer loop: verl's ``fit()`` keeps rollouts (``rollout.n`` per prompt), rewards,
validation (mean@k / pass@k per data source), checkpoints, ``resume_mode=auto``, logging and the
progress bar; only the actor update is replaced by the two-phase distillation step, and the teacher
lives in the same worker as the student (verl's ``actor_rollout_ref`` role, ref = teacher).
"""

from __future__ import annotations

import json
import os

import torch
from omegaconf import OmegaConf
from verl import DataProto
from verl.trainer import main_ppo
from verl.trainer.ppo.ray_trainer import RayPPOTrainer, Role

from opd.distill.batch import TEACHER_PROMPTS
from opd.distill.config import OPDConfig
from opd.distill.weights import sample_weights
from opd.preemption import SaveThenStop
from opd.runtime import trainer_class


def tool_mask_metrics(batch: DataProto) -> dict[str, float]:
    """The seed's multi-turn diagnostics: how many response tokens are the model's vs. tool output."""
    tensors = batch.batch
    response_len = tensors["responses"].shape[1]
    valid_B_R = tensors["attention_mask"][:, -response_len:].bool()
    llm_B_R = tensors["response_mask"].bool() & valid_B_R
    llm, total = int(llm_B_R.sum()), int(valid_B_R.sum())
    return {
        "tool_mask/has_agent_mask": float(bool((valid_B_R & ~llm_B_R).any())),
        "tool_mask/llm_tokens": float(llm),
        "tool_mask/tool_tokens": float(total - llm),
        "tool_mask/tool_ratio": (total - llm) / max(total, 1),
    }


TOKEN_PAIRS_FILE = "token_pairs.jsonl"


def write_token_pairs(per_rank: list | None, step: int) -> None:
    """One line per step (``opd.token_selection.sample_pairs``): every rank's sampled (normalised entropy,
    divergence, kept) triples, next to metrics.jsonl (``python -m opd.tip plot`` draws them)."""
    pairs = [triple for rank in per_rank or [] for triple in rank]
    if not pairs:
        return
    metrics_path = os.environ.get("VERL_FILE_LOGGER_PATH") or "metrics.jsonl"
    path = os.path.join(os.path.dirname(os.path.abspath(metrics_path)), TOKEN_PAIRS_FILE)
    entropy, divergence, kept = (list(col) for col in zip(*pairs, strict=True))
    record = {"step": step, "entropy": entropy, "divergence": divergence, "kept": [int(k) for k in kept]}
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


class OPDTrainer(SaveThenStop, RayPPOTrainer):
    """verl's trainer with the actor update replaced by ``update_actor_opd`` on the worker group."""

    def init_workers(self):
        """With ``opd.rollouts=stored`` training batches take their stored responses (off-policy); the
        validation still generates with the student."""
        super().init_workers()
        if self.config.opd.get("rollouts", "student") == "stored":
            from opd.distill.stored import StoredRollouts

            self.async_rollout_manager = StoredRollouts(
                self.async_rollout_manager, self.tokenizer.pad_token_id
            )

    def _compute_old_log_prob(self, batch: DataProto):
        """OPD has no importance ratio: skip verl's extra student forward; keep the keys fit() expects."""
        response_mask = batch.batch["response_mask"]
        zeros = torch.zeros_like(response_mask, dtype=torch.float32)
        return DataProto.from_dict(tensors={"old_log_probs": zeros, "entropys": zeros}), 0.0

    def _update_actor(self, batch: DataProto) -> DataProto:
        opd = OmegaConf.to_container(self.config.opd, resolve=True)
        config = OPDConfig.from_mapping(opd)
        weighting = config.sample_weighting
        scores_B = batch.batch["token_level_scores"].sum(-1)
        weights_B, weight_metrics = sample_weights(
            config.weighting,
            scores_B,
            batch.non_tensor_batch.get("uid"),
            reward_beta=config.reward_beta,
            alpha=weighting.alpha,
            beta=weighting.beta,
            normalise=weighting.normalise,
        )
        batch.batch["sample_weight"] = weights_B
        if config.teacher_context.active:
            batch.non_tensor_batch[TEACHER_PROMPTS] = self._teacher_prompts(batch, config)
        batch.meta_info["opd"] = opd
        batch.meta_info["global_steps"] = self.global_steps
        batch.meta_info["total_steps"] = self.total_training_steps
        output = self.actor_rollout_wg.update_actor_opd(batch)
        metrics = output.meta_info["metrics"]
        write_token_pairs(metrics.pop("token_pairs", None), self.global_steps)
        metrics.update(tool_mask_metrics(batch))
        metrics.update(weight_metrics)
        metrics["opd/sample_weight_min"] = float(weights_B.min())
        metrics["opd/sample_weight_max"] = float(weights_B.max())
        return output

    def _teacher_prompts(self, batch: DataProto, config: OPDConfig):
        from opd.distill.context import teacher_prompt_ids

        prompts_B_P = batch.batch["prompts"]
        row0 = prompts_B_P[0][batch.batch["attention_mask"][0, : prompts_B_P.shape[1]].bool()].tolist()
        chat_kwargs = self.config.data.get("apply_chat_template_kwargs")
        return teacher_prompt_ids(
            batch.non_tensor_batch,
            self.tokenizer,
            config.teacher_context.field,
            config.teacher_context.template,
            OmegaConf.to_container(chat_kwargs, resolve=True) if chat_kwargs else {},
            student_prompt_ids=row0,
        )


class OPDTaskRunner(main_ppo.TaskRunner):
    """verl's TaskRunner with the OPD worker in the ``actor_rollout_ref`` role and ``OPDTrainer``."""

    def add_actor_rollout_worker(self, config):
        import ray
        from verl.single_controller.ray import RayWorkerGroup

        from opd.distill.worker import OPDActorRolloutRefWorker

        self.role_worker_mapping[Role.ActorRolloutRef] = ray.remote(OPDActorRolloutRefWorker)
        self.mapping[Role.ActorRolloutRef] = "global_pool"
        return OPDActorRolloutRefWorker, RayWorkerGroup

    def add_ref_policy_worker(self, config, ref_policy_cls):
        """The teacher is the ref model inside the actor worker: no separate ref worker group."""

    def run(self, config):
        with trainer_class(OPDTrainer):
            return super().run(config)
