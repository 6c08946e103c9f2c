"""CPU end-to-end: the three GRPO recipes through their launchers (``bash jobs/train_grpo*.sh``), i.e.
data preparation from the raw layout, then ``python -m opd.main_grpo experiment=...`` through Ray, verl's
FSDP workers and the ``hf`` rollout, 2 steps each."""

from __future__ import annotations

import json
import math
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

import opd.config  # noqa: F401  (resolvers for the saved config)
from conftest import only_run_dir, run_launcher, tiny_launcher_env
from opd.checkpoint import MARKER_FILE, convert, find_actor_checkpoint, reassemble
from opd.demo import read_metrics
from test_checkpoint import HF_FILES, load_stored

# a launcher run (~2-3 min on 2 busy cores) happens inside the first test of each recipe
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

LAUNCHERS = ["train_grpo.sh", "train_grpo_native.sh", "train_grpo_native_no_kl.sh"]


@pytest.fixture(scope="module", params=LAUNCHERS)
def variant_run(request, tiny_assets, tiny_raw_data, tmp_path_factory) -> tuple[str, Path]:
    if request.param == "train_grpo.sh":  # shared with the checkpoint tests
        return request.param, request.getfixturevalue("grpo_checkpoint_run")
    output_root = tmp_path_factory.mktemp(request.param.removesuffix(".sh"))
    env = tiny_launcher_env(
        tiny_assets, tiny_raw_data, output_root, TOTAL_TRAINING_STEPS="2", SAVE_FREQ="2", TEST_FREQ="2"
    )
    log = output_root / "launcher.log"
    assert run_launcher(request.param, env, log) == 0, log.read_text()[-4000:]
    return request.param, only_run_dir(output_root)


