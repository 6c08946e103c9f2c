"""CPU end-to-end OPD through Ray, the OPD worker (teacher = verl's ref role) and the ``hf`` rollout.

Four runs, each serving every assertion it can (module fixtures):
- ``bash jobs/train_opd.sh`` exactly as the original repository's users run it: the ``opd`` recipe's own
  settings, overriding only paths and sizes (so a recipe that verl rejects fails here);
- ``python -m opd.main_opd``: forward KL from the teacher's hidden states, reward-weighted, 2 samples per
  prompt, 2 mini-batches and 2 epochs per step, a checkpoint;
- the same entry with JSD from the teacher's top-k, weighting off, Soft-OR token selection;
- self-distillation (the teacher a frozen copy of the student, the answer in its prompt), PACED weighting over
  4 samples per prompt, forward KL then reverse KL.
Reverse KL with ``sampled`` and ``topk`` runs in the SLURM sweep (test_slurm_launch.py), resuming from a
checkpoint in its requeued job.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from conftest import only_run_dir, run_launcher, tiny_launcher_env
from opd.demo import read_metrics, run_entry, tiny_opd_overrides

# a verl run (~1-3 min on 2 busy cores) happens inside the first test of each fixture
pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

LOSS_TYPES = ("reverse_kl", "forward_kl", "jsd")
DIAGNOSTICS = (
    "tool_mask/llm_tokens",
    "tool_mask/tool_tokens",
    "tool_mask/tool_ratio",
    "num_turns/min",
    "num_turns/max",
    "num_turns/mean",
)


def train_steps(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r["data"] for r in read_metrics(run_dir) if "opd/divergence" in r["data"]}


def signal_bytes_per_token(tiny_assets: Path, signal: str, topk: int = 64) -> int:
    """What each teacher signal stores per token (opd.distill.teacher_signal): logits bf16 x V, hidden
    bf16 x H, top-k fp32 log-prob + int32 id per kept token plus the fp32 tail mass, sampled 8 bytes."""
    from transformers import AutoTokenizer

    teacher = json.loads((tiny_assets / "teacher" / "config.json").read_text())
    vocab = len(AutoTokenizer.from_pretrained(tiny_assets / "student"))  # the compared vocabulary
    return {"logits": 2 * vocab, "hidden": 2 * teacher["hidden_size"], "topk": 8 * topk + 4, "sampled": 8}[
        signal
    ]


def teacher_head_bytes(tiny_assets: Path) -> int:
    """The teacher's output head over the compared vocabulary, in the dtype it computes in (verl's FSDP
    mixed precision: bf16, also on CPU)."""
    from transformers import AutoTokenizer

    teacher = json.loads((tiny_assets / "teacher" / "config.json").read_text())
    return len(AutoTokenizer.from_pretrained(tiny_assets / "student")) * teacher["hidden_size"] * 2


def assert_trained_with(steps: dict[int, dict], loss_type: str, bytes_per_token: int) -> None:
    """The run optimised ``loss_type`` (and no other) from the configured teacher signal."""
    for data in steps.values():
        logged = [t for t in LOSS_TYPES if f"opd/divergence/{t}" in data]
        assert logged == [loss_type], logged
        assert data[f"opd/divergence/{loss_type}"] == data["opd/divergence"] >= 0
        assert data["opd/teacher_signal_bytes_per_token"] == bytes_per_token


def assert_updates_move_the_student_toward_the_teacher(steps: dict[int, dict]) -> None:
    """ppo_epochs=2: the second pass over the same rows sees a smaller divergence. The learning rates are
    set so that one Adam step (about lr per parameter at the first step) is well short of overshooting:
    measured over 5 steps, forward KL at 1e-3 fell by 16-30% per step, JSD at 1e-4 by 1-8% (at 1e-3 JSD
    rose once, +6%)."""
    for step, data in steps.items():
        first, last = data["opd/divergence_first_epoch"], data["opd/divergence_last_epoch"]
        assert last < first, (step, first, last)


def opd_run(tiny_assets, run_dir: Path, steps: int, *extra: str, save_freq: int = -1) -> dict[int, dict]:
    overrides = [
        *tiny_opd_overrides(tiny_assets, run_dir, steps, save_freq=save_freq),
        "trainer.val_before_train=false",
        *extra,
    ]
    code = run_entry("opd.main_opd", overrides, run_dir / "train.log")
    assert code == 0, (run_dir / "train.log").read_text()[-4000:]
    return train_steps(run_dir)


# --- the launcher with the recipe's own settings -------------------------------------------------------

OPD_MAX_LENGTH = 72  # prompt + response tokens per row: the launcher's tiny prompts have 63-80 tokens


@pytest.fixture(scope="module")
def launcher_run(tiny_assets, tiny_raw_data, tmp_path_factory) -> Path:
    """``MODEL_PATH=… TEACHER_MODEL_PATH=… PLATFORM=cpu DATA_DIR=… bash jobs/train_opd.sh``, sizes only: two
    training processes (FSDP over gloo, 4 rows each per step) and an ``OPD_MAX_LENGTH`` below some prompts,
    so each rank drops the rows whose prompt alone reaches it (and truncates others): in step 1 the ranks
    keep different numbers of rows, in step 2 none (measured: 1 vs 2 micro-batches, then 0 and 0). A rank
    without rows beside one with rows: tests/test_opd_multirank.py."""
    output_root = tmp_path_factory.mktemp("opd_launcher")
    env = tiny_launcher_env(
        tiny_assets,
        tiny_raw_data,
        output_root,
        TEACHER_MODEL_PATH=str(tiny_assets / "teacher"),
        TOTAL_TRAINING_STEPS="2",
        SAVE_FREQ="2",
        TEST_FREQ="2",
        ROLLOUT_N="",  # the recipe's 1 sample per prompt
        LEARNING_RATE="",  # the recipe's learning rate
        N_GPUS_PER_NODE="2",
        PPO_MICRO_BATCH_SIZE_PER_GPU="1",  # a micro-batch per kept row: ranks that keep fewer rows run fewer
        OPD_MAX_LENGTH=str(OPD_MAX_LENGTH),
    )
    log = output_root / "launcher.log"
    # verl balances token counts across ranks, which tends to leave them equal numbers of rows: off here so
    # the ranks keep different numbers and run different numbers of micro-batches before padding
    assert run_launcher("train_opd.sh", env, log, "trainer.balance_batch=false") == 0, log.read_text()[-4000:]
    return only_run_dir(output_root)


def test_train_opd_sh_trains_with_the_recipes_own_settings(launcher_run, tiny_assets):
    from omegaconf import OmegaConf

    config = OmegaConf.load(launcher_run / ".hydra" / "config.yaml")
    assert config.actor_rollout_ref.rollout.n == 1 and config.actor_rollout_ref.actor.optim.lr == 1e-6
    steps = train_steps(launcher_run)
    assert sorted(steps) == [1, 2]
    assert config.opd.loss_agg_mode == "seq-mean-token-mean"  # the original repository's per-sample mean
    assert_trained_with(steps, "reverse_kl", signal_bytes_per_token(tiny_assets, "hidden"))
    head_mb = teacher_head_bytes(tiny_assets) / 2**20
    for data in steps.values():
        # 8 prompts x 1 sample on two ranks: every row either distilled or dropped, counted over both ranks
        assert data["opd/rows"] + data["opd/rows_skipped_overlong"] == 8
        assert data["opd/rows_skipped_overlong"] > 0  # prompts at or over OPD_MAX_LENGTH
        assert math.isfinite(data["actor/grad_norm"])
        assert data["opd/teacher_head_mb"] == pytest.approx(head_mb)  # the teacher's head, kept once per step
    trained = [d for d in steps.values() if d["opd/rows"] > 0]
    assert trained, "every row of every step was dropped"
    for data in trained:
        assert data["opd/target_tokens"] > 0 and data["opd/optimizer_steps"] == 1
        assert (
            data["opd/logit_rows_per_target_token"] == 1.0
        )  # packed rows, the head at target positions only
        assert data["opd/teacher_signal_mb"] > head_mb  # rank 0's: the head plus its tokens' hidden states
    uneven = [d for d in trained if d["opd/micro_batches_per_rank_min"] < d["opd/micro_batches_per_rank_max"]]
    assert uneven, "the ranks kept equal numbers of rows in every step: the uneven case was never exercised"
    for data in uneven:  # the rank with fewer rows ran padding micro-batches up to the other's count
        assert data["opd/micro_batches"] == data["opd/micro_batches_per_rank_max"]
        assert data["opd/padding_micro_batches"] == 2 * data["opd/micro_batches"] - (
            data["opd/micro_batches_per_rank_min"] + data["opd/micro_batches_per_rank_max"]
        )
    # a step whose rows were all dropped on both ranks: one stand-in pass per rank, no optimizer step
    empty = [d for d in steps.values() if d["opd/rows"] == 0]
    assert empty, "no step lost all its rows: the empty case was never exercised"
    for data in empty:
        assert data["opd/padding_micro_batches"] == 2 and data["opd/optimizer_steps"] == 0
        assert data["opd/optimizer_steps_skipped_empty"] == 1
    validated = [r for r in read_metrics(launcher_run) if any(k.startswith("val-core/") for k in r["data"])]
    assert [r["step"] for r in validated] == [2]  # the recipe does not validate before training
    assert (launcher_run / "global_step_2" / "actor").is_dir()


# --- forward KL, hidden states, reward weighting, n=2, mini-batches, epochs, checkpoint -------------------


@pytest.fixture(scope="module")
def weighted_run(tiny_assets, tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    run_dir = tmp_path_factory.mktemp("opd_weighted")
    steps = opd_run(
        tiny_assets,
        run_dir,
        2,
        "opd.loss_type=forward_kl",
        "opd.teacher_signal=hidden",
        "opd.reward_beta=0.5",
        "actor_rollout_ref.rollout.n=2",
        "actor_rollout_ref.actor.ppo_mini_batch_size=4",  # 4 prompts x 2 responses per optimizer step
        "actor_rollout_ref.actor.ppo_epochs=2",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        # rewards that are mixed in every batch (tests/rewards/by_length.py says why)
        f"reward.custom_reward_function.path={Path(__file__).parent / 'rewards' / 'by_length.py'}",
        save_freq=2,
    )
    return run_dir, steps


def test_forward_kl_from_hidden_states_trains_and_moves_the_student_toward_the_teacher(
    weighted_run, tiny_assets
):
    run_dir, steps = weighted_run
    assert sorted(steps) == [1, 2]
    assert_trained_with(steps, "forward_kl", signal_bytes_per_token(tiny_assets, "hidden"))
    assert_updates_move_the_student_toward_the_teacher(steps)
    for data in steps.values():
        assert all(key in data for key in DIAGNOSTICS)
        assert data["opd/rows"] == 16  # 8 prompts x rollout.n=2 responses generated and distilled
        # verl's meaning: 16 rows / 8 per mini-batch x 2 epochs; every token selected by default
        assert data["opd/optimizer_steps"] == 4
        assert data["opd/selected_token_fraction"] == 1.0
    assert (run_dir / "checkpoints" / "global_step_2" / "actor").is_dir()


def test_reward_weighting_on_weights_rewarded_samples_up(weighted_run):
    _, steps = weighted_run
    mixed = [d for d in steps.values() if d["critic/score/max"] > d["critic/score/min"]]
    assert mixed, "no step had both rewarded and unrewarded samples: the weighting was never exercised"
    for data in mixed:  # softmax(r / 0.5) * B: below 1 for the unrewarded, above 1 for the rewarded
        assert data["opd/sample_weight_min"] < 1.0 < data["opd/sample_weight_max"], data


# --- JSD from the teacher's top-k, weighting off, Soft-OR token selection ---------------------------------

PAIRS_PER_STEP = 64


@pytest.fixture(scope="module")
def topk_run(tiny_assets, tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    run_dir = tmp_path_factory.mktemp("opd_topk")
    steps = opd_run(
        tiny_assets,
        run_dir,
        1,
        "opd.loss_type=jsd",
        "opd.teacher_signal=topk",
        "actor_rollout_ref.actor.ppo_epochs=2",
        "actor_rollout_ref.actor.optim.lr=1e-4",
        # half the tokens of each mini-batch (per rollout, floor(0.5 x length) of the tiny model's short
        # answers would keep well under half)
        "opd.token_selection.rule=soft_or",
        "opd.token_selection.ratio=0.5",
        "opd.token_selection.scope=mini_batch",
        f"opd.token_selection.sample_pairs={PAIRS_PER_STEP}",  # per rank
    )
    return run_dir, steps


def test_jsd_from_the_teachers_topk_trains_and_moves_the_student_toward_the_teacher(topk_run, tiny_assets):
    _, steps = topk_run
    assert sorted(steps) == [1]
    assert_trained_with(steps, "jsd", signal_bytes_per_token(tiny_assets, "topk"))
    assert_updates_move_the_student_toward_the_teacher(steps)


def test_reward_weighting_off_leaves_every_weight_at_one(topk_run):
    for data in topk_run[1].values():
        assert data["opd/sample_weight_min"] == data["opd/sample_weight_max"] == 1.0


def test_soft_or_keeps_half_the_tokens_and_reports_the_quadrants(topk_run):
    run_dir, steps = topk_run
    for data in steps.values():
        assert data["opd/selected_token_fraction"] == pytest.approx(0.5, abs=0.02)
        shares = [data[f"opd/tokens/{q}_share"] for q in ("q1", "q2", "q3", "q4")]
        assert sum(shares) == pytest.approx(1.0) and min(shares) >= 0
        # Soft-OR keeps high-entropy or high-divergence tokens: the kept ones score higher on both
        assert data["opd/tokens/kept_divergence"] > data["opd/tokens/dropped_divergence"]
    (record,) = [json.loads(line) for line in (run_dir / "token_pairs.jsonl").read_text().splitlines()]
    assert record["step"] == 1 and len(record["entropy"]) == len(record["divergence"]) == PAIRS_PER_STEP
    assert 0 < sum(record["kept"]) < PAIRS_PER_STEP
    from opd.tip import main as tip_main

    assert tip_main(["plot", str(run_dir)]) == 0
    assert (run_dir / "token_quadrants.png").stat().st_size > 10_000


# --- PACED weighting, forward-then-reverse KL schedule, self-distillation with the answer in context ------


@pytest.fixture(scope="module")
def paced_self_run(tiny_assets, tmp_path_factory) -> tuple[Path, dict[int, dict]]:
    """The tiny student distilled from a frozen copy of itself whose prompt carries the reference answer,
    PACED-weighted over rollout.n=4 samples, forward KL for the first half of training then reverse KL."""
    run_dir = tmp_path_factory.mktemp("opd_paced_self")
    steps = opd_run(
        tiny_assets,
        run_dir,
        2,
        "opd.teacher=self",
        "opd.teacher_path=null",
        "opd.teacher_context.field=reward_model.ground_truth",
        "opd.sample_weighting.method=paced",
        "actor_rollout_ref.rollout.n=4",
        "opd.loss_type=reverse_kl",
        "opd.schedule.stages=[{loss_type:forward_kl,until:0.5},{loss_type:reverse_kl}]",
        # pass rates 1, 0 and mixed in every batch (tests/rewards/by_prompt.py says why)
        f"reward.custom_reward_function.path={Path(__file__).parent / 'rewards' / 'by_prompt.py'}",
    )
    return run_dir, steps


def test_schedule_switches_from_forward_to_reverse_kl_mid_run(paced_self_run):
    _, steps = paced_self_run
    assert sorted(steps) == [1, 2]
    logged = {s: [t for t in LOSS_TYPES if f"opd/divergence/{t}" in d] for s, d in steps.items()}
    assert logged == {1: ["forward_kl"], 2: ["reverse_kl"]}
    assert [steps[s]["opd/schedule/stage"] for s in (1, 2)] == [0, 1]


def test_paced_drops_prompts_solved_always_or_never_before_the_teacher(paced_self_run):
    _, steps = paced_self_run
    for data in steps.values():
        assert data["paced/prompts"] == 8 and data["paced/pass_rate/1"] > 0 and data["paced/pass_rate/0"] > 0
        dropped = 32 - data["paced/kept_rows"]
        assert data["opd/rows_skipped_zero_weight"] == dropped > 0
        assert data["opd/teacher_tokens_saved"] > 0  # neither model ran on the dropped rows
        assert data["opd/rows"] == data["paced/kept_rows"]
        shares = [data[f"paced/pass_rate/{b}"] for b in ("0", "0-25", "25-50", "50-75", "75-100", "1")]
        assert sum(shares) == pytest.approx(1.0)
    kept = [d for d in steps.values() if d["paced/kept_rows"] > 0]
    assert kept, "no prompt was solved sometimes: the weighting was never exercised"
    for data in kept:  # mean 1 over the kept rows: the loss keeps the unweighted scale
        assert data["opd/sample_weight_min"] == 0.0 < data["opd/sample_weight_max"]
        assert data["opd/optimizer_steps"] >= 1


def test_self_distillation_teacher_sees_the_answer_and_reports_its_metrics(paced_self_run):
    run_dir, steps = paced_self_run
    for data in steps.values():
        if data["opd/rows"]:  # the teacher's prompt is longer by the template and the answer, on every row
            assert data["opd/teacher_prompt_extra_tokens"] >= 5 * data["opd/rows"]
            assert data["opd/divergence"] > 0  # a frozen copy of the student differs once it sees the answer
    log = (run_dir / "train.log").read_text()
    assert "may differ from the student's" not in log  # the plain prompt renders as the rollout's did
