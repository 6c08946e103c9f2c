"""The tiny agent task without training: its data, its reward, and SFT traces made by verl's own tool agent
loop with the real travel tool (the token layout the models are trained on is the one rollouts produce)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from opd.tiny import agent_build, recipe
from opd.tiny.agent_task import compute_score, database_name, make_splits


@pytest.fixture(scope="module")
def small_task(tmp_path_factory) -> dict:
    """A few rows, their databases, a tokenizer trained on their traces, and the loop config."""
    from opd.tiny.agent_train import loop_config
    from opd.tiny.tokenizer import train_tokenizer
    from opd.tiny.train import make_model

    root = tmp_path_factory.mktemp("tiny_agent")
    splits = make_splits(0, root / "database", n_train=40, n_val=10)
    tool_config = agent_build.write_tool_config(root)
    rows = splits["train"].to_dict("records")
    tokenizer = train_tokenizer(
        agent_build.corpus(rows, tool_config),
        recipe.AGENT_VOCAB_SIZE,
        split_words=False,
        max_length=recipe.AGENT_MAX_POSITIONS,
    )
    tokenizer.save_pretrained(root / "model")
    make_model(recipe.AGENT_STUDENT, tokenizer, 0, max_positions=recipe.AGENT_MAX_POSITIONS).save_pretrained(
        root / "model"
    )
    config = loop_config(
        root / "model", tool_config, recipe.AGENT_PROMPT_LENGTH, recipe.AGENT_RESPONSE_LENGTH
    )
    return {"root": root, "splits": splits, "rows": rows, "tokenizer": tokenizer, "config": config}


def test_splits_are_deterministic_disjoint_and_need_one_or_two_calls(small_task, tmp_path):
    again = make_splits(0, tmp_path / "database", n_train=40, n_val=10)
    for split in ("train", "val"):
        assert again[split].to_json() == small_task["splits"][split].to_json()
    train_ids = set(small_task["splits"]["train"]["extra_info"].map(lambda e: e["task_id"]))
    val_ids = set(small_task["splits"]["val"]["extra_info"].map(lambda e: e["task_id"]))
    assert not train_ids & val_ids
    legs = [len(json.loads(e["legs"])) for e in small_task["splits"]["train"]["extra_info"]]
    assert set(legs) == {1, 2} and legs.count(2) == round(40 * 0.3)
    row = small_task["rows"][0]
    assert row["agent_name"] == "tool_agent"
    create = row["extra_info"]["tools_kwargs"]["query_train_info"]["create_kwargs"]
    assert create["database"] == row["extra_info"]["database"] and create["database"].startswith(
        "database_en/id_"
    )
    # every table of DeepPlanning's layout is there (the submission check requires it)
    assert len(list((small_task["root"] / "database" / database_name(0)).glob("*/*.csv"))) == 7


@pytest.mark.parametrize(
    "reply,truth,score",
    [
        ("call... answer... \\boxed{G123}", "G123", 1.0),
        ("\\boxed{G123, D45}", "G123, D45", 1.0),
        ("\\boxed{G123,D45}", "G123, D45", 1.0),
        ("\\boxed{D45, G123}", "G123, D45", 0.0),  # travel order matters
        ("\\boxed{G123}", "G123, D45", 0.0),
        ("G123", "G123", 0.0),  # no boxed answer
    ],
)
def test_the_reward_wants_exactly_the_trains_in_travel_order(reply, truth, score):
    result = compute_score("tiny_travel", reply, truth)
    assert result["acc"] == result["score"] == score
    assert result["boxed"] == float("\\boxed" in reply)


def test_traces_are_verls_loop_outputs_with_tool_answers_from_the_database_and_masked(small_task):
    from opd.tiny.agent_train import IGNORE_INDEX, sft_tensors, trace_outputs

    tokenizer, rows = small_task["tokenizer"], small_task["rows"][:8]
    outputs = trace_outputs(small_task["config"], tokenizer, rows)
    for row, output in zip(rows, outputs, strict=True):
        text = tokenizer.decode(output.response_ids)
        legs = json.loads(row["extra_info"]["legs"])
        # one tool answer per leg, from the task's database, between the model's turns
        assert text.count("<tool_response>") == len(legs)
        for number in row["reward_model"]["ground_truth"].split(", "):
            assert f'"marketingTransportNo": "{number}"' in text
        assert text.rstrip().endswith(f"\\boxed{{{row['reward_model']['ground_truth']}}}<|im_end|>")
        mask = output.response_mask
        assert 0 in mask and mask[0] == 1 and mask[-1] == 1
        answer_ids = tokenizer.encode(text[text.index("<tool_response>") :].split("</tool_response>")[0])
        assert sum(1 for m in mask if m == 0) >= len(answer_ids)  # the answers are not the model's tokens
    tensors = sft_tensors(outputs, tokenizer.pad_token_id)
    for i, output in enumerate(outputs):
        labelled = (tensors["labels"][i] != IGNORE_INDEX).sum().item()
        assert labelled == sum(output.response_mask)  # labels on the assistant's tokens only


def test_cities_dates_and_train_numbers_are_one_token_wherever_they_appear(small_task):
    """A model copies them from the question into the call and from the tool's answer into the reply: each
    must be the same single token in every context (a train number as a letter and digit tokens took a
    2-layer teacher three times as many steps to copy)."""
    tokenizer = small_task["tokenizer"]
    row = small_task["rows"][0]
    a, b, date = json.loads(row["extra_info"]["legs"])[0]
    numbers = row["reward_model"]["ground_truth"].split(", ")
    for piece in [a, b, date, *numbers]:
        (token,) = tokenizer.encode(piece)
        for context in (f'"{piece}"', f"from {piece} on", f"\\boxed{{{piece}}}", f'": "{piece}",'):
            assert token in tokenizer.encode(context), (piece, context)


def test_a_trace_the_loop_cannot_follow_is_refused(small_task):
    from opd.tiny.agent_train import trace_outputs

    row = dict(small_task["rows"][0])
    row["extra_info"] = {**row["extra_info"], "legs": json.dumps([["Nowhere", "Avon", "2025-11-10"]])}
    with pytest.raises(RuntimeError, match="took .* of the trace's"):
        trace_outputs(small_task["config"], small_task["tokenizer"], [row])


def test_evaluation_runs_the_loop_on_the_model(small_task):
    from transformers import AutoModelForCausalLM

    from opd.tiny.agent_train import evaluate_agent

    model = AutoModelForCausalLM.from_pretrained(small_task["root"] / "model")
    rows = small_task["splits"]["val"].to_dict("records")[:4]
    result = evaluate_agent(small_task["config"], small_task["tokenizer"], model, rows)
    # an untrained model neither calls nor answers
    assert result == {"val_accuracy": 0.0, "format_rate": 0.0, "malformed_calls": 0}
    assert Path(small_task["root"] / "model" / "config.json").is_file()


def test_the_cheap_sft_loss_equals_the_models_own_loss_and_gradients(small_task):
    import torch
    from transformers import AutoModelForCausalLM

    from opd.tiny.agent_train import labelled_loss, sft_tensors, trace_outputs

    outputs = trace_outputs(small_task["config"], small_task["tokenizer"], small_task["rows"][:6])
    batch = sft_tensors(outputs, small_task["tokenizer"].pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(small_task["root"] / "model")
    reference = model(**batch).loss
    reference.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    cheap = labelled_loss(model, batch)
    cheap.backward()
    assert cheap.item() == pytest.approx(reference.item(), rel=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, expected[name], rtol=1e-4, atol=1e-7), name
