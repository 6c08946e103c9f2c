"""The two-phase OPD update on verl's FSDP actor/rollout/ref worker (ref = the teacher checkpoint).

Phase 1 runs the teacher over every micro-batch and keeps only the configured teacher signal on CPU
(full logits, final hidden states, top-k, or the sampled token's log-prob; see
``opd.distill.teacher_signal``). Phase 2 loads the student, computes the chunked divergence against
that signal, accumulates gradients over micro-batches, clips and steps. Teacher and student compute
are never resident together, and neither phase materialises full-vocabulary logits for prompt tokens:
the model forwards keep logits only from the first response position on.
"""

from __future__ import annotations

import time
from contextlib import contextmanager

import psutil
import torch
from verl import DataProto
from verl.single_controller.base.decorator import make_nd_compute_dataproto_dispatch_fn, register
from verl.utils.device import get_device_id, get_torch_device
from verl.utils.fsdp_utils import (
    FSDPModule,
    fsdp2_clip_grad_norm_,
    load_fsdp_model_to_gpu,
    load_fsdp_optimizer,
    offload_fsdp_model_to_cpu,
    offload_fsdp_optimizer,
)
from verl.workers.fsdp_workers import AsyncActorRolloutRefWorker

from opd.distill.batch import OPDBatch, build_opd_batch
from opd.distill.losses import reduce_divergence, token_divergence
from opd.distill.teacher_signal import TeacherSignal


