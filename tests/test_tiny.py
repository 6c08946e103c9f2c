"""Tests of the tiny offline assets (opd.tiny): real tokenizer, data and models, built once per session."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import opd.tiny
from opd.tiny import task
from opd.tiny.__main__ import main as tiny_cli


@pytest.fixture(scope="session")
def tokenizer(tiny_assets):
    return AutoTokenizer.from_pretrained(tiny_assets / "teacher")


def numbers_in(question: str) -> tuple[int, int]:
    a, b = map(int, re.findall(r"\d+", question))
    return a, b


def test_accuracy_targets(tiny_assets):
    accuracy = json.loads((tiny_assets / "accuracy.json").read_text())
    teacher, student = accuracy["teacher"], accuracy["student"]
    assert teacher["val_accuracy"] >= 0.90
    assert student["val_accuracy"] <= 0.40
    assert teacher["val_accuracy"] - student["val_accuracy"] >= 0.5
    assert student["format_rate"] >= 0.9, "the student must already answer in the boxed format"
    assert student["params"] < teacher["params"]
    assert accuracy["seed"] == 0 and accuracy["builder_version"] == opd.tiny.BUILDER_VERSION


@pytest.mark.parametrize("role", ["teacher", "student"])
def test_saved_models_reproduce_reported_accuracy(tiny_assets, role):
    """Re-measure val accuracy with plain transformers (left padding, greedy, generation_config's eos)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / role, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(tiny_assets / role).eval()
    assert model.config.vocab_size == len(tokenizer)
    val = pd.read_parquet(tiny_assets / "data" / "val.parquet")
    texts = [
        tokenizer.apply_chat_template(list(p), add_generation_prompt=True, tokenize=False) for p in val.prompt
    ]
    batch = tokenizer(texts, padding=True, add_special_tokens=False, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=16, do_sample=False)
    replies = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1] :], skip_special_tokens=True)
    truth = [r["ground_truth"] for r in val.reward_model]
    measured = sum(task.extract_boxed(r) == t for r, t in zip(replies, truth, strict=True)) / len(truth)
    reported = json.loads((tiny_assets / "accuracy.json").read_text())[role]["val_accuracy"]
    assert measured == pytest.approx(reported, abs=0.03)
    assert sum(re.fullmatch(r"The answer is \\boxed\{\d+\}\.", r) is not None for r in replies) >= 0.9 * len(
        truth
    )


def test_chat_template_has_no_default_system_prompt(tokenizer):
    """verl infers the system prompt as what one empty user turn has beyond the repeated block: must be empty."""
    empty_user = [{"role": "user", "content": ""}]
    one = tokenizer.apply_chat_template(empty_user, tokenize=True)
    two = tokenizer.apply_chat_template(empty_user * 2, tokenize=True)
    assert two == one + one
    assert one[: -(len(two) - len(one))] == []
    assert tokenizer.apply_chat_template(empty_user, tokenize=False) == "<|im_start|>user\n<|im_end|>\n"


def test_chat_template_generation_prompt(tokenizer):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 plus 3?"}]
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2 plus 3?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert not tokenizer.apply_chat_template(messages, tokenize=False).endswith("<|im_start|>assistant\n")


def test_chat_template_tools(tokenizer):
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"type": "function", "function": {"name": "add", "arguments": {"a": 2, "b": 3}}}],
        },
        {"role": "tool", "content": "5"},
    ]
    text = tokenizer.apply_chat_template(messages, tools=[tool], add_generation_prompt=True, tokenize=False)
    system, user, assistant, tool_turn, generation = text.split("<|im_start|>")[1:]
    assert system.startswith("system\nBe brief.\n\n") and json.dumps(tool) in system
    assert "<tools>" in system and "<tool_call></tool_call>" in system
    assert user == "user\nWhat is 2 plus 3?<|im_end|>\n"
    assert (
        assistant
        == 'assistant\n<tool_call>\n{"name": "add", "arguments": {"a": 2, "b": 3}}\n</tool_call><|im_end|>\n'
    )
    assert tool_turn == "user\n<tool_response>\n5\n</tool_response><|im_end|>\n"
    assert generation == "assistant\n"
    # Without a system message of its own the tools still get one.
    text = tokenizer.apply_chat_template(messages[1:2], tools=[tool], tokenize=False)
    assert text.startswith("<|im_start|>system\nYou can use these tools")


