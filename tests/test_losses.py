"""token_divergence / reduce_divergence against fp64 autograd references, the seed's pattern and gradcheck."""

from __future__ import annotations

import math

import pytest
import torch

import opd.distill
from opd.bench.loss import exact_divergence, make_inputs, seed_style_divergence
from opd.distill import (
    DIVERGENCES,
    TeacherSignal,
    aligned_vocab_size,
    losses,
    reduce_divergence,
    token_divergence,
)

V_FULL = 151_936  # Qwen2.5
LOSS_TOL, GRAD_TOL = 1e-4, 1e-3
FP32_NOISE = 1e-6  # errors below this are fp32 rounding, where "not worse than the seed" is not meaningful


def _rel_errors(loss, grad, loss64, grad64) -> tuple[float, float]:
    """|loss - loss64| / |loss64| and max|grad - grad64| / max|grad64| (in row blocks: no N x V temporaries)."""
    loss_err = abs(float(loss) - float(loss64)) / abs(float(loss64))
    diff = max(
        (float((g - g64).abs().max()) for g, g64 in zip(grad.split(32), grad64.split(32), strict=True)),
        default=0.0,
    )
    return loss_err, diff / float(grad64.abs().max())


def _assert_accurate(errors, seed_errors=None) -> None:
    """Within tolerance of fp64, and (given the seed's errors) not worse than the seed's pattern; a
    non-finite seed result (e.g. NaN from -inf logits) counts as infinitely wrong."""
    loss_err, grad_err = errors
    assert loss_err <= LOSS_TOL and grad_err <= GRAD_TOL, errors
    if seed_errors is not None:
        for ours, seed in zip(errors, seed_errors, strict=True):
            assert ours <= max(seed if math.isfinite(seed) else math.inf, FP32_NOISE), (errors, seed_errors)


def _seed(student, teacher, kind, weight64, **kwargs):
    """The seed's pattern on the same inputs: loss sum(w * div) with normalised weights, and its gradient."""
    z = student.clone().requires_grad_()
    loss = (seed_style_divergence(z, teacher, kind, chunk_size=32, **kwargs) * weight64.float()).sum()
    loss.backward()  # (the seed's math is per row: its chunk size does not change the numbers)
    return loss.detach(), z.grad


def _ours(student, signal, kind, mask=None, weight=None, **kwargs):
    z = student.detach().clone().requires_grad_()
    div, entropy = token_divergence(z, signal, kind, mask_N=mask, **kwargs)
    loss = reduce_divergence(div, mask, weight)
    loss.backward()
    return loss.detach(), z.grad, div.detach(), entropy


def _normalized_weights(n, mask=None, weight=None) -> torch.Tensor:
    w = torch.ones(n, dtype=torch.float64)
    for t in (mask, weight):
        if t is not None:
            w = w * t.double()
    return w / w.sum()