def test_two_steps_log_finite_metrics_validate_every_set_and_save_a_checkpoint(variant_run):
    launcher, run_dir = variant_run
    records = read_metrics(run_dir)
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
            assert math.isfinite(data[key]), (launcher, step, key, data[key])
        assert data["response_length/mean"] > 0
        assert 0.0 <= data["critic/score/mean"] <= 1.0
    sources = {"math", "aime24", "aime25"} | (
        {"math_dapo"} if launcher != "train_grpo_native_no_kl.sh" else set()
    )
    for step in (0, 2):  # before training and at the last step (TEST_FREQ=2)
        validated = {
            k.split("/")[1]
            for r in records
            if r["step"] == step
            for k in r["data"]
            if k.startswith("val-core/")
        }
        assert validated == sources, (launcher, step, validated)
        generations = (run_dir / "validation" / f"{step}.jsonl").read_text().splitlines()
        assert len(generations) == 13 * (launcher != "train_grpo_native_no_kl.sh") + 3 * 8
        assert {"input", "output", "score", "acc", "pred"} <= json.loads(generations[0]).keys()
    assert (run_dir / "global_step_2" / "actor" / "model_world_size_1_rank_0.pt").is_file()
    assert (run_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "2"


def test_each_recipe_trains_with_its_own_kl_setting(variant_run):
    """The recipes' constants are checked where they compose (test_jobs.py); here: what they do in training."""
    launcher, run_dir = variant_run
    train_steps = [r["data"] for r in read_metrics(run_dir) if "actor/pg_loss" in r["data"]]
    if launcher == "train_grpo_native.sh":
        assert all(math.isfinite(step["actor/kl_loss"]) for step in train_steps)
        # the KL to the reference is positive once an earlier step moved the policy; a first step whose
        # samples all scored the same (zero advantages, gradient norm 0: about 1 run in 7 with the tiny
        # student) leaves the policy at the reference, and the KL at exactly 0
        moved = any(step["actor/grad_norm"] > 0 for step in train_steps[:-1])
        assert (train_steps[-1]["actor/kl_loss"] > 0) == moved, train_steps
    else:
        assert all(step.get("actor/kl_loss", 0.0) == 0.0 for step in train_steps)  # verl logs 0 without KL
    assert run_dir.name.startswith("student-local-GRPO")


# --- checkpoint conversion of train_grpo.sh's checkpoint (jobs/convert_checkpoint.sh, opd.checkpoint) -----------------------------------------------------------


@pytest.fixture(scope="module")
def converted_step(grpo_checkpoint_run, tmp_path_factory):
    """``global_step_1`` copied (the default target writes into it), converted with the defaults."""
    step = tmp_path_factory.mktemp("converted") / "global_step_1"
    shutil.copytree(grpo_checkpoint_run / "global_step_1", step)
    return step, convert(step)


def test_convert_from_the_step_dir_completes_actor_huggingface(converted_step):
    step, report = converted_step
    actor = step / "actor"
    assert report.actor_dir == actor and report.target == actor / "huggingface"
    assert report.world_size == 1
    assert report.n_tensors == len(reassemble(find_actor_checkpoint(actor)))
    verification = report.verification
    # fp32 training weights stored in bf16: the logits move, but by far less than the tolerance
    assert verification.dtype == "bfloat16"
    assert 0 < report.max_abs_logit_diff <= verification.logit_tolerance
    assert verification.max_abs_logit_diff_cast == 0.0
    for name in (*HF_FILES, "model.safetensors"):
        assert (report.target / name).is_file(), name
    assert json.loads((report.target / MARKER_FILE).read_text())["verified"] is True


def test_cli_converts_the_actor_dir_to_the_same_model_and_a_run_dir_to_its_latest_step(
    grpo_checkpoint_run, converted_step, tmp_path
):
    import torch

    checkpoints = grpo_checkpoint_run  # a launcher run keeps global_step_N/ in its run dir
    target = tmp_path / "from_actor"
    log = tmp_path / "convert.log"
    env = dict(
        os.environ, CHECKPOINT_PATH=str(checkpoints / "global_step_1" / "actor"), TARGET_DIR=str(target)
    )
    assert run_launcher("convert_checkpoint.sh", env, log) == 0, log.read_text()[-3000:]
    result = SimpleNamespace(stdout=log.read_text())
    assert "world size 1" in result.stdout and "max |Δlogits|" in result.stdout
    assert "verified" in result.stdout
    assert not (checkpoints / "global_step_1" / "actor" / "huggingface" / "model.safetensors").exists()
    # converting the same checkpoint into the same target again is allowed
    again = convert(checkpoints / "global_step_1" / "actor", target, verify=False)
    assert again.max_abs_logit_diff is None and again.n_tensors > 0

    latest = (checkpoints / "latest_checkpointed_iteration.txt").read_text().strip()
    report = convert(grpo_checkpoint_run, tmp_path / "from_latest")  # the run dir: its latest step
    assert report.actor_dir == checkpoints / f"global_step_{latest}" / "actor"

    from_step, from_actor = load_stored(converted_step[1].target), load_stored(target)
    assert from_actor.keys() == from_step.keys()
    assert all(torch.equal(from_actor[k], from_step[k]) for k in from_step)


def test_converted_weights_are_the_trained_shards_not_the_initial_student(converted_step, tiny_assets):
    import torch

    step, report = converted_step
    converted = load_stored(report.target)
    shards = reassemble(find_actor_checkpoint(step))
    initial = load_stored(tiny_assets / "student")
    assert converted.keys() == shards.keys() == initial.keys()
    for key, tensor in converted.items():
        assert torch.equal(shards[key].to(tensor.dtype), tensor), key
    assert [k for k in shards if not torch.equal(shards[k], initial[k])], "training changed no weight"
    # ... and enough to survive rounding to the stored dtype
    changed = [k for k, t in converted.items() if not torch.equal(initial[k].to(t.dtype), t)]
    assert len(changed) > len(converted) // 2, changed


def test_converted_model_generates_with_its_tokenizer(converted_step):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = converted_step[1].target
    model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(target)
    question = "Ava has 12 coins and finds 30 more. How many coins does Ava have now?"
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, return_tensors="pt"
    )
    out = model.generate(prompt, max_new_tokens=16, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert "boxed" in tokenizer.decode(out[0, prompt.shape[1] :])