def _full(tensor: torch.Tensor) -> torch.Tensor:
    """A full tensor from an FSDP2 (DTensor) parameter; plain tensors pass through."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


@contextmanager
def _phase(name: str, metrics: dict):
    """Wall time and peak memory of one phase (device memory on GPU, process RSS on CPU)."""
    device = get_torch_device()
    on_gpu = torch.cuda.is_available()
    if on_gpu:
        device.reset_peak_memory_stats()
    rss_before = psutil.Process().memory_info().rss
    start = time.perf_counter()
    yield
    metrics[f"opd/{name}_seconds"] = time.perf_counter() - start
    if on_gpu:
        metrics[f"opd/{name}_peak_memory_gb"] = device.max_memory_allocated() / 2**30
    else:
        metrics[f"opd/{name}_rss_delta_gb"] = (psutil.Process().memory_info().rss - rss_before) / 2**30


class _MicroBatch:
    """One micro-batch of OPD rows on the device, with the (row, position) of every target token."""

    def __init__(self, opd: OPDBatch, rows: slice, device):
        target_B_L = opd.target_mask_B_L[rows]
        self.input_ids = opd.input_ids_B_L[rows].to(device)
        self.attention_mask = opd.attention_mask_B_L[rows].to(device)
        self.position_ids = opd.position_ids_B_L[rows].to(device)
        self.batch_idx_N, self.target_pos_N = target_B_L.nonzero(as_tuple=True)
        self.target_ids_N = opd.input_ids_B_L[rows][self.batch_idx_N, self.target_pos_N]
        weights_B = opd.sample_weight_B[rows] if opd.sample_weight_B is not None else None
        self.weight_N = None if weights_B is None else weights_B[self.batch_idx_N]
        width = self.input_ids.shape[1]
        # logits at position t - 1 predict the token at t: keep the last `keep` positions only
        self.keep = width - (int(self.target_pos_N.min()) - 1)
        self.offset_N = self.target_pos_N - 1 - (width - self.keep)

    def forward(self, module, **kwargs):
        return module(
            input_ids=self.input_ids,
            attention_mask=self.attention_mask,
            position_ids=self.position_ids,
            use_cache=False,
            **kwargs,
        )

    def select(self, per_position_B_T_X: torch.Tensor) -> torch.Tensor:
        """(B, keep, X) -> (N, X) at the positions that predict the target tokens."""
        return per_position_B_T_X[
            self.batch_idx_N.to(per_position_B_T_X.device), self.offset_N.to(per_position_B_T_X.device)
        ]


def _micro_batches(opd: OPDBatch, size: int, device) -> list[_MicroBatch]:
    return [_MicroBatch(opd, slice(start, start + size), device) for start in range(0, len(opd), size)]


class OPDActorRolloutRefWorker(AsyncActorRolloutRefWorker):
    """verl's hybrid actor/rollout/ref worker plus ``update_actor_opd``; the ref model is the teacher."""

    @register(dispatch_mode=make_nd_compute_dataproto_dispatch_fn(mesh_name="actor"))
    def update_actor_opd(self, data: DataProto) -> DataProto:
        assert self._is_actor and self._is_ref, "OPD needs the actor and the teacher (ref) in one worker"
        opd_config = data.meta_info["opd"]
        device = get_device_id()
        metrics: dict[str, float] = {}
        opd = build_opd_batch(
            data.to("cpu"),
            self.tokenizer,
            max_length=opd_config["max_length"],
            overlong=opd_config["overlong"],
        )
        metrics.update(opd.stats)
        micro = _micro_batches(opd, self.config.actor.ppo_micro_batch_size_per_gpu, device)

        with _phase("teacher", metrics):
            signals = self._teacher_signals(micro, opd_config)
        signal_bytes = sum(s.nbytes_per_token() * s.num_tokens for s in signals)
        metrics["opd/teacher_signal_mb"] = signal_bytes / 2**20
        # which signal the teacher really sent, in its own unit (logits 2V, hidden 2H, topk 8K+4, sampled 8)
        metrics["opd/teacher_signal_bytes_per_token"] = signal_bytes / max(
            sum(s.num_tokens for s in signals), 1
        )

        with _phase("student", metrics):
            step = int(data.meta_info.get("global_steps", 0))
            metrics.update(self._student_update(micro, signals, opd_config, step))
        return DataProto(meta_info={"metrics": metrics})

    @torch.no_grad()
    def _teacher_signals(self, micro: list[_MicroBatch], opd_config: dict) -> list[TeacherSignal]:
        """Phase 1: teacher forwards for all micro-batches; signals end up on CPU."""
        teacher = self.ref_module_fsdp
        teacher.eval()
        head = teacher.get_output_embeddings()
        signals = []
        for mb in micro:
            out = mb.forward(teacher, output_hidden_states=True, logits_to_keep=mb.keep)
            hidden_N_H = mb.select(out.hidden_states[-1][:, -mb.keep :])
            del out
            # the head is gathered per micro-batch: with FSDP2 it is resharded after every forward
            signals.append(
                TeacherSignal.from_hidden(
                    hidden_N_H,
                    _full(head.weight),
                    None if head.bias is None else _full(head.bias),
                    mode=opd_config["teacher_signal"],
                    k=opd_config["topk"],
                    sampled_ids_N=mb.target_ids_N.to(hidden_N_H.device),
                    vocab_size=opd_config["vocab_size"],
                    chunk_size=opd_config["chunk_size"],
                    device="cpu",
                )
            )
        return signals

    def _student_update(
        self, micro: list[_MicroBatch], signals: list[TeacherSignal], opd_config: dict, step: int
    ) -> dict:
        """Phase 2: ``ppo_epochs`` passes over the batch in mini-batches of ``ppo_mini_batch_size`` rows (verl's
        meaning); per mini-batch: student forwards, chunked divergence, backward per micro-batch, clip, step.
        The teacher signal is reused by every pass: it depends on the rollout tokens only."""
        if self._is_offload_param:
            load_fsdp_model_to_gpu(self.actor_module_fsdp)
        if self._is_offload_optimizer:
            load_fsdp_optimizer(optimizer=self.actor_optimizer, device_id=get_device_id())
        student = self.actor_module_fsdp
        student.train()
        actor = self.config.actor
        per_mini = max(1, actor.ppo_mini_batch_size // actor.ppo_micro_batch_size_per_gpu)
        pairs = list(zip(micro, signals, strict=True))
        loss_type = self.divergence_at(step, opd_config)
        totals = {"div": 0.0, "entropy": 0.0, "tokens": 0, "kept": 0.0}
        grad_norms, epoch_divergence = [], []
        for _ in range(actor.ppo_epochs):
            div_before, tokens_before = totals["div"], totals["tokens"]
            for start in range(0, len(pairs), per_mini):
                mini = pairs[start : start + per_mini]
                grad_norms.append(self._mini_batch_step(mini, opd_config, loss_type, step, totals))
            epoch_divergence.append((totals["div"] - div_before) / max(totals["tokens"] - tokens_before, 1))
        lr = self.actor_lr_scheduler.get_last_lr()[0]
        self.actor_lr_scheduler.step()
        if self._is_offload_param:
            offload_fsdp_model_to_cpu(self.actor_module_fsdp)
        if self._is_offload_optimizer:
            offload_fsdp_optimizer(optimizer=self.actor_optimizer)
        n_tokens = max(totals["tokens"], 1)
        return {
            "opd/divergence": totals["div"] / n_tokens,
            # the same value under the divergence actually optimised, so a run can show which one it was
            f"opd/divergence/{loss_type}": totals["div"] / n_tokens,
            # the same rows before and after this step's updates (ppo_epochs > 1): did the updates move the
            # student toward the teacher?
            "opd/divergence_first_epoch": epoch_divergence[0],
            "opd/divergence_last_epoch": epoch_divergence[-1],
            "opd/selected_token_fraction": totals["kept"] / n_tokens,
            "opd/optimizer_steps": len(grad_norms),
            "actor/entropy": totals["entropy"] / n_tokens,  # replaces verl's (skipped) old-log-prob pass
            "actor/grad_norm": sum(grad_norms) / max(len(grad_norms), 1),
            "actor/lr": lr.item() if torch.is_tensor(lr) else lr,
        }

    def _mini_batch_step(
        self,
        mini: list[tuple[_MicroBatch, TeacherSignal]],
        opd_config: dict,
        loss_type: str,
        step: int,
        totals,
    ) -> float:
        """One optimizer step: gradients accumulated over the mini-batch's micro-batches, then clip and step."""
        student = self.actor_module_fsdp
        self.actor_optimizer.zero_grad()
        # the loss is the mini-batch's (weighted) token mean: each micro-batch's sum over the whole weight
        total_weight = sum(
            float(mb.weight_N.sum()) if mb.weight_N is not None else len(mb.target_ids_N) for mb, _ in mini
        )
        for mb, signal in mini:
            student_logits_N_V = mb.select(mb.forward(student, logits_to_keep=mb.keep).logits)
            # the target rows are a copy only this loss reads: their storage receives the gradient
            div_N, entropy_N = token_divergence(
                student_logits_N_V,
                signal.to(student_logits_N_V.device),
                loss_type,
                beta=opd_config["beta"],
                chunk_size=opd_config["chunk_size"],
                vocab_size=opd_config["vocab_size"],
                overwrite_logits=True,
            )
            weight_N = None if mb.weight_N is None else mb.weight_N.to(div_N.device)
            selected_N = self.select_tokens(div_N.detach(), entropy_N, mb, step)
            if selected_N is not None:
                selected_N = selected_N.to(div_N)
                weight_N = selected_N if weight_N is None else weight_N * selected_N
            loss = reduce_divergence(div_N, weight_N=weight_N, mode="sum") / max(total_weight, 1e-12)
            loss.backward()
            totals["div"] += float(div_N.detach().sum())
            totals["entropy"] += float(entropy_N.sum())
            totals["tokens"] += len(div_N)
            totals["kept"] += len(div_N) if selected_N is None else float((selected_N > 0).sum())
            del student_logits_N_V, div_N, loss
        return self._clip_and_step()

    def select_tokens(
        self, div_N: torch.Tensor, entropy_N: torch.Tensor, mb: _MicroBatch, step: int
    ) -> torch.Tensor | None:
        """Hook for per-token selection (token-importance methods): a weight per target token, 0 to drop it,
        applied before the reduction; the divergence and student entropy come from the same pass. The
        normaliser stays the mini-batch's weight before selection. Default: every token (None)."""
        return None

    def divergence_at(self, step: int, opd_config: dict) -> str:
        """Hook for a divergence that changes with the training step (e.g. forward then reverse KL).
        Default: ``opd.loss_type`` throughout."""
        return opd_config["loss_type"]

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
