"""The teacher's prompt with privileged context (``opd.teacher_context``): self-distillation's teacher sees
the reference answer (or any data column) that the student's prompt lacks.

Per rollout row: the value at ``field`` (a dotted path: the batch column, then keys into it) goes into the
teacher's copy of the prompt's last user message through ``template``; the copy is rendered with the chat
template exactly as verl renders the student's prompt for the rollout. The response tokens are not
re-rendered: the teacher scores the student's own tokens (``opd.distill.batch``: ``teacher_rows``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)


class MissingContextError(ValueError):
    """A row has no value at ``opd.teacher_context.field``; the message names the row and the fix."""


def field_value(row: Mapping[str, Any], path: str) -> Any:
    """``row``'s value at a dotted ``path`` (``reward_model.ground_truth``: the column, then its keys);
    None where any part is absent."""
    value: Any = row
    for key in path.split("."):
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def context_text(value: Any) -> str | None:
    """The context as text (None or empty: no context)."""
    if value is None:
        return None
    if isinstance(value, np.ndarray | list | tuple):
        value = ", ".join(str(v) for v in value)
    text = str(value).strip()
    return text or None


def teacher_messages(messages: Sequence[Mapping[str, Any]], context: str, template: str) -> list[dict]:
    """A copy of ``messages`` whose last user message is ``template`` with {prompt} = its text, {context}."""
    out = [dict(copy.deepcopy(m)) for m in messages]
    users = [i for i, m in enumerate(out) if m.get("role") == "user"]
    if not users:
        raise ValueError("the prompt has no user message to carry the teacher's context")
    last = out[users[-1]]
    if not isinstance(last.get("content"), str):
        raise ValueError(
            "the last user message's content is not plain text (multimodal?): opd.teacher_context supports "
            "text prompts only"
        )
    last["content"] = template.format(prompt=last["content"], context=context)
    return out


def render(
    tokenizer, messages: Sequence[Mapping[str, Any]], chat_template_kwargs: Mapping | None
) -> list[int]:
    """Prompt token ids as verl's agent loop renders them for the rollout."""
    from verl.utils.chat_template import apply_chat_template
    from verl.utils.tokenizer import normalize_token_ids

    return list(
        normalize_token_ids(
            apply_chat_template(
                tokenizer,
                [dict(m) for m in messages],
                add_generation_prompt=True,
                tokenize=True,
                **dict(chat_template_kwargs or {}),
            )
        )
    )


def teacher_prompt_ids(
    non_tensor: Mapping[str, Sequence],
    tokenizer,
    field: str,
    template: str,
    chat_template_kwargs: Mapping | None = None,
    student_prompt_ids: Sequence[int] | None = None,
) -> np.ndarray:
    """One list of token ids per row (an object array, as a ``DataProto`` non-tensor column).

    ``non_tensor``: the rollout batch's non-tensor columns (``raw_prompt`` and the field's column).
    ``student_prompt_ids``: row 0's prompt as the rollout saw it; when the plain prompt renders differently
    here (another chat template or its arguments), a warning says that the teacher's prompt may differ
    from the student's by more than the context."""
    if "raw_prompt" not in non_tensor:
        raise ValueError("the rollout batch has no `raw_prompt` column: cannot build the teacher's prompts")
    column = field.split(".")[0]
    if column not in non_tensor:
        raise MissingContextError(
            f"opd.teacher_context.field={field}: the batch has no column {column!r} (columns: "
            f"{sorted(non_tensor)}); name a column of the data files"
        )
    rows = []
    for b, messages in enumerate(non_tensor["raw_prompt"]):
        context = context_text(field_value({column: non_tensor[column][b]}, field))
        if context is None:
            raise MissingContextError(
                f"rollout row {b} has no value at opd.teacher_context.field={field}: every training row needs "
                "the context (check the data files, or set opd.teacher_context.field=null)"
            )
        rows.append(
            render(tokenizer, teacher_messages(list(messages), context, template), chat_template_kwargs)
        )
    if student_prompt_ids is not None and len(rows):
        plain = render(tokenizer, list(non_tensor["raw_prompt"][0]), chat_template_kwargs)
        if plain != list(student_prompt_ids):
            logger.warning(
                "opd.teacher_context: the plain prompt renders to %d tokens here but the rollout's has %d: the "
                "teacher's prompt may differ from the student's by more than the context",
                len(plain),
                len(student_prompt_ids),
            )
    out = np.empty(len(rows), dtype=object)
    out[:] = rows
    return out


def data_has_field(files: Sequence[str], field: str) -> tuple[int, int]:
    """(rows, rows without a value at ``field``) over parquet ``files``: the start-up check."""
    import pyarrow.parquet as pq

    column = field.split(".")[0]
    total = missing = 0
    for path in files:
        names = pq.read_schema(path).names
        if column not in names:
            raise MissingContextError(
                f"opd.teacher_context.field={field}: {path} has no column {column!r} (its columns: {names}); "
                "the teacher's context needs a reference in the data (e.g. reward_model.ground_truth), or set "
                "opd.teacher_context.field=null"
            )
        for value in pq.read_table(path, columns=[column]).column(column).to_pylist():
            total += 1
            missing += context_text(field_value({column: value}, field)) is None
    return total, missing