@pytest.fixture(scope="module")
def full_vocab_inputs():
    return make_inputs(128, V_FULL, seed=1)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_full_vocab_matches_fp64_and_is_not_worse_than_the_seed(full_vocab_inputs, kind):
    student, teacher = full_vocab_inputs
    w64 = _normalized_weights(len(student))
    loss, grad, _, entropy = _ours(student, TeacherSignal.from_logits(teacher, dtype=torch.float32), kind)
    div64, grad64 = exact_divergence(student, teacher, kind, weight_N=w64)
    seed = _rel_errors(*_seed(student, teacher, kind, w64), div64.mean(), grad64)
    _assert_accurate(_rel_errors(loss, grad, div64.mean(), grad64), seed)
    s64 = torch.log_softmax(student[:8].double(), -1)
    torch.testing.assert_close(entropy[:8].double(), -(s64.exp() * s64).sum(-1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_masks_and_per_token_weights(kind):
    student, teacher = make_inputs(48, V_FULL, seed=2)
    gen = torch.Generator().manual_seed(3)
    mask = torch.rand(48, generator=gen) < 0.7
    mask[:10] = False  # a fully masked run, then isolated masked tokens
    weight = torch.rand(48, generator=gen) * 3
    finite_student = student.clone()
    student[~mask] = float("nan")  # masked rows are never read into the loss
    signal = TeacherSignal.from_logits(teacher, dtype=torch.float32)
    loss, grad, div, entropy = _ours(student, signal, kind, mask, weight, beta=0.3)
    w64 = _normalized_weights(48, mask, weight)
    div64, grad64 = exact_divergence(finite_student, teacher, kind, beta=0.3, weight_N=w64)
    loss64 = (w64 * div64).sum()
    seed = _rel_errors(*_seed(finite_student, teacher, kind, w64, beta=0.3), loss64, grad64)
    _assert_accurate(_rel_errors(loss, grad, loss64, grad64), seed)
    assert (div[~mask] == 0).all() and (entropy[~mask] == 0).all() and (grad[~mask] == 0).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_neg_inf_logits_follow_zero_log_zero(kind):
    student, teacher = make_inputs(24, 4096, seed=4)
    student[:, :100] = teacher[:, :100] = float("-inf")  # e.g. vocabulary masked in both models
    if kind != "forward_kl":
        student[:, 100:200] = float("-inf")  # student has no mass there: reverse KL and JSD stay finite
    if kind != "reverse_kl":
        teacher[:, 200:300] = float("-inf")  # teacher has no mass there: forward KL and JSD stay finite
    loss, grad, div, entropy = _ours(student, TeacherSignal.from_logits(teacher, dtype=torch.float32), kind)
    assert torch.isfinite(div).all() and torch.isfinite(entropy).all() and torch.isfinite(grad).all()
    w64 = _normalized_weights(24)
    div64, grad64 = exact_divergence(student, teacher, kind, weight_N=w64)
    seed = _rel_errors(*_seed(student, teacher, kind, w64), div64.mean(), grad64)  # NaN there: 0 * log 0
    _assert_accurate(_rel_errors(loss, grad, div64.mean(), grad64), seed)
    assert (grad[:, :100] == 0).all()


def test_reverse_kl_is_inf_where_the_teacher_has_no_mass_and_the_student_has():
    student, teacher = make_inputs(4, 64, seed=5)
    teacher[:, 7] = float("-inf")
    div, _ = token_divergence(student, TeacherSignal.from_logits(teacher, dtype=torch.float32), "reverse_kl")
    assert torch.isposinf(div).all()


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_vocab_width_mismatch_compares_the_tokenizer_columns(kind):
    vocab, student_width, teacher_width = 3000, 3008, 3072  # padded heads, as Qwen's 151,936 vs 152,064
    student, teacher = make_inputs(16, teacher_width, seed=6)
    student = student[:, :student_width].contiguous()
    student[:, vocab:] = 50.0  # padding columns the tokenizer never produces must not matter
    signal = TeacherSignal.from_logits(teacher, dtype=torch.float32)
    with pytest.raises(ValueError, match="aligned_vocab_size"):
        token_divergence(student, signal, kind)
    size = aligned_vocab_size(student_width, teacher_width, vocab)
    loss, grad, _, _ = _ours(student, signal, kind, vocab_size=size)
    w64 = _normalized_weights(16)
    div64, grad64 = exact_divergence(student, teacher, kind, weight_N=w64, vocab_size=size)
    seed = _rel_errors(*_seed(student, teacher, kind, w64, vocab_size=size), div64.mean(), grad64)
    _assert_accurate(_rel_errors(loss, grad, div64.mean(), grad64), seed)
    assert grad.shape == student.shape and (grad[:, vocab:] == 0).all()


def test_aligned_vocab_size_rejects_a_tokenizer_larger_than_a_head():
    assert aligned_vocab_size(151_936, 152_064, 151_665) == 151_665
    with pytest.raises(ValueError, match="student output head only 151936"):
        aligned_vocab_size(151_936, 152_064, 152_000)


@pytest.mark.parametrize("mode", ["logits", "hidden", "topk", "sampled"])
def test_teacher_equal_to_student_gives_zero_loss_and_gradient(mode):
    student, _ = make_inputs(16, V_FULL, seed=7)
    ids = torch.randint(0, V_FULL, (16,), generator=torch.Generator().manual_seed(0))
    if mode == "hidden":  # the student's logits written as hidden @ head.T
        hidden = torch.eye(16)
        head = student.T.contiguous()[:, :16].clone()
        student = (hidden @ head.T).contiguous()
        signal = TeacherSignal.from_hidden(hidden, head, dtype=torch.float32)
    else:
        signal = TeacherSignal.from_logits(student, mode, k=64, sampled_ids_N=ids, dtype=torch.float32)
    for kind in DIVERGENCES if mode != "sampled" else ("reverse_kl",):
        _, grad, div, _ = _ours(student, signal, kind)
        assert div.abs().max() < 1e-5 and grad.abs().max() < 1e-6, (kind, div.abs().max(), grad.abs().max())


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_hidden_mode_equals_logits_mode(kind):
    gen = torch.Generator().manual_seed(8)
    hidden, head, bias = (
        torch.randn(32, 64, generator=gen),
        torch.randn(V_FULL, 64, generator=gen) / 4,
        torch.randn(V_FULL),
    )
    teacher_logits = hidden @ head.T + bias
    student = teacher_logits + torch.randn(32, V_FULL, generator=gen)
    from_hidden = TeacherSignal.from_hidden(hidden, head, bias, dtype=torch.float32)
    loss_h, grad_h, _, _ = _ours(student, from_hidden, kind, chunk_size=16)
    loss_l, grad_l, _, _ = _ours(
        student, TeacherSignal.from_logits(teacher_logits, dtype=torch.float32), kind
    )
    loss_err, grad_err = _rel_errors(loss_h, grad_h, loss_l.double(), grad_l.double())
    assert loss_err <= LOSS_TOL and grad_err <= GRAD_TOL, (loss_err, grad_err)


def _bucket_reference(student, signal, kind, beta=0.5):
    """The K+1-bucket divergence written out directly in fp64 (its gradient by autograd)."""
    z = student.detach().double().requires_grad_()
    s = torch.log_softmax(z, -1)
    ids = signal.topk_ids_N_K.long()
    S_tail = s.scatter(1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    S = torch.cat([s.gather(1, ids), S_tail], 1)
    T = torch.cat([signal.topk_logp_N_K, signal.tail_logmass_N[:, None]], 1).double()
    P, Q = S.exp(), T.exp()
    if kind == "reverse_kl":
        div = (P * (S - T)).sum(-1)
    elif kind == "forward_kl":
        div = (Q * (T - S)).sum(-1)
    else:
        log_m = (beta * Q + (1 - beta) * P).log()
        div = beta * (Q * (T - log_m)).sum(-1) + (1 - beta) * (P * (S - log_m)).sum(-1)
    div.mean().backward()
    return div.detach().mean(), z.grad


@pytest.mark.parametrize("kind", DIVERGENCES)
def test_topk_matches_the_bucketed_formula(kind):
    student, teacher = make_inputs(64, V_FULL, seed=9)
    signal = TeacherSignal.from_logits(teacher, "topk", k=64)
    loss, grad, _, _ = _ours(student, signal, kind)
    loss64, grad64 = _bucket_reference(student, signal, kind)
    loss_err, grad_err = _rel_errors(loss, grad, loss64, grad64)
    assert loss_err <= LOSS_TOL and grad_err <= GRAD_TOL, (loss_err, grad_err)


def test_sampled_is_the_k1_estimate_with_the_reinforce_gradient():
    student, teacher = make_inputs(64, V_FULL, seed=10)
    ids = torch.distributions.Categorical(logits=student).sample()
    signal = TeacherSignal.from_logits(teacher, "sampled", sampled_ids_N=ids)
    loss, grad, div, _ = _ours(student, signal, "reverse_kl")
    z = student.double().requires_grad_()
    logp_y = torch.log_softmax(z, -1).gather(1, ids[:, None]).squeeze(1)
    k1 = logp_y.detach() - signal.sampled_logp_N.double()
    (k1 * logp_y).mean().backward()  # REINFORCE with the detached k1 as negative advantage
    torch.testing.assert_close(div.double(), k1, rtol=0, atol=1e-5)
    loss_err, grad_err = _rel_errors(loss, grad, k1.mean(), z.grad)
    assert loss_err <= LOSS_TOL and grad_err <= GRAD_TOL, (loss_err, grad_err)


def _tiny_signal(mode, teacher, ids):
    if mode == "hidden":
        hidden = torch.randn(
            teacher.shape[0], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0)
        )
        head = torch.randn(
            teacher.shape[1], 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1)
        )
        return TeacherSignal.from_hidden(hidden, head, torch.randn(teacher.shape[1], dtype=torch.float64))
    return TeacherSignal.from_logits(teacher, mode, k=3, sampled_ids_N=ids, dtype=torch.float64)


@pytest.mark.parametrize("mode", ["logits", "hidden", "topk"])
@pytest.mark.parametrize("kind", DIVERGENCES)
def test_gradcheck_fp64(mode, kind):
    gen = torch.Generator().manual_seed(11)
    student = torch.randn(5, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    teacher = torch.randn(5, 9, dtype=torch.float64, generator=gen)
    signal = _tiny_signal(mode, teacher, None)
    mask = torch.tensor([1, 1, 0, 1, 1])
    assert torch.autograd.gradcheck(
        lambda z: token_divergence(z, signal, kind, beta=0.3, mask_N=mask)[0], (student,)
    )


def test_sampled_gradient_in_fp64_is_exactly_reinforce():
    """gradcheck does not apply to a score-function estimator (its gradient is not the derivative of the
    returned k1 value), so the fp64 gradient is compared with autograd's on the REINFORCE surrogate."""
    gen = torch.Generator().manual_seed(11)
    student = torch.randn(5, 9, dtype=torch.float64, generator=gen, requires_grad=True)
    ids = torch.tensor([0, 8, 3, 3, 1])
    signal = _tiny_signal("sampled", torch.randn(5, 9, dtype=torch.float64, generator=gen), ids)
    upstream = torch.randn(5, dtype=torch.float64, generator=gen)
    (grad,) = torch.autograd.grad(token_divergence(student, signal, "reverse_kl")[0], student, upstream)
    logp_y = torch.log_softmax(student, -1).gather(1, ids[:, None]).squeeze(1)
    surrogate = (upstream * (logp_y - signal.sampled_logp_N).detach() * logp_y).sum()
    torch.testing.assert_close(grad, torch.autograd.grad(surrogate, student)[0], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("kind", DIVERGENCES)
@pytest.mark.parametrize("mode", ["logits", "topk"])
def test_results_do_not_depend_on_chunk_size_rows_at_once_or_threads(mode, kind, monkeypatch):
    """Chunk sizes, worker threads, and several rows per step (the path other devices take)."""
    student, teacher = make_inputs(37, 5000, seed=12)
    signal = TeacherSignal.from_logits(teacher, mode, k=16, dtype=torch.float32)
    mask = torch.arange(37) % 5 != 0
    results = []
    threads = torch.get_num_threads()
    try:
        for chunk_size, n_threads, rows_at_once in (
            (1, threads, 1),
            (3, threads, 1),
            (1024, 1, 1),
            (3, 1, 8),
            (1024, 1, 8),
        ):
            torch.set_num_threads(n_threads)
            monkeypatch.setattr(losses, "_CPU_ROWS", rows_at_once)
            results.append(_ours(student, signal, kind, mask, chunk_size=chunk_size))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


def test_bf16_logits_use_fp32_math_and_give_a_bf16_gradient(monkeypatch):
    student, teacher = make_inputs(12, V_FULL, seed=17)
    student, teacher = student.bfloat16(), teacher.bfloat16()  # the default teacher storage, too
    signal = TeacherSignal.from_logits(teacher)
    for kind in DIVERGENCES:
        div64, grad64 = exact_divergence(student, teacher, kind, weight_N=_normalized_weights(12))
        for rows_at_once in (1, 8):  # one row at a time (CPU), several (other devices): converted buffers
            monkeypatch.setattr(losses, "_CPU_ROWS", rows_at_once)
            loss, grad, _, _ = _ours(student, signal, kind)
            assert grad.dtype == torch.bfloat16
            loss_err, grad_err = _rel_errors(loss, grad, div64.mean(), grad64)
            bf16_grad_tol = 1e-2  # the gradient is stored in bf16: 2^-8 relative rounding
            assert loss_err <= LOSS_TOL and grad_err <= bf16_grad_tol, (kind, loss_err, grad_err)


def test_empty_input_gives_empty_outputs_and_a_zero_loss():
    student = torch.zeros(0, 10, requires_grad=True)
    div, entropy = token_divergence(student, TeacherSignal.from_logits(torch.zeros(0, 10)), "reverse_kl")
    assert div.shape == entropy.shape == (0,)
    for mode in ("token_mean", "sum"):
        loss = reduce_divergence(div, torch.zeros(0, dtype=torch.bool), mode=mode)
        assert float(loss.detach()) == 0.0
    loss.backward()
    assert student.grad.shape == (0, 10)


def test_backward_twice_with_retain_graph_gives_the_same_gradient():
    student, teacher = make_inputs(6, 50, seed=13)
    student.requires_grad_()
    div, _ = token_divergence(student, TeacherSignal.from_logits(teacher, dtype=torch.float32), "jsd")
    (g1,) = torch.autograd.grad(div.sum(), student, retain_graph=True)
    (g2,) = torch.autograd.grad(div.sum(), student)
    torch.testing.assert_close(g1, g2)


def test_no_grad_computes_values_only():
    student, teacher = make_inputs(5, 64, seed=18)
    student.requires_grad_()
    signal = TeacherSignal.from_logits(teacher, dtype=torch.float32)
    with torch.no_grad():
        div, entropy = token_divergence(student, signal, "reverse_kl")
    assert not div.requires_grad
    torch.testing.assert_close(div, token_divergence(student, signal, "reverse_kl")[0].detach())


def test_reductions():
    div = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    mask = torch.tensor([1, 1, 0, 1, 1])
    weight = torch.tensor([1.0, 0.0, 5.0, 2.0, 1.0])
    assert float(reduce_divergence(div, mask, weight)) == pytest.approx((1 + 8 + 5) / 4)
    assert float(reduce_divergence(div, mask, weight, mode="sum")) == pytest.approx(14)
    seq = torch.tensor([7, 7, 7, 9, 9])
    # sequence 7: tokens 1, 2 (token 3 masked) -> 1.5; sequence 9: tokens 4, 5 -> 4.5
    assert float(reduce_divergence(div, mask, mode="seq_mean_token_mean", seq_ids_N=seq)) == pytest.approx(
        3.0
    )
    w = torch.tensor([2.0, 2.0, 2.0, 1.0, 1.0])  # per-sample weights broadcast to tokens
    expected = (2 * 1.5 + 1 * 4.5) / 3
    got = reduce_divergence(div, mask, w, mode="seq_mean_token_mean", seq_ids_N=seq)
    assert float(got) == pytest.approx(expected)
    assert float(reduce_divergence(div, torch.zeros(5))) == 0.0  # nothing selected: 0, not NaN
    with pytest.raises(ValueError, match="seq_ids_N"):
        reduce_divergence(div, mode="seq_mean_token_mean")
    with pytest.raises(ValueError, match="unknown reduction"):
        reduce_divergence(div, mode="mean")


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (
            dict(kind="forward_kl", mode="sampled"),
            "for forward_kl store the teacher as 'topk'.*'logits'/'hidden'",
        ),
        (dict(kind="jsd", mode="sampled"), "supports only .'reverse_kl'"),
        (dict(kind="jsd", beta=0.0), "beta strictly between 0 and 1"),
        (dict(kind="jsd", beta=1.0), "forward_kl/reverse_kl"),
        (dict(kind="kl"), "unknown divergence"),
        (dict(n_teacher=5), "4 tokens but the teacher signal 5"),
        (dict(mask=torch.ones(3)), r"mask_N must have shape \(4,\)"),
        (dict(chunk_size=0), "chunk_size"),
        (dict(vocab_size=40), "tokenizer has 40 tokens"),
    ],
)
def test_bad_calls_raise_helpful_errors(call, message):
    student, teacher = make_inputs(4, 32, seed=14)
    n_teacher = call.get("n_teacher", 4)
    teacher = torch.cat([teacher, teacher])[:n_teacher]
    mode = call.get("mode", "logits")
    signal = TeacherSignal.from_logits(teacher, mode, sampled_ids_N=torch.zeros(n_teacher, dtype=torch.long))
    with pytest.raises(ValueError, match=message):
        token_divergence(
            student,
            signal,
            call.get("kind", "reverse_kl"),
            beta=call.get("beta", 0.5),
            chunk_size=call.get("chunk_size", 1024),
            mask_N=call.get("mask"),
            vocab_size=call.get("vocab_size"),
        )


@pytest.mark.parametrize("mode", ["logits", "hidden", "topk", "sampled"])
def test_nan_teacher_raises(mode):
    student, teacher = make_inputs(6, 40, seed=15)
    ids = torch.arange(6)
    if mode == "hidden":
        hidden = torch.randn(6, 4)
        hidden[3, 1] = math.nan
        signal = TeacherSignal.from_hidden(hidden, torch.randn(40, 4), dtype=torch.float32)
    else:
        signal = TeacherSignal.from_logits(teacher, mode, k=4, sampled_ids_N=ids, dtype=torch.float32)
        field = {"logits": "logits_N_V", "topk": "topk_logp_N_K", "sampled": "sampled_logp_N"}[mode]
        getattr(signal, field)[3] = math.nan
    with pytest.raises(ValueError, match="teacher"):
        token_divergence(student, signal, "reverse_kl")
    mask = torch.tensor([1, 1, 1, 0, 1, 1])
    if mode in ("logits", "hidden"):  # a masked NaN row is never read
        div, _ = token_divergence(student, signal, "reverse_kl", mask_N=mask)
        assert torch.isfinite(div).all()


def test_nan_student_raises():
    student, teacher = make_inputs(3, 20, seed=16)
    student[1, 4] = math.nan
    with pytest.raises(ValueError, match="student logits"):
        token_divergence(student, TeacherSignal.from_logits(teacher), "forward_kl")


@pytest.mark.parametrize(
    "mode,kind", [(m, k) for m in ("logits", "topk", "sampled") for k in opd.distill.SUPPORTED[m]]
)
def test_overwrite_logits_gives_the_same_values_and_gradient_in_the_logits_storage(mode, kind):
    student, teacher = make_inputs(40, 3000, seed=21)
    student[:3, :50] = teacher[:3, :50] = float("-inf")  # the safe path must redo rows from a saved copy
    ids = torch.distributions.Categorical(logits=student).sample()
    signal = _tiny_signal(mode, teacher, ids)
    mask = torch.ones(40, dtype=torch.bool)
    mask[5:9] = False
    weight = torch.rand(40)
    leaf = student.clone().requires_grad_()
    div, entropy = token_divergence(leaf, signal, kind, mask_N=mask)
    (expected,) = torch.autograd.grad((div * weight).sum(), leaf)

    head_out = student.clone().requires_grad_()
    logits = head_out * 1.0  # a non-leaf that only the loss reads, like an output head's result
    div2, entropy2 = token_divergence(logits, signal, kind, mask_N=mask, overwrite_logits=True)
    (grad,) = torch.autograd.grad((div2 * weight).sum(), logits)
    assert grad.data_ptr() == logits.data_ptr(), "the gradient must live in the logits' storage"
    torch.testing.assert_close(div2, div, rtol=0, atol=0)
    torch.testing.assert_close(entropy2, entropy, rtol=0, atol=0)
    torch.testing.assert_close(grad, expected, rtol=1e-6, atol=1e-9)


def test_overwrite_logits_refuses_a_second_backward_and_trips_nodes_that_saved_the_logits():
    student, teacher = make_inputs(6, 50, seed=22)
    signal = TeacherSignal.from_logits(teacher, dtype=torch.float32)
    logits = student.clone().requires_grad_() * 1.0
    div, _ = token_divergence(logits, signal, "reverse_kl", overwrite_logits=True)
    torch.autograd.grad(div.sum(), logits, retain_graph=True)
    with pytest.raises(RuntimeError, match="second backward"):
        torch.autograd.grad(div.sum(), logits)

    leaf = student.clone().requires_grad_()
    logits = leaf * 1.0
    squares = logits.pow(2)  # pow saves its input: overwriting it must not go unnoticed
    div, _ = token_divergence(logits, signal, "forward_kl", overwrite_logits=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (div.sum() + squares.sum()).backward()


def test_overwrite_logits_without_grad_leaves_the_logits_intact():
    student, teacher = make_inputs(4, 30, seed=23)
    before = student.clone()
    with torch.no_grad():
        token_divergence(student, TeacherSignal.from_logits(teacher), "jsd", overwrite_logits=True)
    assert torch.equal(student, before)
