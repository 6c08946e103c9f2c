"""CPU end-to-end: ``python -m opd.main_opd`` through Ray, the OPD worker (teacher = ref) and the ``hf`` rollout."""

from __future__ import annotations

import math

import pytest

from opd.demo import read_metrics, run_entry, tiny_opd_overrides

pytestmark = pytest.mark.e2e

DIAGNOSTICS = (
    "tool_mask/llm_tokens",
    "tool_mask/tool_tokens",
    "tool_mask/tool_ratio",
    "num_turns/min",
    "num_turns/max",
    "num_turns/mean",
)


def _train_steps(run_dir) -> dict[int, dict]:
    return {r["step"]: r["data"] for r in read_metrics(run_dir) if "opd/divergence" in r["data"]}


def _run(tiny_assets, run_dir, steps, *extra, save_freq=-1):
    overrides = [
        *tiny_opd_overrides(tiny_assets, run_dir, steps, save_freq=save_freq),
        "trainer.val_before_train=false",
        *extra,
    ]
    code = run_entry("opd.main_opd", overrides, run_dir / "train.log")
    assert code == 0, (run_dir / "train.log").read_text()[-4000:]
    return _train_steps(run_dir)


@pytest.mark.parametrize(
    "loss_type,teacher_signal",
    [("forward_kl", "hidden"), ("jsd", "topk"), ("reverse_kl", "sampled")],
)
def test_each_loss_type_and_teacher_signal_trains(tiny_assets, tmp_path, loss_type, teacher_signal):
    steps = _run(
        tiny_assets, tmp_path, 1, f"opd.loss_type={loss_type}", f"opd.teacher_signal={teacher_signal}"
    )
    data = steps[1]
    for key in (
        "opd/divergence",
        "actor/grad_norm",
        "actor/entropy",
        "opd/teacher_seconds",
        "opd/student_seconds",
    ):
        assert math.isfinite(data[key]), (key, data[key])
    assert data["opd/target_tokens"] > 0 and data["opd/teacher_signal_mb"] > 0


def test_reward_weighted_opd_with_two_samples_mini_batches_and_epochs_saves_and_resumes(
    tiny_assets, tmp_path
):
    first = tmp_path / "first"
    steps = _run(
        tiny_assets,
        first,
        2,
        "actor_rollout_ref.rollout.n=2",
        "opd.reward_beta=0.5",
        "opd.teacher_signal=logits",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",  # 4 prompts x 2 responses per optimizer step
        "actor_rollout_ref.actor.ppo_epochs=2",
        save_freq=2,
    )
    assert sorted(steps) == [1, 2]
    for data in steps.values():
        assert math.isfinite(data["opd/divergence"]) and data["opd/divergence"] >= 0
        assert all(key in data for key in DIAGNOSTICS)
        # 8 prompts x rollout.n=2 responses actually generated and distilled
        assert data["opd/rows"] == 16
        assert data["opd/reward_weight_min"] <= 1.0 <= data["opd/reward_weight_max"]
        # verl's meaning: 16 rows / 8 per mini-batch x 2 epochs; every token selected by default
        assert data["opd/optimizer_steps"] == 4
        assert data["opd/selected_token_fraction"] == 1.0
    assert (first / "checkpoints" / "global_step_2" / "actor").is_dir()

    resumed = tmp_path / "resumed"
    overrides = [
        *tiny_opd_overrides(tiny_assets, resumed, 3),
        "trainer.val_before_train=false",
        "actor_rollout_ref.rollout.n=2",
        "opd.reward_beta=0.5",
        f"trainer.default_local_dir={first / 'checkpoints'}",
    ]
    assert run_entry("opd.main_opd", overrides, resumed / "train.log") == 0
    assert sorted(_train_steps(resumed)) == [3]  # continued from the saved step 2
    assert "global_step_2" in (resumed / "train.log").read_text()


def test_missing_teacher_is_refused_before_ray_starts(tiny_assets, tmp_path, monkeypatch):
    import subprocess
    import sys

    monkeypatch.delenv("TEACHER_MODEL_PATH", raising=False)
    overrides = [
        o for o in tiny_opd_overrides(tiny_assets, tmp_path, 1) if not o.startswith("opd.teacher_path")
    ]
    result = subprocess.run(
        [sys.executable, "-m", "opd.main_opd", *overrides], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "error: no teacher: export TEACHER_MODEL_PATH=/path/to/teacher_model (or pass opd.teacher_path=...)"
    ]
