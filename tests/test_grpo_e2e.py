"""CPU end-to-end: ``python -m opd.main_grpo`` through Ray, verl's FSDP workers and the ``hf`` rollout."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from opd.demo import VAL_ACCURACY, read_metrics, run_entry, tiny_grpo_overrides

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def grpo_run(tiny_assets, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("grpo")
    code = run_entry(
        "opd.main_grpo",
        tiny_grpo_overrides(tiny_assets, run_dir, steps=2, save_freq=2),
        run_dir / "train.log",
    )
    assert code == 0, (run_dir / "train.log").read_text()[-4000:]
    return run_dir


def test_two_grpo_steps_log_finite_metrics_and_save_a_checkpoint(grpo_run):
    records = read_metrics(grpo_run)
    train_steps = {r["step"]: r["data"] for r in records if "actor/pg_loss" in r["data"]}
    assert sorted(train_steps) == [1, 2]
    for step, data in train_steps.items():
        for key in (
            "actor/pg_loss",
            "actor/entropy",
            "actor/grad_norm",
            "critic/score/mean",
            "response_length/mean",
        ):
            assert math.isfinite(data[key]), (step, key, data[key])
        assert data["response_length/mean"] > 0
        assert 0.0 <= data["critic/score/mean"] <= 1.0
    # validation ran before training with the hf rollout and the boxed reward
    assert any(VAL_ACCURACY in r["data"] for r in records if r["step"] == 0)
    actor = grpo_run / "checkpoints" / "global_step_2" / "actor"
    assert (actor / "model_world_size_1_rank_0.pt").is_file()
    assert (grpo_run / "checkpoints" / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_model_merger_converts_the_checkpoint_to_a_loadable_hf_model(grpo_run, tiny_assets, tmp_path):
    import subprocess
    import sys

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    actor = grpo_run / "checkpoints" / "global_step_2" / "actor"
    target = tmp_path / "merged"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "verl.model_merger",
            "merge",
            "--backend",
            "fsdp",
            "--local_dir",
            str(actor),
            "--target_dir",
            str(target),
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    merged = AutoModelForCausalLM.from_pretrained(target, torch_dtype=torch.float32)
    initial = AutoModelForCausalLM.from_pretrained(tiny_assets / "student", torch_dtype=torch.float32)
    merged_state, initial_state = merged.state_dict(), initial.state_dict()
    assert merged_state.keys() == initial_state.keys()
    assert all(torch.isfinite(t).all() for t in merged_state.values())
    changed = [k for k in merged_state if not torch.equal(merged_state[k], initial_state[k])]
    assert changed, "two optimizer steps left every weight unchanged"
    # the sharded training weights and the merged HF weights are the same model, in the merged dtype
    saved = AutoModelForCausalLM.from_pretrained(target, torch_dtype="auto").state_dict()
    shard = torch.load(actor / "model_world_size_1_rank_0.pt", weights_only=False)
    for name, tensor in shard.items():
        local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
        assert torch.equal(local.to(saved[name].dtype), saved[name]), name
    tokenizer = AutoTokenizer.from_pretrained(target)
    prompt = tokenizer.apply_chat_template(
        [
            {
                "role": "user",
                "content": "Ava has 12 coins and finds 30 more. How many coins does Ava have now?",
            }
        ],
        add_generation_prompt=True,
        return_tensors="pt",
    )
    out = merged.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "boxed" in tokenizer.decode(out[0, prompt.shape[1] :])
