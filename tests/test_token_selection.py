"""Token selection (``opd.token_selection``, ``opd.distill.selection``): each rule on hand-built entropy and
divergence vectors, the kept set's edge cases, the quadrant diagnostics, the typed config's refusals, and
the step's gradient with selection against plain autograd over full logits with the dropped tokens'
weights set to zero; the gradient pass visits kept tokens only."""

from __future__ import annotations

import math

import pytest
import torch

import opd.distill.head as head_module
from opd.distill.batch import build_opd_batch
from opd.distill.config import OPDConfig, OPDConfigError, TokenSelection
from opd.distill.losses import token_divergence
from opd.distill.selection import (
    clipped_entropy,
    keep_mask,
    kept_count,
    quadrant_metrics,
    quadrant_sums,
    rule_scores,
    select,
)
from opd.distill.step import StepSettings, run_step
from opd.distill.teacher_signal import TeacherSignal
from test_opd_batch import rollout_batch
from test_opd_step import TINY_VOCAB, gradient, relative_error, rows, weights

# --- rules on hand-built vectors ---------------------------------------------------------------------------


def test_entropy_and_divergence_rules_keep_the_highest_values():
    h = torch.tensor([0.1, 0.9, 0.5, 0.3])
    d = torch.tensor([2.0, 0.1, 0.4, 3.0])
    assert keep_mask(rule_scores("entropy", h, d), 0.5).tolist() == [False, True, True, False]
    assert keep_mask(rule_scores("divergence", h, d), 0.5).tolist() == [True, False, False, True]
    assert keep_mask(rule_scores("all", h, d), 1.0).all()


def test_soft_or_clips_the_entropy_then_combines_min_max_scores():
    h = torch.tensor([0.0, 0.2, 0.4, 1.0])
    d = torch.tensor([1.0, 0.0, 0.5, 0.0])
    # with the clip at the maximum (quantile 1) h' = h and d' = d: s = 1 - (1 - h)(1 - d)
    s = rule_scores("soft_or", h, d, clip_quantile=1.0)
    assert torch.allclose(s, torch.tensor([1.0, 0.2, 0.7, 1.0]))
    # the 0.5 quantile of h is 0.3: h clipped to [0, 0.3], then min-max: [0, 2/3, 1, 1]
    assert torch.allclose(
        clipped_entropy(h, torch.ones(4, dtype=torch.bool), 0.5), torch.tensor([0, 2 / 3, 1, 1])
    )
    s = rule_scores("soft_or", h, d, clip_quantile=0.5)
    assert torch.allclose(s, torch.tensor([1.0, 2 / 3, 1.0, 1.0]))


def test_q3_ranks_confident_and_wrong_tokens_by_forward_kl_times_low_entropy():
    h = torch.tensor([0.05, 0.9, 0.1, 0.02])  # token 1 is unsure; 0, 2, 3 confident
    d = torch.zeros(4)  # the configured loss's divergence does not rank q3
    fkl = torch.tensor([2.0, 5.0, 0.1, 1.5])
    kept = keep_mask(rule_scores("q3", h, d, fkl, clip_quantile=1.0), 0.5)
    assert kept.tolist() == [True, False, False, True]  # high forward KL and low entropy
    with pytest.raises(ValueError, match="forward KL"):
        rule_scores("q3", h, d)


def test_random_rule_is_reproducible_per_generator_and_differs_across_seeds():
    h = d = torch.zeros(1000)

    def draw(seed):
        return keep_mask(rule_scores("random", h, d, generator=torch.Generator().manual_seed(seed)), 0.3)

    assert torch.equal(draw(1), draw(1))
    assert not torch.equal(draw(1), draw(2))
    assert int(draw(1).sum()) == 300


def test_ties_and_all_equal_values_keep_the_earlier_tokens():
    assert keep_mask(torch.tensor([1.0, 2.0, 2.0, 2.0, 0.5]), 0.4).tolist() == [
        False,
        True,
        True,
        False,
        False,
    ]
    assert keep_mask(torch.full((6,), 0.3), 0.5).tolist() == [True, True, True, False, False, False]
    # min-max of all-equal values carries no information: soft_or then ranks by the other axis
    s = rule_scores("soft_or", torch.full((3,), 0.2), torch.tensor([0.1, 0.3, 0.2]), clip_quantile=1.0)
    assert keep_mask(s, 1 / 3).tolist() == [False, True, False]


