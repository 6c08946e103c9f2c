"""PACED pass-rate weighting, the divergence schedule and self-distillation's teacher rows, as plain code:
``opd.distill.weights``, ``opd.distill.config.Schedule``, ``opd.distill.context`` and ``build_opd_batch``'s
teacher rows; then through the worker's real update (the bare worker of test_opd_weights_and_hooks): the
schedule picks the divergence of each step, rows of weight 0 never reach the teacher, and the teacher scores
the student's response after its own prompt."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from opd.distill.batch import TEACHER_PROMPTS, build_opd_batch
from opd.distill.config import OPDConfig, OPDConfigError, Schedule
from opd.distill.context import MissingContextError, teacher_messages, teacher_prompt_ids
from opd.distill.step import StepSettings, run_step
from opd.distill.weights import (
    PASS_RATE_BINS,
    pass_rate_metrics,
    pass_rate_weights,
    pass_rates,
    sample_weights,
)
from test_opd_batch import rollout_batch

VOCAB = 438


# --- pass_rate_weights -----------------------------------------------------------------------------------


def by_hand(scores, uids, alpha=1.0, beta=1.0):
    """w = p^alpha (1 - p)^beta per row from each uid's fraction of scores > 0, in plain Python."""
    p = {
        u: sum(s > 0 for s, v in zip(scores, uids, strict=True) if v == u) / uids.count(u) for u in set(uids)
    }
    return [p[u] ** alpha * (1 - p[u]) ** beta for u in uids]


def test_pass_rate_weights_from_hand_built_rewards_and_uneven_groups():
    # a: 2 of 4 pass; b: all pass; c: none pass; d: a single sample; e: 1 of 3 (an uneven group)
    uids = ["a", "b", "a", "c", "b", "a", "d", "e", "a", "c", "e", "e", "b"]
    scores = [1.0, 1.0, 0.0, 0.0, 0.5, 0.0, 1.0, -1.0, 1.0, 0.0, 2.0, 0.0, 1.0]
    raw = by_hand(scores, uids)
    weights_B = pass_rate_weights(torch.tensor(scores), uids, normalise="none")
    torch.testing.assert_close(weights_B, torch.tensor(raw))
    assert raw[0] == 0.25 and raw[7] == pytest.approx(2 / 9)
    # all-correct (b), all-wrong (c) and the single sample (d) weigh 0
    for i, uid in enumerate(uids):
        assert (float(weights_B[i]) == 0.0) == (uid in "bcd"), uid
    # documented normalisation: mean 1 over the rows that keep a weight, the same ratios
    mean_B = pass_rate_weights(torch.tensor(scores), uids)
    kept = mean_B > 0
    assert float(mean_B[kept].mean()) == pytest.approx(1.0)
    torch.testing.assert_close(mean_B, weights_B / weights_B[kept].mean())


def test_pass_rate_weights_exponents_move_the_weight_toward_easy_or_hard_prompts():
    uids = ["easy"] * 4 + ["hard"] * 4
    scores = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0])  # p = 3/4 and 1/4
    for alpha, beta in ((1.0, 1.0), (2.0, 1.0), (1.0, 3.0), (0.5, 0.0)):
        got = pass_rate_weights(scores, uids, alpha, beta, normalise="none")
        torch.testing.assert_close(got, torch.tensor(by_hand(scores.tolist(), uids, alpha, beta)))
    easy, hard = pass_rate_weights(scores, uids, 2.0, 1.0)[[0, 4]]
    assert easy > hard  # alpha > beta favours prompts the student mostly solves


@pytest.mark.parametrize("scores", [[1.0, 1.0, 1.0], [0.0, 0.0, -1.0], [1.0]])
def test_all_correct_all_wrong_or_single_sample_batches_weigh_nothing(scores):
    uids = ["x"] * len(scores)
    assert torch.equal(pass_rate_weights(torch.tensor(scores), uids), torch.zeros(len(scores)))


