"""verl's FSDP actor/rollout/ref worker as a thin adapter of the two-phase OPD step (ref = the teacher).

The algorithm lives in ``opd.distill.step`` (plain torch, no Ray): this class reads the typed config and
verl's batch geometry, builds the rows, loads and offloads the FSDP modules between the phases, clips
through FSDP, and steps the learning-rate schedule. Its hooks (``select_tokens``, ``divergence_at``) are
what token-selection and divergence-schedule methods override.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from verl import DataProto
from verl.single_controller.base.decorator import make_nd_compute_dataproto_dispatch_fn, register
from verl.utils.device import get_device_id
from verl.utils.fsdp_utils import (
    FSDPModule,
    fsdp2_clip_grad_norm_,
    load_fsdp_model_to_gpu,
    load_fsdp_optimizer,
    offload_fsdp_model_to_cpu,
    offload_fsdp_optimizer,
)
from verl.workers.fsdp_workers import AsyncActorRolloutRefWorker

from opd.distill.batch import build_opd_batch
from opd.distill.config import OPDConfig
from opd.distill.packing import PackedMicroBatch
from opd.distill.step import Collectives, StepSettings, run_step


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A full tensor from an FSDP2 (DTensor) value; plain tensors pass through."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def _overrides(worker, name: str) -> bool:
    return getattr(type(worker), name) is not getattr(OPDActorRolloutRefWorker, name)


def step_settings(actor_config) -> StepSettings:
    """verl's actor batch geometry, after verl's per-rank normalisation (rows per rank and mini-batch)."""
    dynamic = bool(actor_config.get("use_dynamic_bsz", False))
    return StepSettings(
        rows_per_mini_batch=int(actor_config.ppo_mini_batch_size),
        max_rows=None if dynamic else int(actor_config.ppo_micro_batch_size_per_gpu),
        max_tokens=int(actor_config.ppo_max_token_len_per_gpu) if dynamic else None,
        ppo_epochs=int(actor_config.ppo_epochs),
        grad_clip=float(actor_config.grad_clip),
    )


class OPDActorRolloutRefWorker(AsyncActorRolloutRefWorker):
    """verl's hybrid actor/rollout/ref worker plus ``update_actor_opd``; the ref model is the teacher."""

    def _build_model_optimizer(self, *args, role="actor", **kwargs):
        """verl sets ``self.tokenizer`` for every model it builds, the teacher (ref) last, and hands it to the
        checkpoint manager: keep the student's, so student checkpoints carry the student's tokenizer."""
        kept = (getattr(self, "tokenizer", None), getattr(self, "processor", None))
        try:
            return super()._build_model_optimizer(*args, role=role, **kwargs)
        finally:
            if role == "ref" and kept[0] is not None:
                self.tokenizer, self.processor = kept

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor_opd(self, data: DataProto) -> DataProto:
        assert self._is_actor and self._is_ref, "OPD needs the actor and the teacher (ref) in one worker"
        opd_config = OPDConfig.from_mapping(data.meta_info["opd"])
        device = get_device_id()
        opd = build_opd_batch(
            data.to("cpu"),
            self.tokenizer,
            max_length=opd_config.max_length,
            overlong=opd_config.overlong,
            allow_empty=True,  # a rank left without rows still runs its passes (padding micro-batches)
        )
        step = int(data.meta_info.get("global_steps", 0))
        total_steps = data.meta_info.get("total_steps")
        loss_type = self.divergence_at(step, opd_config, total_steps)
        metrics = run_step(
            self.actor_module_fsdp,
            self.ref_module_fsdp,
            self.actor_optimizer,
            opd,
            opd_config,
            step_settings(self.config.actor),
            device,
            batch_rows=len(data),
            collectives=Collectives(),
            pad_token_id=self.tokenizer.pad_token_id or 0,
            student_on_device=self._student_on_device,
            loss_type=loss_type,
            step=step,
            clip_and_step=self._clip_and_step,
            # the hook only when a subclass overrides it: otherwise opd.token_selection decides (and with
            # rule=all no scoring pass runs)
            select_tokens=self.select_tokens if _overrides(self, "select_tokens") else None,
        )
        lr = self.actor_lr_scheduler.get_last_lr()[0]
        self.actor_lr_scheduler.step()
        metrics["actor/lr"] = lr.item() if torch.is_tensor(lr) else lr
        if opd_config.schedule.stages:
            metrics["opd/schedule/stage"] = float(opd_config.schedule.stage_at(step, total_steps))
        return DataProto(meta_info={"metrics": metrics})

    @contextmanager
    def _student_on_device(self):
        """The student and its optimizer state on the device for phase 2, offloaded after (as configured)."""
        if self._is_offload_param:
            load_fsdp_model_to_gpu(self.actor_module_fsdp)
        if self._is_offload_optimizer:
            load_fsdp_optimizer(optimizer=self.actor_optimizer, device_id=get_device_id())
        yield
        if self._is_offload_param:
            offload_fsdp_model_to_cpu(self.actor_module_fsdp)
        if self._is_offload_optimizer:
            offload_fsdp_optimizer(optimizer=self.actor_optimizer)

    def select_tokens(
        self, div_N: torch.Tensor, entropy_N: torch.Tensor, mb: PackedMicroBatch, step: int
    ) -> torch.Tensor | None:
        """Hook for a custom per-token selection: a factor per target token, 0 to drop it, from every token's
        divergence and student entropy (a scoring pass over the output head); only kept tokens enter the
        gradient pass. Overriding it replaces ``opd.token_selection``'s rule; the normaliser stays the
        mini-batch's weight before selection. Not called unless overridden."""
        return None

    def divergence_at(self, step: int, opd_config: OPDConfig, total_steps: int | None = None) -> str:
        """Hook for the divergence of training step ``step`` (1-based) of ``total_steps``. Default: the stage
        of ``opd.schedule`` the step is in (e.g. forward KL, then reverse KL), else ``opd.loss_type``."""
        return opd_config.schedule.loss_type_at(step, total_steps, opd_config.loss_type)

    def _clip_and_step(self) -> float:
        module, max_norm = self.actor_module_fsdp, self.config.actor.grad_clip
        if isinstance(module, FSDPModule):
            grad_norm = fsdp2_clip_grad_norm_(module.parameters(), max_norm=max_norm)
        elif hasattr(module, "clip_grad_norm_"):
            grad_norm = module.clip_grad_norm_(max_norm=max_norm)
        else:
            grad_norm = torch.nn.utils.clip_grad_norm_(module.parameters(), max_norm=max_norm)
        grad_norm = _full(grad_norm) if torch.is_tensor(grad_norm) else torch.tensor(grad_norm)
        if torch.isfinite(grad_norm):
            self.actor_optimizer.step()
        else:  # a non-finite step would poison the weights: skip it and say so in the metrics
            self.actor_optimizer.zero_grad()
        return float(grad_norm)