@pytest.mark.parametrize(
    ("n", "ratio", "expected"),
    [(10, 0.3, 3), (10, 1.0, 10), (10, 0.05, 1), (1, 0.5, 1), (3, 0.5, 1), (7, 0.5, 3), (0, 0.5, 0)],
)
def test_kept_count_is_floor_of_ratio_times_length_with_at_least_one(n, ratio, expected):
    assert int(kept_count(torch.tensor([n]), ratio)[0]) == expected


def test_masked_and_tool_tokens_are_never_selected_and_do_not_count():
    score = torch.tensor([9.0, 8.0, 1.0, 2.0, 3.0, 7.0])
    valid = torch.tensor([False, False, True, True, True, False])  # e.g. tool output and padding
    kept = keep_mask(score, 0.34, valid_N=valid)  # floor(0.34 x 3 valid) = 1
    assert kept.tolist() == [False, False, False, False, True, False]
    assert not keep_mask(score, 1.0, valid_N=valid)[~valid].any()
    assert not keep_mask(score, 1.0, valid_N=torch.zeros(6, dtype=torch.bool)).any()


def test_per_rollout_scope_keeps_at_least_one_token_of_every_rollout():
    score = torch.tensor([0.9, 0.8, 0.7, 0.6, 0.1, 0.2, 0.05])
    group = torch.tensor([4, 4, 4, 4, 9, 9, 2])  # rows 4 (4 tokens), 9 (2), 2 (1); ids need not be ordered
    kept = keep_mask(score, 0.25, group_N=group)
    assert kept.tolist() == [True, False, False, False, False, True, True]
    # per mini-batch, the same ratio keeps the best tokens whoever owns them
    assert keep_mask(score, 0.3, group_N=None).tolist() == [True, True, False, False, False, False, False]


def test_quadrant_shares_sum_to_one_and_follow_the_thresholds():
    h = torch.tensor([0.9, 0.8, 0.1, 0.2, 0.05])
    d = torch.tensor([2.0, 0.1, 3.0, 0.2, 0.1])
    kept = torch.tensor([True, False, True, False, False])
    sums = quadrant_sums(h, d, kept, entropy_threshold=0.5, divergence_threshold=1.0)
    metrics = quadrant_metrics(sums)
    shares = [metrics[f"opd/tokens/{q}_share"] for q in ("q1", "q2", "q3", "q4")]
    assert shares == pytest.approx([0.2, 0.2, 0.2, 0.4])
    assert sum(shares) == pytest.approx(1.0)
    assert metrics["opd/selected_token_fraction"] == pytest.approx(0.4)
    assert metrics["opd/tokens/kept_divergence"] == pytest.approx(2.5)
    assert metrics["opd/tokens/dropped_entropy"] == pytest.approx((0.8 + 0.2 + 0.05) / 3)
    # default thresholds: the medians (h 0.2, d 0.2): high means strictly above
    medians = quadrant_metrics(quadrant_sums(h, d, kept))
    assert medians["opd/tokens/q3_share"] == pytest.approx(0.2)  # token 2: h 0.1 <= 0.2, d 3.0 > 0.2
    assert sum(medians[f"opd/tokens/{q}_share"] for q in ("q1", "q2", "q3", "q4")) == pytest.approx(1.0)


# --- config ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"rule": "top"}, "opd.token_selection.rule=top: choose one of"),
        ({"rule": "entropy", "ratio": 0.0}, "ratio=0.0 must lie in (0, 1]"),
        ({"rule": "entropy", "ratio": 1.5}, "ratio=1.5 must lie in (0, 1]"),
        ({"ratio": 0.5}, "with rule=all (which keeps every token)"),
        ({"rule": "entropy", "scope": "batch"}, "choose one of ['mini_batch', 'rollout']"),
        ({"rule": "entropy", "ratio": 0.5, "keep": 1}, "unknown opd.token_selection key(s) ['keep']"),
        ({"entropy_threshold": 2.0}, "normalised entropy H / log V lies in [0, 1]"),
    ],
)
def test_bad_selection_settings_are_refused_with_the_fix(values, message):
    with pytest.raises(OPDConfigError) as error:
        OPDConfig.from_mapping({"token_selection": values})
    assert message in str(error.value)


@pytest.mark.parametrize("rule", ["divergence", "soft_or", "q3"])
def test_rules_needing_a_divergence_are_refused_with_the_sampled_signal(rule):
    with pytest.raises(OPDConfigError, match="use teacher_signal=hidden"):
        OPDConfig(teacher_signal="sampled", token_selection=TokenSelection(rule=rule, ratio=0.5))
    OPDConfig(teacher_signal="sampled", token_selection=TokenSelection(rule="entropy", ratio=0.5))  # fine