def test_pass_rates_and_the_histogram_of_prompts():
    uids = ["a", "a", "b", "b", "c", "c", "d", "d"]
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 1.0, 0.0])
    p_B, group_B = pass_rates(scores, uids)
    assert p_B.tolist() == [0.5, 0.5, 1.0, 1.0, 0.0, 0.0, 0.5, 0.5]
    assert group_B.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    metrics = pass_rate_metrics(scores, uids, pass_rate_weights(scores, uids))
    assert metrics["paced/pass_rate/0"] == metrics["paced/pass_rate/1"] == 0.25
    assert metrics["paced/pass_rate/25-50"] == 0.5 and metrics["paced/pass_rate/0-25"] == 0.0
    assert metrics["paced/kept_prompts"] == 2 and metrics["paced/kept_prompt_fraction"] == 0.5
    assert metrics["paced/kept_rows"] == 4 and metrics["paced/pass_rate_mean"] == 0.5
    from opd.paced import BINS  # the plot's copy of the bins (it imports no torch)

    assert BINS == tuple(name for name, _, _ in PASS_RATE_BINS)
    with pytest.raises(ValueError, match="one uid per rollout row"):
        pass_rates(scores, uids[:-1])


def test_sample_weights_dispatches_the_configured_method():
    scores, uids = torch.tensor([1.0, 0.0, 1.0, 1.0]), ["a", "a", "b", "b"]
    assert torch.equal(sample_weights("none", scores, uids)[0], torch.ones(4))
    softmax, _ = sample_weights("reward_softmax", scores, uids, reward_beta=0.5)
    assert float(softmax.mean()) == pytest.approx(1.0) and softmax[0] > softmax[1]
    paced, metrics = sample_weights("paced", scores, uids)
    assert paced.tolist() == [1.0, 1.0, 0.0, 0.0] and metrics["paced/kept_prompts"] == 1
    with pytest.raises(ValueError, match="uid"):
        sample_weights("paced", scores, None)


# --- the divergence schedule ------------------------------------------------------------------------------

FKL_THEN_RKL = [{"loss_type": "forward_kl", "until": 0.3}, {"loss_type": "reverse_kl"}]


def test_schedule_stage_at_each_step_by_fraction_and_by_step():
    by_fraction = Schedule(stages=FKL_THEN_RKL)
    # 10 steps: steps 1-3 are the first 30% ((s - 1) / 10 < 0.3), then reverse KL
    assert [by_fraction.stage_at(s, 10) for s in range(1, 11)] == [0, 0, 0] + [1] * 7
    assert [by_fraction.loss_type_at(s, 10, "jsd") for s in (1, 3, 4, 10)] == [
        "forward_kl",
        "forward_kl",
        "reverse_kl",
        "reverse_kl",
    ]
    three = Schedule(
        stages=[
            {"loss_type": "forward_kl", "until": 3},
            {"loss_type": "jsd", "until": 5},
            {"loss_type": "reverse_kl"},
        ],
        unit="step",
    )
    assert [three.stage_at(s, None) for s in range(1, 8)] == [0, 0, 1, 1, 2, 2, 2]
    assert Schedule().stage_at(4, 10) == -1 and Schedule().loss_type_at(4, 10, "jsd") == "jsd"
    with pytest.raises(ValueError, match="total steps"):
        by_fraction.stage_at(1, None)


@pytest.mark.parametrize(
    ("schedule", "message"),
    [
        ({"stages": [{"loss_type": "forward_kl"}, {"loss_type": "reverse_kl"}]}, "every stage but the last"),
        (
            {"stages": [{"loss_type": "forward_kl", "until": 1.5}, {"loss_type": "reverse_kl"}]},
            r"in \(0, 1\)",
        ),
        (
            {
                "stages": [{"loss_type": "forward_kl", "until": 2.5}, {"loss_type": "reverse_kl"}],
                "unit": "step",
            },
            "whole step",
        ),
        (
            {
                "stages": [
                    {"loss_type": "forward_kl", "until": 0.5},
                    {"loss_type": "jsd", "until": 0.2},
                    {"loss_type": "reverse_kl"},
                ]
            },
            "above the previous",
        ),
        ({"stages": [{"loss_type": "kl", "until": 0.5}, {"loss_type": "reverse_kl"}]}, "choose one of"),
        ({"stages": [{"until": 0.5}, {"loss_type": "reverse_kl"}]}, r"needs the key\(s\) \['loss_type'\]"),
        (
            {"stages": [{"loss_type": "forward_kl", "until": 0.5, "x": 1}, {"loss_type": "reverse_kl"}]},
            "unknown",
        ),
        ({"stages": ["forward_kl"]}, "must be a mapping"),
        ({"unit": "epoch"}, "choose one of"),
    ],
)
def test_bad_schedules_are_refused_with_the_fix(schedule, message):
    with pytest.raises(OPDConfigError, match=message):
        OPDConfig.from_mapping({"schedule": schedule})


