"""Packed, unpadded micro-batches: rows concatenated into one sequence, position ids restarting per row.

Shapes: T tokens of a packed micro-batch (the sum of its rows' lengths), N its target tokens.

Why: a padded micro-batch of B rows computes B x L positions, most of them other rows' prompts and padding;
at math-like response lengths that is over twice the target tokens. Packed, every position is a real
token, and the output head sees the target positions only (``target_index_N``), so logit rows = target
tokens. Attention stays within a row: transformers builds a block-diagonal causal mask from position ids
that restart at 0 when no attention mask is passed (SDPA/eager on CPU), and flash-attention's varlen path
reads the same position ids on GPU (verl's remove-padding format: batch dimension 1).

Split: by a token budget per micro-batch (verl's ``use_dynamic_bsz`` + ``ppo_max_token_len_per_gpu``) or by
a row count (``ppo_micro_batch_size_per_gpu``), rows in order. Rows form mini-batches by their index in
the rollout batch (``ppo_mini_batch_size`` rows per rank), so every rank has the same number of
mini-batches whatever rows it dropped; ``pad_to`` then gives every rank the same number of micro-batches
per mini-batch with one-token padding micro-batches (loss coefficient 0): FSDP's collectives run once per
forward and backward, and a rank that runs fewer passes than the others would hang them all.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from opd.distill.batch import OPDBatch


@dataclass
class PackedMicroBatch:
    """Rows ``rows_R`` of an ``OPDBatch`` packed into one sequence of T tokens."""

    input_ids_T: torch.Tensor
    position_ids_T: torch.Tensor
    target_index_N: torch.Tensor  # positions whose output predicts a target token (the target's position - 1)
    target_ids_N: torch.Tensor
    token_row_N: torch.Tensor  # the OPDBatch row of each target token (-1 in a padding micro-batch)
    rows_R: torch.Tensor  # OPDBatch row indices
    padding: bool = False  # a stand-in that keeps collectives in step: its loss coefficient is 0

    @property
    def num_tokens(self) -> int:
        return self.input_ids_T.shape[0]

    @property
    def num_targets(self) -> int:
        return 0 if self.padding else self.target_ids_N.shape[0]

    def model_inputs(self, device) -> dict:
        """Keyword arguments of a HF causal LM forward: one packed row, no attention mask (see module doc)."""
        return {
            "input_ids": self.input_ids_T[None].to(device),
            "position_ids": self.position_ids_T[None].to(device),
            "logits_to_keep": self.target_index_N.to(device),
            "use_cache": False,
        }


def pack_rows(opd: OPDBatch, rows: list[int]) -> PackedMicroBatch:
    """One packed micro-batch of ``opd``'s rows ``rows`` (in that order)."""
    lengths_B = opd.attention_mask_B_L.sum(-1)
    ids, positions, targets, owners = [], [], [], []
    offset = 0
    for row in rows:
        length = int(lengths_B[row])
        ids.append(opd.input_ids_B_L[row, :length])
        positions.append(torch.arange(length))
        target_T = opd.target_mask_B_L[row, :length].nonzero().flatten()
        targets.append(offset + target_T)
        owners.append(torch.full_like(target_T, row))
        offset += length
    input_ids_T = torch.cat(ids)
    target_pos_N = torch.cat(targets)
    return PackedMicroBatch(
        input_ids_T=input_ids_T,
        position_ids_T=torch.cat(positions),
        target_index_N=target_pos_N - 1,
        target_ids_N=input_ids_T[target_pos_N],
        token_row_N=torch.cat(owners),
        rows_R=torch.tensor(rows, dtype=torch.long),
    )


def padding_micro_batch(pad_token_id: int = 0) -> PackedMicroBatch:
    """A one-token stand-in (one target at position 0, coefficient 0) for ranks with fewer micro-batches."""
    zero = torch.zeros(1, dtype=torch.long)
    return PackedMicroBatch(
        input_ids_T=torch.full((1,), pad_token_id, dtype=torch.long),
        position_ids_T=zero,
        target_index_N=zero,
        target_ids_N=torch.full((1,), pad_token_id, dtype=torch.long),
        token_row_N=torch.full((1,), -1, dtype=torch.long),
        rows_R=torch.zeros(0, dtype=torch.long),
        padding=True,
    )


def split_rows(
    lengths: list[int], *, max_tokens: int | None = None, max_rows: int | None = None
) -> list[list[int]]:
    """Consecutive groups of row positions: each within ``max_tokens`` tokens (a longer row goes alone) and
    ``max_rows`` rows. Exactly one limit must be given."""
    if (max_tokens is None) == (max_rows is None):
        raise ValueError("split_rows needs exactly one of max_tokens (a token budget) and max_rows")
    groups: list[list[int]] = []
    tokens = 0
    for i, length in enumerate(lengths):
        full = (
            (tokens + length > max_tokens if max_tokens is not None else len(groups[-1]) >= max_rows)
            if groups
            else True
        )
        if full:
            groups.append([])
            tokens = 0
        groups[-1].append(i)
        tokens += length
    return groups


def mini_batches(
    opd: OPDBatch,
    batch_rows: int,
    rows_per_mini_batch: int,
    *,
    max_tokens: int | None = None,
    max_rows: int | None = None,
) -> list[list[PackedMicroBatch]]:
    """Packed micro-batches per mini-batch. ``batch_rows`` is the rollout batch's row count on this rank
    (before rows were dropped): it fixes the number of mini-batches, ceil(batch_rows / rows_per_mini_batch),
    identically on every rank. A mini-batch whose rows were all dropped is an empty list (``pad_to`` fills it)."""
    if rows_per_mini_batch < 1:
        raise ValueError(f"rows_per_mini_batch must be >= 1, got {rows_per_mini_batch}")
    n_mini = -(-batch_rows // rows_per_mini_batch)
    members: list[list[int]] = [[] for _ in range(n_mini)]
    for i, original in enumerate(opd.kept_rows):
        members[original // rows_per_mini_batch].append(i)
    lengths_B = opd.attention_mask_B_L.sum(-1).tolist()
    result = []
    for rows in members:
        groups = (
            split_rows([lengths_B[r] for r in rows], max_tokens=max_tokens, max_rows=max_rows) if rows else []
        )
        result.append([pack_rows(opd, [rows[i] for i in group]) for group in groups])
    return result


def pad_to(minis: list[list[PackedMicroBatch]], counts: list[int], pad_token_id: int = 0) -> None:
    """Append padding micro-batches so that mini-batch m has ``counts[m]`` micro-batches (the maximum over
    ranks), at least one each."""
    if len(counts) != len(minis):
        raise ValueError(f"{len(counts)} counts for {len(minis)} mini-batches")
    for micro, count in zip(minis, counts, strict=True):
        micro.extend(padding_micro_batch(pad_token_id) for _ in range(max(count, 1) - len(micro)))
