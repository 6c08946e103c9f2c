"""CPU end-to-end: the three GRPO recipes through their launchers (``bash jobs/train_grpo*.sh``), i.e.
data preparation from the raw layout, then ``python -m opd.main_grpo experiment=...`` through Ray, verl's
FSDP workers and the ``hf`` rollout, 2 steps each."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from omegaconf import OmegaConf

import opd.config  # noqa: F401  (resolvers for the saved config)
from conftest import only_run_dir, run_launcher, tiny_launcher_env
from opd.demo import read_metrics

pytestmark = pytest.mark.e2e

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


def test_each_recipe_trains_with_its_own_settings(variant_run):
    launcher, run_dir = variant_run
    config = OmegaConf.load(run_dir / ".hydra" / "config.yaml")
    actor = config.actor_rollout_ref.actor
    train_steps = [r["data"] for r in read_metrics(run_dir) if "actor/pg_loss" in r["data"]]
    assert config.reward.custom_reward_function.path == "pkg://opd.rewards.math_reward"
    if launcher == "train_grpo.sh":
        assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == (0.2, 0.28, 10.0)
        assert actor.use_dynamic_bsz and actor.ppo_max_token_len_per_gpu == (128 + 24) * 2
        assert config.actor_rollout_ref.ref.log_prob_max_token_len_per_gpu == (128 + 24) * 3
    if launcher == "train_grpo_native.sh":
        assert actor.use_kl_loss and actor.kl_loss_coef == 0.001 and actor.kl_loss_type == "low_var_kl"
        assert all(math.isfinite(step["actor/kl_loss"]) for step in train_steps)
        assert train_steps[-1]["actor/kl_loss"] > 0  # step 2's policy has moved away from the reference
        assert not actor.use_dynamic_bsz
    else:
        assert not actor.use_kl_loss
        assert all(step.get("actor/kl_loss", 0.0) == 0.0 for step in train_steps)  # verl logs 0 without KL
    assert run_dir.name.startswith("student-local-GRPO")