def test_schedule_stages_are_checked_against_the_teacher_signal():
    with pytest.raises(
        OPDConfigError, match=r"stages\[0\].loss_type=forward_kl is not supported with .*sampled"
    ):
        OPDConfig.from_mapping({"teacher_signal": "sampled", "schedule": {"stages": FKL_THEN_RKL}})
    with pytest.raises(OPDConfigError, match="is in no stage"):
        OPDConfig.from_mapping({"loss_type": "jsd", "schedule": {"stages": FKL_THEN_RKL}})
    config = OPDConfig.from_mapping({"schedule": {"stages": FKL_THEN_RKL}})
    assert config.loss_types == ("forward_kl", "reverse_kl")


# --- self-distillation: the teacher's rows ----------------------------------------------------------------


def test_teacher_messages_put_the_context_in_the_last_user_message_only():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 plus 3?"},
        {"role": "assistant", "content": "Let me think."},
        {"role": "user", "content": "And 4 plus 4?"},
    ]
    out = teacher_messages(messages, "8", "{prompt} (answer: {context})")
    assert out[3]["content"] == "And 4 plus 4? (answer: 8)"
    assert out[:3] == messages[:3] and messages[3]["content"] == "And 4 plus 4?"  # the input is not changed
    with pytest.raises(ValueError, match="no user message"):
        teacher_messages([{"role": "system", "content": "x"}], "8", "{prompt}{context}")


def test_teacher_prompts_render_the_context_with_the_chat_template(tiny_assets):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "student")
    raw = [
        [{"role": "user", "content": "What is 82 plus 57?"}],
        [{"role": "user", "content": "What is 3 plus 4?"}],
    ]
    non_tensor = {
        "raw_prompt": np.array(raw + [None], dtype=object)[:2],
        "reward_model": np.array([{"ground_truth": "139"}, {"ground_truth": "7"}], dtype=object),
    }
    template = "{prompt} The answer is {context}."
    ids = teacher_prompt_ids(non_tensor, tokenizer, "reward_model.ground_truth", template)
    assert ids.dtype == object and len(ids) == 2
    for b, expected in enumerate(
        ("What is 82 plus 57? The answer is 139.", "What is 3 plus 4? The answer is 7.")
    ):
        plain = tokenizer.apply_chat_template(raw[b], add_generation_prompt=True, tokenize=True)
        with_context = tokenizer.apply_chat_template(
            [{"role": "user", "content": expected}], add_generation_prompt=True, tokenize=True
        )
        assert ids[b] == with_context and len(ids[b]) > len(plain)
    non_tensor["reward_model"][1] = {"ground_truth": ""}
    with pytest.raises(MissingContextError, match="rollout row 1 has no value"):
        teacher_prompt_ids(non_tensor, tokenizer, "reward_model.ground_truth", template)
    with pytest.raises(MissingContextError, match="no column 'extra'"):
        teacher_prompt_ids(non_tensor, tokenizer, "extra.solution", template)


def test_teacher_rows_keep_the_students_response_ids_and_masks():
    rows = [
        ([5, 6], [7, 8, 9], [1, 1, 1]),
        ([11, 12, 13, 14], [15, 16, 17, 18], [1, 0, 0, 1]),
        ([3], [4], [1]),
    ]
    teacher_prompts = [[5, 6, 50, 51, 52], [11, 12, 13, 14, 60], [3, 70, 71]]
    batch = rollout_batch(rows, weights=[1.0, 1.0, 0.0])  # the third row has weight 0: dropped for both
    batch.non_tensor_batch[TEACHER_PROMPTS] = np.array(teacher_prompts, dtype=object)
    opd = build_opd_batch(batch, pad_token_id=0)
    teacher = opd.teacher_rows
    assert opd.kept_rows == teacher.kept_rows == [0, 1]
    for i in range(2):
        student_len, teacher_len = (
            int(opd.attention_mask_B_L[i].sum()),
            int(teacher.attention_mask_B_L[i].sum()),
        )
        student_ids, teacher_ids = opd.input_ids_B_L[i, :student_len], teacher.input_ids_B_L[i, :teacher_len]
        assert teacher_ids[: len(teacher_prompts[i])].tolist() == teacher_prompts[i]
        response = rows[i][1]
        assert teacher_ids[-len(response) :].tolist() == student_ids[-len(response) :].tolist() == response
        # the same targets, in the same order: the response's model tokens
        assert teacher_ids[teacher.target_mask_B_L[i, :teacher_len]].tolist() == (
            student_ids[opd.target_mask_B_L[i, :student_len]].tolist()
        )
        assert teacher.target_mask_B_L[i, :teacher_len].tolist()[-len(response) :] == list(
            map(bool, rows[i][2])
        )
    assert opd.stats["opd/teacher_prompt_extra_tokens"] == 3 + 1
    assert opd.stats["opd/rows_skipped_zero_weight"] == 1 and opd.stats["opd/teacher_tokens_saved"] == 2


