"""The padded OPD step that ``opd.distill.step`` replaced, kept as the reference it is measured and tested
against (``python -m opd.bench.step``, ``tests/test_opd_step.py``).

Per micro-batch of B right-padded rows: the model's logits for the last ``keep`` positions of every row
(``keep`` from the earliest target position of the micro-batch on: other rows' prompts and padding
included), the target rows selected from them, ``token_divergence`` on those rows. The teacher forward asks
for every layer's hidden states and computes logits it throws away. Loss: the mini-batch's token mean
(sample-weighted), one normaliser per rank.
"""

from __future__ import annotations

import torch

from opd.distill.batch import OPDBatch
from opd.distill.config import OPDConfig
from opd.distill.losses import reduce_divergence, token_divergence
from opd.distill.teacher_signal import TeacherSignal


class PaddedMicroBatch:
    """One micro-batch of right-padded rows, with the (row, position) of every target token."""

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
        device = per_position_B_T_X.device
        return per_position_B_T_X[self.batch_idx_N.to(device), self.offset_N.to(device)]

    @property
    def logit_rows(self) -> int:
        return self.input_ids.shape[0] * self.keep


def padded_micro_batches(opd: OPDBatch, rows: int, device) -> list[PaddedMicroBatch]:
    return [PaddedMicroBatch(opd, slice(start, start + rows), device) for start in range(0, len(opd), rows)]


@torch.no_grad()
def padded_teacher_signals(
    teacher, micro: list[PaddedMicroBatch], opd_config: OPDConfig
) -> list[TeacherSignal]:
    teacher.eval()
    head = teacher.get_output_embeddings()
    signals = []
    for mb in micro:
        out = mb.forward(teacher, output_hidden_states=True, logits_to_keep=mb.keep)
        hidden_N_H = mb.select(out.hidden_states[-1][:, -mb.keep :])
        del out
        signals.append(
            TeacherSignal.from_hidden(
                hidden_N_H,
                head.weight,
                head.bias,
                mode=opd_config.teacher_signal,
                k=opd_config.topk,
                sampled_ids_N=mb.target_ids_N.to(hidden_N_H.device),
                vocab_size=opd_config.vocab_size,
                chunk_size=opd_config.chunk_size,
                device="cpu",
            )
        )
    return signals


def padded_mini_batch_backward(
    student,
    micro: list[PaddedMicroBatch],
    signals: list[TeacherSignal],
    opd_config: OPDConfig,
    loss_type=None,
) -> float:
    """Gradients of one mini-batch accumulated on ``student`` (no optimizer step); returns the token-summed
    divergence."""
    total_weight = sum(
        float(mb.weight_N.sum()) if mb.weight_N is not None else len(mb.target_ids_N) for mb in micro
    )
    total_div = 0.0
    for mb, signal in zip(micro, signals, strict=True):
        logits_N_V = mb.select(mb.forward(student, logits_to_keep=mb.keep).logits)
        div_N, _ = token_divergence(
            logits_N_V,
            signal.to(logits_N_V.device),
            loss_type or opd_config.loss_type,
            beta=opd_config.beta,
            chunk_size=opd_config.chunk_size,
            vocab_size=opd_config.vocab_size,
            overwrite_logits=True,
        )
        weight_N = None if mb.weight_N is None else mb.weight_N.to(div_N.device)
        loss = reduce_divergence(div_N, weight_N=weight_N, mode="sum") / max(total_weight, 1e-12)
        loss.backward()
        total_div += float(div_N.detach().sum())
    return total_div
