"""Stored rollouts: a model's responses kept with their exact token ids, and turned back into the rollout
batch the OPD step trains on (off-policy distillation, ``opd.rollouts=stored``).

A rollouts file is a parquet file in the training-data layout (``data_source``, ``prompt``,
``reward_model``, ``extra_info``: verl's data loader reads it as it reads any training file) plus one
response per row:

  ``opd_prompt_ids``     the prompt's token ids exactly as the model was given them (no padding)
  ``opd_response_ids``   the response's token ids, tool answers included (no padding)
  ``opd_response_mask``  1 = a token the model generated, 0 = a tool / environment token (never a target)
  ``opd_score``          the reward of the response (for metrics and sample weighting)

``python -m opd.main_eval ... eval.save_rollouts=true`` writes ``rollouts.parquet`` (the teacher's
``VAL_N`` samples per prompt); the warm-up trains on it with ``opd.rollouts=stored``: no generation, the
stored tokens instead. Legend: ``B`` rows, ``P`` prompt width (left-padded), ``R`` response width
(right-padded).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

ROLLOUTS_FILE = "rollouts.parquet"
PROMPT_IDS, RESPONSE_IDS, RESPONSE_MASK, SCORE = (
    "opd_prompt_ids",
    "opd_response_ids",
    "opd_response_mask",
    "opd_score",
)
COLUMNS = (PROMPT_IDS, RESPONSE_IDS, RESPONSE_MASK, SCORE)
# the training-data columns a rollouts file carries over from the prompts it was generated from
DATA_COLUMNS = ("data_source", "prompt", "ability", "reward_model", "extra_info")


class RolloutsError(ValueError):
    """A rollouts file that cannot be trained on: the message names the file, the row and the fix."""


def rows_from_generation(output) -> list[tuple[list[int], list[int], list[int]]]:
    """(prompt ids, response ids, response mask) per row of a verl generation output (a ``DataProto``
    with ``prompts``, ``responses``, ``attention_mask`` and, for multi-turn rollouts, ``response_mask``):
    the same reading of the padded tensors that the OPD step's batch uses."""
    from opd.distill.batch import _row_lists_from_prompts

    return _row_lists_from_prompts(output)


def records(rows, scores: Sequence[float], data: dict[str, Sequence]) -> list[dict]:
    """One rollouts-file row per response: the token columns, the score and the prompt's data columns
    (``data``: column -> one value per row, e.g. the generation input's ``raw_prompt`` as ``prompt``)."""
    if len(rows) != len(scores):
        raise ValueError(f"{len(rows)} responses but {len(scores)} scores")
    out = []
    for i, (prompt, response, mask) in enumerate(rows):
        record = {name: _plain(values[i]) for name, values in data.items()}
        record.update(
            {
                PROMPT_IDS: [int(t) for t in prompt],
                RESPONSE_IDS: [int(t) for t in response],
                RESPONSE_MASK: [int(m) for m in mask],
                SCORE: float(scores[i]),
            }
        )
        out.append(record)
    return out


def _plain(value):
    """numpy containers (what verl's batches hold) as lists and dicts pyarrow can write."""
    import numpy as np

    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def write(path: str | Path, rows: list[dict]) -> Path:
    """Write the rollouts file (atomically: a reader never sees half a file)."""
    import pandas as pd

    if not rows:
        raise ValueError("no rollouts to write")
    path = Path(path)
    tmp = path.with_suffix(".tmp.parquet")
    pd.DataFrame(rows).to_parquet(tmp, index=False)
    tmp.replace(path)
    return path


def check_files(files: Sequence[str]) -> int:
    """Every file has the token columns, and each row's response ids and mask have the same length;
    returns the number of rows. Raises RolloutsError naming the file, the row and how to make one."""
    import pyarrow.parquet as pq

    fix = "write one with python -m opd.main_eval ... eval.save_rollouts=true (a pipeline's rollouts stage)"
    total = 0
    for name in files:
        path = Path(name)
        if not path.is_file():
            raise RolloutsError(f"rollouts file {name} does not exist: {fix}")
        table = pq.read_table(path)
        missing = [c for c in (*COLUMNS, "prompt") if c not in table.column_names]
        if missing:
            raise RolloutsError(
                f"{name} is not a rollouts file: no column(s) {missing} (opd.rollouts=stored trains on stored "
                f"token ids, not on prompts alone): {fix}"
            )
        responses = table.column(RESPONSE_IDS).to_pylist()
        masks = table.column(RESPONSE_MASK).to_pylist()
        prompts = table.column(PROMPT_IDS).to_pylist()
        for i, (prompt, response, mask) in enumerate(zip(prompts, responses, masks, strict=True)):
            if not prompt:
                raise RolloutsError(f"{name} row {i}: empty {PROMPT_IDS}: {fix}")
            if len(response) != len(mask):
                raise RolloutsError(
                    f"{name} row {i}: {len(response)} response ids but {len(mask)} mask values: the file is "
                    f"damaged; {fix}"
                )
        total += table.num_rows
    if total == 0:
        raise RolloutsError(f"the rollouts file(s) {list(files)} hold no rows: {fix}")
    return total