# --- through the step: rows of weight 0 skipped, the teacher on its own rows -----------------------------


def load(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def counting(model) -> list:
    """The token ids of every forward ``model`` runs (a forward pre-hook)."""
    seen = []
    model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["input_ids"][0].tolist()), with_kwargs=True
    )
    return seen


def tiny_rows(n: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        p, r = 3 + i % 3, 4 + i % 4
        ids = torch.randint(7, VOCAB, (p + r,), generator=gen).tolist()
        out.append((ids[:p], ids[p:], [1] * r))
    return out


def step_gradient(student, teacher, opd, config, batch_rows: int) -> tuple[torch.Tensor, dict]:
    """The step's gradient (one mini-batch of the whole rollout batch, micro-batches of two rows)."""
    student.zero_grad()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    grads = []

    def clip_and_step():
        grads.append(torch.cat([p.grad.flatten() for p in student.parameters()]))
        return 0.0

    settings = StepSettings(rows_per_mini_batch=batch_rows, max_rows=2, grad_clip=1e9)
    metrics = run_step(
        student, teacher, optimizer, opd, config, settings, batch_rows=batch_rows, clip_and_step=clip_and_step
    )
    return grads[0], metrics


def test_rows_of_weight_zero_never_reach_the_teacher_and_the_loss_is_over_the_rest(tiny_assets):
    rows = tiny_rows(6)
    uids = ["a", "a", "b", "b", "c", "c"]
    scores = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])  # b is always solved: weight 0
    weights_B = pass_rate_weights(scores, uids)
    config = OPDConfig(teacher_signal="hidden", vocab_size=VOCAB)
    teacher = load(tiny_assets / "teacher")
    forwards = counting(teacher)
    opd = build_opd_batch(rollout_batch(rows, weights=weights_B.tolist()), pad_token_id=0)
    assert opd.kept_rows == [0, 1, 4, 5]
    grad, metrics = step_gradient(load(tiny_assets / "student"), teacher, opd, config, 6)
    seen = [token for forward in forwards for token in forward]
    assert len(seen) == sum(len(rows[i][0]) + len(rows[i][1]) for i in (0, 1, 4, 5))  # never rows 2 and 3
    assert metrics["opd/teacher_tokens_saved"] == sum(len(rows[i][0]) + len(rows[i][1]) for i in (2, 3))

    kept_only = build_opd_batch(rollout_batch([rows[i] for i in (0, 1, 4, 5)]), pad_token_id=0)
    reference, _ = step_gradient(
        load(tiny_assets / "student"), load(tiny_assets / "teacher"), kept_only, config, 4
    )
    assert float((grad - reference).norm() / reference.norm()) < 1e-5  # equal weights: the unweighted loss


@pytest.mark.parametrize("loss_agg_mode", ["token-mean", "seq-mean-token-mean"])
def test_normalise_none_scales_the_loss_by_the_raw_weights_over_every_rollout(tiny_assets, loss_agg_mode):
    """``none``: the plain mean of w x d over every rollout row, so a row dropped for weight 0 still counts
    in the normaliser (with zeros); ``mean``: the weighted mean over the kept rows."""
    rows = tiny_rows(6)
    uids = ["a", "a", "a", "a", "b", "b"]  # a: p = 1/4, w = 3/16; b: always solved, dropped
    scores = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    grads = {}
    for normalise in ("mean", "none"):
        weights_B = pass_rate_weights(scores, uids, normalise=normalise)
        config = OPDConfig.from_mapping(
            {
                "teacher_signal": "hidden",
                "vocab_size": VOCAB,
                "loss_agg_mode": loss_agg_mode,
                "sample_weighting": {"normalise": normalise},
            }
        )
        opd = build_opd_batch(rollout_batch(rows, weights=weights_B.tolist()), pad_token_id=0)
        assert opd.kept_rows == [0, 1, 2, 3]
        student, teacher = load(tiny_assets / "student"), load(tiny_assets / "teacher")
        grads[normalise], _ = step_gradient(student, teacher, opd, config, 6)
    if loss_agg_mode == "token-mean":  # mean: sum d / (kept tokens); none: 3/16 sum d / (every row's tokens)
        kept, every = sum(len(rows[i][1]) for i in range(4)), sum(len(r[1]) for r in rows)
        factor = 3 / 16 * kept / every
    else:  # per row: mean: sum mean_i / 4 rows; none: 3/16 sum mean_i / 6 rows
        factor = 3 / 16 * 4 / 6
    torch.testing.assert_close(grads["none"], grads["mean"] * factor, rtol=1e-4, atol=1e-9)


