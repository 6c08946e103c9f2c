"""build_opd_batch on hand-built verl DataProto batches laid out as verl's agent loop lays them out:
prompts left-padded, responses right-padded, response_mask 1 for model tokens and 0 for tool tokens."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from verl import DataProto

from opd.distill.batch import build_opd_batch, build_opd_batch_from_verl_batch, build_opd_batch_multiturn

PAD = 0


def rollout_batch(rows, weights=None, raw_prompts=None, with_prompts=True) -> DataProto:
    """rows: (prompt ids, response ids, response mask) per sample."""
    width_p = max(len(p) for p, _, _ in rows)
    width_r = max(len(r) for _, r, _ in rows)
    prompts = torch.full((len(rows), width_p), PAD)
    responses = torch.full((len(rows), width_r), PAD)
    response_mask = torch.zeros((len(rows), width_r), dtype=torch.long)
    attention = torch.zeros((len(rows), width_p + width_r), dtype=torch.long)
    for b, (p, r, m) in enumerate(rows):
        prompts[b, width_p - len(p) :] = torch.tensor(p)
        attention[b, width_p - len(p) : width_p] = 1
        responses[b, : len(r)] = torch.tensor(r)
        response_mask[b, : len(r)] = torch.tensor(m)
        attention[b, width_p : width_p + len(r)] = 1
    tensors = {
        "responses": responses,
        "response_mask": response_mask,
        "attention_mask": attention,
        "input_ids": torch.cat([prompts, responses], dim=1),
    }
    if with_prompts:
        tensors["prompts"] = prompts
    if weights is not None:
        tensors["sample_weight"] = torch.tensor(weights)
    non_tensors = {"uid": np.array([f"u{b}" for b in range(len(rows))], dtype=object)}
    if raw_prompts is not None:
        non_tensors["raw_prompt"] = np.array(raw_prompts, dtype=object)
    return DataProto.from_dict(tensors=tensors, non_tensors=non_tensors)


def row(opd, i):
    length = int(opd.attention_mask_B_L[i].sum())
    return opd.input_ids_B_L[i, :length].tolist(), opd.target_mask_B_L[i, :length].int().tolist()


def test_single_turn_rows_unpad_prompts_and_pad_to_longest_row():
    batch = rollout_batch([([5, 6], [7, 8, 9], [1, 1, 1]), ([11, 12, 13, 14], [15], [1])])
    opd = build_opd_batch(batch, pad_token_id=PAD)
    assert opd.input_ids_B_L.shape == (2, 5)  # longest row, not max_length
    assert row(opd, 0) == ([5, 6, 7, 8, 9], [0, 0, 1, 1, 1])
    assert row(opd, 1) == ([11, 12, 13, 14, 15], [0, 0, 0, 0, 1])
    assert opd.position_ids_B_L[0].tolist() == [0, 1, 2, 3, 4]
    assert opd.prompt_lengths_B.tolist() == [2, 4]
    assert opd.stats["opd/target_tokens"] == 4 and opd.stats["opd/prompt_source_raw"] == 0


def test_multi_turn_tool_tokens_are_inputs_but_not_targets():
    # model turn | tool response | model turn
    batch = rollout_batch([([1, 2], [3, 4, 50, 51, 52, 5, 6], [1, 1, 0, 0, 0, 1, 1]), ([9], [8, 7], [1, 1])])
    opd = build_opd_batch_multiturn(batch, pad_token_id=PAD)
    ids, target = row(opd, 0)
    assert ids == [1, 2, 3, 4, 50, 51, 52, 5, 6]
    assert target == [0, 0, 1, 1, 0, 0, 0, 1, 1]


def test_all_tool_response_is_skipped_with_a_warning_and_weights_stay_aligned(caplog):
    batch = rollout_batch(
        [([1], [2, 3], [1, 1]), ([4], [60, 61], [0, 0]), ([5], [6], [1])], weights=[0.5, 2.0, 1.5]
    )
    with caplog.at_level(logging.WARNING):
        opd = build_opd_batch(batch, pad_token_id=PAD)
    assert "without model-generated tokens" in caplog.text
    assert opd.kept_rows == [0, 2]
    assert opd.sample_weight_B.tolist() == [0.5, 1.5]
    assert opd.uids == ["u0", "u2"]
    assert opd.stats["opd/rows_skipped_no_model_tokens"] == 1


def test_overlong_rows_are_counted_never_silently_truncated():
    rows = [([1, 2], [3, 4, 5, 6], [1, 1, 1, 1]), ([7], [8], [1])]
    truncated = build_opd_batch(rollout_batch(rows), pad_token_id=PAD, max_length=4)
    assert row(truncated, 0) == ([1, 2, 3, 4], [0, 0, 1, 1])
    assert truncated.stats["opd/rows_truncated"] == 1
    skipped = build_opd_batch(
        rollout_batch(rows, weights=[3.0, 1.0]), pad_token_id=PAD, max_length=4, overlong="skip"
    )
    assert skipped.kept_rows == [1] and skipped.sample_weight_B.tolist() == [1.0]
    assert skipped.stats["opd/rows_skipped_overlong"] == 1
    with pytest.raises(ValueError, match="exceed opd.max_length=4"):
        build_opd_batch(rollout_batch(rows), pad_token_id=PAD, max_length=4, overlong="error")


def test_raw_prompt_fallback_only_without_prompts(tiny_assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "student")
    messages = [{"role": "user", "content": "What is 2 + 3?"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    response = tokenizer.encode("The answer is \\boxed{5}.", add_special_tokens=False)
    rows = [([99, 98], response, [1] * len(response))]  # the "prompts" differ from the re-rendered template
    with_prompts = build_opd_batch(rollout_batch(rows, raw_prompts=[messages]), tokenizer)
    assert row(with_prompts, 0)[0][:2] == [99, 98]
    fallback = build_opd_batch(rollout_batch(rows, raw_prompts=[messages], with_prompts=False), tokenizer)
    assert row(fallback, 0)[0] == rendered + response
    assert fallback.stats["opd/prompt_source_raw"] == 1
    forced = build_opd_batch_from_verl_batch(rollout_batch(rows, raw_prompts=[messages]), tokenizer)
    assert row(forced, 0)[0] == rendered + response
    with pytest.raises(ValueError, match="pre-tokenized `prompts`"):
        build_opd_batch_multiturn(rollout_batch(rows, raw_prompts=[messages], with_prompts=False), tokenizer)


def test_batch_without_any_model_token_is_refused():
    with pytest.raises(ValueError, match="no row of the 2-row batch"):
        build_opd_batch(rollout_batch([([1], [2], [0]), ([3], [4, 5], [0, 0])]), pad_token_id=PAD)