def test_tokenizer_splits_digits_and_has_chat_specials(tokenizer):
    tokens = tokenizer.tokenize("Ava has 1234 marbles and 56 more.")
    assert [t for t in tokens if any(c.isdigit() for c in t)] == ["1", "2", "3", "4", "5", "6"]
    assert tokenizer.pad_token == "<|endoftext|>" and tokenizer.eos_token == "<|im_end|>"
    for special in ["<|im_start|>", "<tool_call>", "</tool_call>", "<tool_response>", "</tool_response>"]:
        assert tokenizer.convert_tokens_to_ids(special) != tokenizer.unk_token_id
        assert len(tokenizer.encode(special, add_special_tokens=False)) == 1
    assert set(tokenizer("x")) == {"input_ids", "attention_mask"}


def test_data_schema(tiny_assets):
    splits = {s: pd.read_parquet(tiny_assets / "data" / f"{s}.parquet") for s in ("train", "val")}
    assert len(splits["val"]) == 200 and len(splits["train"]) >= 2000
    seen = {}
    for split, frame in splits.items():
        assert list(frame.columns) == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
        for i, row in enumerate(frame.itertuples()):
            assert row.data_source == "tiny_arith" and row.ability == "math"
            (message,) = row.prompt
            assert message["role"] == "user" and message["content"].endswith(task.INSTRUCTION)
            a, b = numbers_in(message["content"].removesuffix(task.INSTRUCTION))
            assert row.reward_model == {"style": "rule", "ground_truth": str(a + b)}
            assert row.extra_info == {"split": split, "index": i, "answer": str(a + b)}
        seen[split] = {numbers_in(p[0]["content"]) for p in frame.prompt}
    assert len(seen["val"]) == 200
    assert not seen["train"] & seen["val"]


def test_make_splits_is_deterministic(tmp_path):
    first = task.write_splits(task.make_splits(0), tmp_path / "first")
    second = task.write_splits(task.make_splits(0), tmp_path / "second")
    for split in ("train", "val"):
        assert first[split].read_bytes() == second[split].read_bytes()
    assert not task.make_splits(1)["val"].equals(task.make_splits(0)["val"])


def test_extract_boxed():
    assert task.extract_boxed("The answer is \\boxed{85}.") == "85"
    assert task.extract_boxed("\\boxed{1} then \\boxed{ 2 }") == "2"
    assert task.extract_boxed("The answer is 85.") is None


def test_second_build_reuses(tiny_assets):
    manifest = tiny_assets / "build.json"
    before = manifest.stat().st_mtime_ns
    started = time.perf_counter()
    accuracy = opd.tiny.build(tiny_assets)
    assert time.perf_counter() - started < 5
    assert manifest.stat().st_mtime_ns == before
    assert accuracy == json.loads((tiny_assets / "accuracy.json").read_text())
    assert json.loads(manifest.read_text())["key"] == opd.tiny.build_key(0)


def test_default_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("OPD_TINY_DIR", str(tmp_path / "assets"))
    assert opd.tiny.default_dir() == tmp_path / "assets"
    monkeypatch.delenv("OPD_TINY_DIR")
    assert opd.tiny.default_dir() == Path.home() / ".cache" / "opd" / "tiny" / opd.tiny.build_key(0)
    assert opd.tiny.build_key(0) != opd.tiny.build_key(1)


def test_refuses_non_empty_directory_that_is_not_a_build(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError, match="not a tiny-assets build"):
        opd.tiny.build(tmp_path)
    assert tiny_cli(["build", str(tmp_path)]) == 2
    assert "--force" in capsys.readouterr().err
    assert (tmp_path / "notes.txt").read_text() == "keep me"