def test_the_teacher_scores_the_response_after_its_own_prompt(tiny_assets):
    """Self-distillation's teacher: the signal of the step's teacher phase equals a teacher forward of its
    own rows (prompt with context + the student's response), not of the student's rows."""
    from opd.distill.packing import pack_rows
    from opd.distill.step import plan_passes, teacher_phase

    rows = tiny_rows(3)
    teacher_prompts = [p + [90 + i, 91, 92] for i, (p, _, _) in enumerate(rows)]
    batch = rollout_batch(rows)
    batch.non_tensor_batch[TEACHER_PROMPTS] = np.array(teacher_prompts, dtype=object)
    opd = build_opd_batch(batch, pad_token_id=0)
    config = OPDConfig(teacher_signal="logits", vocab_size=VOCAB)
    settings = StepSettings(rows_per_mini_batch=3, max_rows=2)
    plan = plan_passes(opd, 3, settings, config)
    teacher = load(tiny_assets / "teacher")
    out = teacher_phase(teacher, plan, config, "cpu", opd.teacher_rows)
    plain = teacher_phase(teacher, plan, config, "cpu")
    for mb, signal, plain_signal in zip(plan.minis[0], out.signals[0], plain.signals[0], strict=True):
        own = pack_rows(opd.teacher_rows, mb.rows_R.tolist())
        with torch.no_grad():
            logits_N_V = teacher(**own.model_inputs("cpu")).logits[0]
        torch.testing.assert_close(signal.logits_N_V.float(), logits_N_V.to(torch.bfloat16).float())
        assert not torch.allclose(signal.logits_N_V.float(), plain_signal.logits_N_V.float())


# --- the plot of a run -------------------------------------------------------------------------------------


def test_paced_plot_draws_pass_rates_and_divergence_by_stage_from_metrics(tmp_path, capsys):
    import json
    import subprocess
    import sys

    from opd.paced import main, pass_rate_series

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with open(run_dir / "metrics.jsonl", "w") as f:
        f.write(json.dumps({"step": 0, "data": {"val-core/x": 0.2}}) + "\n")  # validation only: skipped
        for step in (1, 2, 3, 4):
            shares = {"0": 0.5, "0-25": 0.1, "25-50": 0.1, "50-75": 0.1, "75-100": 0.1, "1": 0.1}
            data = {f"paced/pass_rate/{k}": v for k, v in shares.items()}
            loss_type = "forward_kl" if step <= 2 else "reverse_kl"
            data |= {"paced/kept_prompt_fraction": 0.4, "opd/teacher_tokens_saved": 900.0 + step}
            data |= {"opd/divergence": 1.0 / step, f"opd/divergence/{loss_type}": 1.0 / step}
            f.write(json.dumps({"step": step, "data": data}) + "\n")
    series = pass_rate_series(run_dir)
    assert [s["step"] for s in series] == [1, 2, 3, 4]
    assert [s["loss_type"] for s in series] == ["forward_kl"] * 2 + ["reverse_kl"] * 2
    assert main(["plot", str(run_dir)]) == 0
    assert (run_dir / "pass_rates.png").stat().st_size > 10_000
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["plot", str(empty)]) == 2 and "metrics.jsonl does not exist" in capsys.readouterr().err
    (empty / "metrics.jsonl").write_text(json.dumps({"step": 1, "data": {"opd/divergence": 0.1}}) + "\n")
    assert main(["plot", str(empty)]) == 2 and "method=paced" in capsys.readouterr().err
    code = "import sys, opd.paced; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
