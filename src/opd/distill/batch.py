"""Turn a verl rollout batch into the token rows the teacher and the student are trained on.

The student must be trained on exactly the tokens it generated from: the pre-tokenized ``prompts``
and ``responses`` of the rollout, with ``response_mask`` (1 = model token, 0 = tool/environment token)
as the loss mask. Re-rendering ``raw_prompt`` with the chat template is only a fallback for batches
without ``prompts``. Rows are padded to the longest row of the batch (not to ``max_length``), and no
row is ever truncated silently: overlong rows are truncated, skipped or refused as configured, and
every such row is counted.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from opd.distill.config import OVERLONG_POLICIES

logger = logging.getLogger(__name__)

# non-tensor column of the rollout batch: the teacher's prompt token ids per row (opd.teacher_context)
TEACHER_PROMPTS = "opd_teacher_prompt_ids"


@dataclass
class OPDBatch:
    """Right-padded rows ``prompt + response``; ``target_mask_B_L[b, t]`` marks tokens to be predicted
    (logits at ``t - 1`` are compared with the teacher's there)."""

    input_ids_B_L: torch.Tensor
    attention_mask_B_L: torch.Tensor
    position_ids_B_L: torch.Tensor
    target_mask_B_L: torch.Tensor
    prompt_lengths_B: torch.Tensor
    kept_rows: list[int]  # row indices into the rollout batch
    sample_weight_B: torch.Tensor | None = None
    uids: list | None = None
    stats: dict[str, float] = field(default_factory=dict)
    # the teacher's rows when its prompts differ (opd.teacher_context): the same rows in the same order with
    # the same response tokens and targets, after the teacher's own prompt
    teacher_rows: OPDBatch | None = None
    # (rollout row, model tokens) of the rows dropped for weight 0: with opd.sample_weighting.normalise=none
    # they still count in the loss normaliser (opd.distill.step)
    dropped_targets: list[tuple[int, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return self.input_ids_B_L.shape[0]


def _row_lists_from_prompts(batch) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, response ids, response mask) per row, exactly as the rollout produced them."""
    tensors = batch.batch
    prompts_B_P, responses_B_R = tensors["prompts"], tensors["responses"]
    prompt_len = prompts_B_P.shape[1]
    attention_B_T = tensors["attention_mask"]
    response_mask_B_R = tensors["response_mask"] if "response_mask" in tensors.keys() else None
    rows = []
    for b in range(prompts_B_P.shape[0]):
        prompt_valid = attention_B_T[b, :prompt_len].bool()
        response_valid = attention_B_T[b, prompt_len:].bool()
        prompt = prompts_B_P[b][prompt_valid].tolist()
        n_response = int(response_valid.sum())
        response = responses_B_R[b, :n_response].tolist()
        if response_mask_B_R is None:  # plain single-turn rollouts: every response token is the model's
            mask = [1] * n_response
        else:
            mask = response_mask_B_R[b, :n_response].int().tolist()
        rows.append((prompt, response, mask))
    return rows


def _row_lists_from_raw_prompt(batch, tokenizer, chat_template_kwargs: dict | None):
    """Fallback: re-render ``raw_prompt`` with the chat template (may differ from what was generated)."""
    if tokenizer is None:
        raise ValueError("the batch has no `prompts`: pass the tokenizer so raw_prompt can be re-rendered")
    if "raw_prompt" not in batch.non_tensor_batch:
        raise ValueError("the batch has neither `prompts` nor `raw_prompt`: cannot build OPD rows")
    tensors = batch.batch
    responses_B_R = tensors["responses"]
    response_len = responses_B_R.shape[1]
    attention_B_T = tensors["attention_mask"]
    response_mask_B_R = tensors["response_mask"] if "response_mask" in tensors.keys() else None
    rows = []
    for b, messages in enumerate(batch.non_tensor_batch["raw_prompt"]):
        prompt = tokenizer.apply_chat_template(
            list(messages), add_generation_prompt=True, tokenize=True, **(chat_template_kwargs or {})
        )
        n_response = int(attention_B_T[b, -response_len:].sum())
        response = responses_B_R[b, :n_response].tolist()
        mask = (
            [1] * n_response
            if response_mask_B_R is None
            else response_mask_B_R[b, :n_response].int().tolist()
        )
        rows.append((list(prompt), response, mask))
    return rows


def _assemble(
    batch,
    rows,
    max_length: int | None,
    overlong: str,
    pad_token_id: int,
    source: str,
    allow_empty: bool = False,
) -> OPDBatch:
    if overlong not in OVERLONG_POLICIES:
        raise ValueError(f"overlong={overlong!r}: choose one of {OVERLONG_POLICIES}")
    n_rows = len(rows)
    if n_rows == 0:
        raise ValueError("empty rollout batch: nothing to distill (check the data loader and rollout.n)")
    kept, kept_rows = [], []
    n_truncated = n_skipped_long = n_skipped_no_target = n_skipped_weight = tokens_saved = 0
    weights_all = batch.batch["sample_weight"].float() if "sample_weight" in batch.batch.keys() else None
    dropped_targets: list[tuple[int, int]] = []
    for b, (prompt, response, mask) in enumerate(rows):
        if weights_all is not None and float(weights_all[b]) == 0.0:
            # weight 0 (e.g. a prompt the student always or never solves, opd.sample_weighting=paced): it adds
            # nothing to the loss, so neither model runs on it
            n_skipped_weight += 1
            tokens_saved += len(prompt) + len(response)
            dropped_targets.append((b, sum(mask)))
            continue
        if max_length is not None and len(prompt) + len(response) > max_length:
            if overlong == "error":
                raise ValueError(
                    f"row {b}: prompt {len(prompt)} + response {len(response)} tokens exceed opd.max_length="
                    f"{max_length}; raise opd.max_length or set opd.overlong=truncate|skip"
                )
            if overlong == "skip" or len(prompt) >= max_length:
                n_skipped_long += 1
                continue
            keep = max_length - len(prompt)
            response, mask = response[:keep], mask[:keep]
            n_truncated += 1
        if sum(mask) == 0:  # e.g. a response made only of tool output: no model token to distill
            n_skipped_no_target += 1
            continue
        kept.append((prompt, response, mask))
        kept_rows.append(b)
    if n_truncated or n_skipped_long:
        logger.warning(
            "opd batch: %d rows truncated and %d skipped at max_length=%s",
            n_truncated,
            n_skipped_long,
            max_length,
        )
    if n_skipped_no_target:
        logger.warning(
            "opd batch: skipped %d rows without model-generated tokens (all tool tokens)", n_skipped_no_target
        )
    if not kept and not allow_empty:
        raise ValueError(
            f"no row of the {n_rows}-row batch has a model-generated token left to distill "
            f"({n_skipped_long} overlong, {n_skipped_no_target} without model tokens, {n_skipped_weight} of weight 0)"
        )

    input_ids, attention, positions, target, prompt_lengths = _tensors(kept, pad_token_id)
    non_tensor = batch.non_tensor_batch
    weights = None if weights_all is None else weights_all[kept_rows]
    uids = [non_tensor["uid"][b] for b in kept_rows] if "uid" in non_tensor else None
    stats = {
        "opd/rows": float(len(kept)),
        "opd/rows_truncated": float(n_truncated),
        "opd/rows_skipped_overlong": float(n_skipped_long),
        "opd/rows_skipped_no_model_tokens": float(n_skipped_no_target),
        "opd/rows_skipped_zero_weight": float(n_skipped_weight),
        "opd/teacher_tokens_saved": float(tokens_saved),  # prompt + response tokens of the rows of weight 0
        "opd/target_tokens": float(target.sum()),
        "opd/padded_width": float(input_ids.shape[1]),
        "opd/prompt_source_raw": float(source == "raw_prompt"),
    }
    teacher_rows = None
    if TEACHER_PROMPTS in non_tensor:
        # the teacher's prompt, then exactly the response (and targets) kept for the student
        teacher_kept = [
            (list(non_tensor[TEACHER_PROMPTS][b]), response, mask)
            for b, (_, response, mask) in zip(kept_rows, kept, strict=True)
        ]
        t_ids, t_attention, t_positions, t_target, t_prompt_lengths = _tensors(teacher_kept, pad_token_id)
        teacher_rows = OPDBatch(t_ids, t_attention, t_positions, t_target, t_prompt_lengths, kept_rows)
        stats["opd/teacher_prompt_extra_tokens"] = float((t_prompt_lengths - prompt_lengths).sum())
    return OPDBatch(
        input_ids,
        attention,
        positions,
        target,
        prompt_lengths,
        kept_rows,
        weights,
        uids,
        stats,
        teacher_rows,
        dropped_targets,
    )


def _tensors(kept: list, pad_token_id: int) -> tuple[torch.Tensor, ...]:
    """Right-padded (input ids, attention, positions, targets, prompt lengths) of (prompt, response, mask)."""
    width = max((len(p) + len(r) for p, r, _ in kept), default=1)
    n_kept = len(kept)
    input_ids = torch.full((n_kept, width), pad_token_id, dtype=torch.long)
    attention = torch.zeros((n_kept, width), dtype=torch.long)
    target = torch.zeros((n_kept, width), dtype=torch.bool)
    prompt_lengths = torch.zeros(n_kept, dtype=torch.long)
    for i, (prompt, response, mask) in enumerate(kept):
        length = len(prompt) + len(response)
        input_ids[i, :length] = torch.tensor(prompt + response, dtype=torch.long)
        attention[i, :length] = 1
        target[i, len(prompt) : length] = torch.tensor(mask, dtype=torch.bool)
        prompt_lengths[i] = len(prompt)
    positions = (attention.cumsum(-1) - 1).clamp(min=0)
    return input_ids, attention, positions, target, prompt_lengths


def build_opd_batch(
    batch,
    tokenizer=None,
    *,
    pad_token_id: int | None = None,
    max_length: int | None = None,
    overlong: str = "truncate",
    chat_template_kwargs: dict | None = None,
    allow_empty: bool = False,
) -> OPDBatch:
    """Rows for distillation from a verl ``DataProto`` rollout batch.

    Prefers the pre-tokenized ``prompts`` + ``response_mask`` (exact rollout inputs, tool tokens masked);
    falls back to ``raw_prompt`` + the chat template only if ``prompts`` is absent. A tensor
    ``sample_weight`` (per row) and the ``uid`` column are carried along with the kept rows. A batch with no
    row left to distill is an error unless ``allow_empty`` (one rank of several may be left without rows:
    it still runs its passes, see ``opd.distill.packing``).
    """
    if "prompts" in batch.batch.keys():
        rows, source = _row_lists_from_prompts(batch), "prompts"
    else:
        rows, source = _row_lists_from_raw_prompt(batch, tokenizer, chat_template_kwargs), "raw_prompt"
    return _assemble(batch, rows, max_length, overlong, _pad_id(pad_token_id, tokenizer), source, allow_empty)


def build_opd_batch_multiturn(batch, tokenizer=None, **kwargs) -> OPDBatch:
    """Prompts-only path (multi-turn agent rollouts): requires pre-tokenized ``prompts``."""
    if "prompts" not in batch.batch.keys():
        raise ValueError("build_opd_batch_multiturn needs the rollout's pre-tokenized `prompts`")
    return build_opd_batch(batch, tokenizer, **kwargs)


def build_opd_batch_from_verl_batch(
    batch,
    tokenizer,
    *,
    pad_token_id: int | None = None,
    max_length: int | None = None,
    overlong: str = "truncate",
    chat_template_kwargs: dict | None = None,
) -> OPDBatch:
    """Raw-prompt-only path: always re-renders ``raw_prompt`` with the chat template."""
    rows = _row_lists_from_raw_prompt(batch, tokenizer, chat_template_kwargs)
    return _assemble(batch, rows, max_length, overlong, _pad_id(pad_token_id, tokenizer), "raw_prompt")


def _pad_id(pad_token_id: int | None, tokenizer) -> int:
    if pad_token_id is not None:
        return pad_token_id
    if tokenizer is not None and tokenizer.pad_token_id is not None:
        return tokenizer.pad_token_id
    return 0