def stored_batch(non_tensor_batch: dict, pad_token_id: int):
    """The rollout batch (a ``DataProto``, as verl's agent loop returns it) of stored responses: the rows'
    token columns (``non_tensor_batch``, one value per row) as ``prompts`` (left-padded), ``responses``,
    ``response_mask`` (right-padded), ``input_ids``, ``attention_mask``, ``position_ids`` and the scores
    as ``rm_scores`` (on the last response token, as verl places a sequence reward)."""
    import numpy as np
    import torch
    from verl import DataProto

    missing = [c for c in COLUMNS if c not in non_tensor_batch]
    if missing:
        raise RolloutsError(
            f"opd.rollouts=stored, but the training batch has no column(s) {missing}: data.train_files must "
            "be rollouts files (python -m opd.main_eval ... eval.save_rollouts=true)"
        )
    prompts = [list(p) for p in non_tensor_batch[PROMPT_IDS]]
    responses = [list(r) for r in non_tensor_batch[RESPONSE_IDS]]
    masks = [list(m) for m in non_tensor_batch[RESPONSE_MASK]]
    scores = [float(s) for s in non_tensor_batch[SCORE]]
    n_rows = len(prompts)
    width_P = max(len(p) for p in prompts)
    width_R = max(max(len(r) for r in responses), 1)
    prompts_B_P = torch.full((n_rows, width_P), pad_token_id, dtype=torch.long)
    responses_B_R = torch.full((n_rows, width_R), pad_token_id, dtype=torch.long)
    response_mask_B_R = torch.zeros((n_rows, width_R), dtype=torch.long)
    attention_B_T = torch.zeros((n_rows, width_P + width_R), dtype=torch.long)
    rm_scores_B_R = torch.zeros((n_rows, width_R), dtype=torch.float32)
    for b, (prompt, response, mask) in enumerate(zip(prompts, responses, masks, strict=True)):
        if len(response) != len(mask):
            raise RolloutsError(f"row {b}: {len(response)} response ids but {len(mask)} mask values")
        prompts_B_P[b, width_P - len(prompt) :] = torch.tensor(prompt, dtype=torch.long)
        attention_B_T[b, width_P - len(prompt) : width_P] = 1
        if response:
            responses_B_R[b, : len(response)] = torch.tensor(response, dtype=torch.long)
            response_mask_B_R[b, : len(mask)] = torch.tensor(mask, dtype=torch.long)
            attention_B_T[b, width_P : width_P + len(response)] = 1
            rm_scores_B_R[b, len(response) - 1] = scores[b]
    position_ids_B_T = (attention_B_T.cumsum(-1) - 1).clamp(min=0)
    return DataProto.from_dict(
        tensors={
            "prompts": prompts_B_P,
            "responses": responses_B_R,
            "response_mask": response_mask_B_R,
            "input_ids": torch.cat([prompts_B_P, responses_B_R], dim=1),
            "attention_mask": attention_B_T,
            "position_ids": position_ids_B_T,
            "rm_scores": rm_scores_B_R,
        },
        # the input's columns travel on, as verl's agent loop returns them (reward inputs, uid, ...)
        non_tensors={
            "multi_modal_inputs": np.array([{} for _ in range(n_rows)], dtype=object),
            **non_tensor_batch,
            "__num_turns__": np.ones(n_rows, dtype=np.int32),
        },
        meta_info={"timing": {}, "reward_extra_keys": []},
    )


class StoredRollouts:
    """Stands in for verl's rollout manager in ``fit()``: a training batch gets its stored responses
    (no generation), a validation batch (``meta_info["validate"]``) is generated by the real manager,
    so validation measures the student as in any run. Everything else goes to the real manager."""

    def __init__(self, manager, pad_token_id: int):
        self._manager = manager
        self._pad_token_id = pad_token_id

    def generate_sequences(self, batch):
        if batch.meta_info.get("validate"):
            return self._manager.generate_sequences(batch)
        return stored_batch(batch.non_tensor_batch, self._pad_token_id)

    def __getattr__(self, name):
        return getattr(self._manager, name)