# --- the step with selection -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_models(tiny_assets):
    from transformers import AutoModelForCausalLM

    def load(name):
        return AutoModelForCausalLM.from_pretrained(tiny_assets / name, dtype=torch.float32)

    return load("student"), load("teacher")


def reference_gradient(student, teacher, opd, config: OPDConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain autograd over each row's full logits: per-token divergence, the kept set chosen from these
    values by ``select`` (per row or over all rows), the loss with the dropped tokens' weights at 0."""
    sel, kind = config.token_selection, config.loss_type
    w_B = opd.sample_weight_B.float()
    divs, ents, fkls, owners = [], [], [], []
    student.zero_grad()
    for b in range(len(opd)):
        length = int(opd.attention_mask_B_L[b].sum())
        ids = opd.input_ids_B_L[b, :length][None]
        target = opd.target_mask_B_L[b, 1:length].bool()  # token t predicted at t - 1
        s_logits = student(input_ids=ids).logits[0, :-1][target]
        with torch.no_grad():  # as the hidden signal sends them: final hidden states in bf16, then the head
            hidden = teacher(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, :-1][target]
            t_logits = torch.nn.functional.linear(hidden.bfloat16().float(), teacher.lm_head.weight)
        signal = TeacherSignal("logits", logits_N_V=t_logits)
        d, e = token_divergence(s_logits, signal, kind, vocab_size=TINY_VOCAB)
        fkl, _ = token_divergence(s_logits.detach(), signal, "forward_kl", vocab_size=TINY_VOCAB)
        divs.append(d)
        ents.append(e)
        fkls.append(fkl)
        owners.append(torch.full((len(d),), b))
    d_N, row_N = torch.cat(divs), torch.cat(owners)
    group = row_N if sel.scope == "rollout" else None
    kept_N = select(sel, torch.cat(ents), d_N.detach(), torch.cat(fkls), TINY_VOCAB, group_N=group).float()
    w_N = w_B[row_N]
    if config.loss_agg_mode == "token-mean":
        denominator = (w_N * kept_N).sum() if sel.normalise == "kept" else w_N.sum()
        loss = (w_N * kept_N * d_N).sum() / denominator
    else:
        n_B = torch.bincount(row_N, weights=kept_N if sel.normalise == "kept" else None, minlength=len(opd))
        per_row = torch.zeros(len(opd)).index_add(0, row_N, kept_N * d_N) / n_B.clamp(min=1)
        loss = (w_B * per_row).sum() / (w_B[n_B > 0].sum() if sel.normalise == "kept" else w_B.sum())
    loss.backward()
    return gradient(student), kept_N


CASES = [
    (rule, scope, "kept", "token-mean", 1024)
    for rule in ("entropy", "divergence", "soft_or", "q3")
    for scope in ("rollout", "mini_batch")
]
CASES += [
    ("soft_or", "rollout", "all", "token-mean", 1024),
    ("entropy", "rollout", "kept", "seq-mean-token-mean", 1024),
    ("q3", "mini_batch", "kept", "seq-mean-token-mean", 1024),
    ("divergence", "mini_batch", "all", "seq-mean-token-mean", 1024),
    # rows longer than a chunk: per rollout, a scoring pass then a gradient pass (not one fused pass)
    ("soft_or", "rollout", "kept", "token-mean", 4),
    ("q3", "rollout", "kept", "seq-mean-token-mean", 4),
]


@pytest.mark.parametrize(("rule", "scope", "normalise", "agg", "chunk_size"), CASES)
def test_selected_token_gradient_equals_the_full_loss_with_dropped_weights_zero(
    tiny_models, rule, scope, normalise, agg, chunk_size
):
    student, teacher = tiny_models
    opd = build_opd_batch(rollout_batch(rows(TINY_VOCAB), weights=weights(7)), pad_token_id=0)
    config = OPDConfig(
        teacher_signal="hidden",
        vocab_size=TINY_VOCAB,
        loss_agg_mode=agg,
        chunk_size=chunk_size,
        token_selection=TokenSelection(rule=rule, ratio=0.5, scope=scope, normalise=normalise),
    )
    reference, kept_N = reference_gradient(student, teacher, opd, config)
    student.zero_grad()
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    settings = StepSettings(rows_per_mini_batch=7, max_rows=3, grad_clip=1e9)  # 3 micro-batches
    metrics = run_step(student, teacher, optimizer, opd, config, settings)
    assert relative_error(gradient(student), reference) <= 1e-4
    n_tokens = int(opd.target_mask_B_L.sum())
    assert metrics["opd/selected_token_fraction"] == pytest.approx(float(kept_N.sum()) / n_tokens)
    if scope == "mini_batch":
        assert float(kept_N.sum()) == math.floor(0.5 * n_tokens)
    if rule == "entropy":  # scored without the teacher: no divergence of dropped tokens, so no quadrants
        assert "opd/tokens/q1_share" not in metrics and "opd/tokens/dropped_divergence" not in metrics
        assert metrics["opd/tokens/kept_entropy"] > metrics["opd/tokens/dropped_entropy"]
    else:
        shares = [metrics[f"opd/tokens/{q}_share"] for q in ("q1", "q2", "q3", "q4")]
        assert sum(shares) == pytest.approx(1.0)


@pytest.mark.parametrize("rule", ["soft_or", "entropy", "random"])
@pytest.mark.parametrize("scope", ["rollout", "mini_batch"])
def test_the_gradient_pass_visits_the_kept_tokens_only(tiny_models, monkeypatch, scope, rule):
    """The saving: only kept tokens reach the gradient matmuls of the output head. Per rollout, a rule
    ranking by the divergence scores and updates each chunk of whole rows in one pass (no recomputation);
    entropy and random rules never compute the teacher's side for dropped tokens."""
    student, teacher = tiny_models
    opd = build_opd_batch(rollout_batch(rows(TINY_VOCAB), weights=weights(7)), pad_token_id=0)
    visited = {"grad": 0, "scored": 0, "fused": 0}
    chunk, matmuls, fused = head_module._chunk, head_module._gradient_matmuls, head_module._fused_select

    def rows_of(hidden_N_H, idx):
        return len(range(hidden_N_H.shape[0])[idx]) if isinstance(idx, slice) else len(idx)

    def counting_chunk(spec, hidden_N_H, head_V_H, bias_V, idx, div_N, entropy_N, grad_into, fkl_N=None):
        if grad_into is None:
            visited["scored"] += rows_of(hidden_N_H, idx)
        return chunk(spec, hidden_N_H, head_V_H, bias_V, idx, div_N, entropy_N, grad_into, fkl_N)

    def counting_matmuls(spec, grad_k_V, hidden_k_H, head_V_H, idx, grads):
        visited["grad"] += hidden_k_H.shape[0]
        return matmuls(spec, grad_k_V, hidden_k_H, head_V_H, idx, grads)

    def counting_fused(spec, hidden_N_H, *args):
        visited["fused"] += rows_of(hidden_N_H, args[2])
        return fused(spec, hidden_N_H, *args)

    monkeypatch.setattr(head_module, "_chunk", counting_chunk)
    monkeypatch.setattr(head_module, "_gradient_matmuls", counting_matmuls)
    monkeypatch.setattr(head_module, "_fused_select", counting_fused)
    config = OPDConfig(
        teacher_signal="hidden",
        vocab_size=TINY_VOCAB,
        token_selection=TokenSelection(rule=rule, ratio=0.2, scope=scope),
    )
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    settings = StepSettings(rows_per_mini_batch=7, max_rows=3, grad_clip=1e9)
    metrics = run_step(student, teacher, optimizer, opd, config, settings)
    n_tokens = int(opd.target_mask_B_L.sum())
    kept = round(metrics["opd/selected_token_fraction"] * n_tokens)
    divergence_ranked = rule == "soft_or"
    assert visited == {
        "grad": kept,
        "scored": n_tokens if divergence_ranked and scope == "mini_batch" else 0,  # the scoring forward
        "fused": n_tokens if divergence_ranked and scope == "rollout" else 0,
    }
    assert kept < 0.3 * n_tokens + 7  # at most one extra per rollout over floor(0.2 x len)


def test_entropy_only_scoring_matches_the_full_pass_without_the_teacher():
    from opd.distill.head import head_divergence

    gen = torch.Generator().manual_seed(0)
    hidden, weight = torch.randn(40, 16, generator=gen), torch.randn(50, 16, generator=gen)
    teacher = TeacherSignal("logits", logits_N_V=torch.randn(40, 50, generator=gen))
    with torch.no_grad():
        full = head_divergence(hidden, weight, None, teacher, "reverse_kl", chunk_size=7)
        entropy_only = head_divergence(
            hidden, weight, None, teacher, "reverse_kl", chunk_size=7, score="entropy"
        )
    assert torch.allclose(entropy_only.entropy_N, full.entropy_N, atol=1e-5)
    assert not entropy_only.div_N.any()  # the teacher's side was not computed
