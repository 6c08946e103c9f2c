"""TeacherSignal: what each mode stores, built from logits or hidden states, sliced, moved and sized."""

from __future__ import annotations

import pytest
import torch

import opd.distill.teacher_signal as teacher_signal
from opd.distill import TeacherSignal


def _logits(n: int = 6, vocab: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, vocab, generator=torch.Generator().manual_seed(seed)) * 3


def test_logits_mode_stores_bf16_by_default_and_trims_to_the_tokenizer():
    logits = _logits()
    signal = TeacherSignal.from_logits(logits, vocab_size=40)
    assert signal.mode == "logits" and signal.logits_N_V.dtype == torch.bfloat16
    assert signal.vocab_width == 40 and signal.num_tokens == 6
    assert torch.equal(signal.logits_N_V, logits[:, :40].bfloat16())
    assert TeacherSignal.from_logits(logits, dtype=torch.float32).logits_N_V.dtype == torch.float32


def test_topk_mode_keeps_top_log_probs_ids_and_the_exact_tail_mass():
    logits = _logits()
    signal = TeacherSignal.from_logits(logits, "topk", k=5, chunk_size=4)  # two chunks
    logp = torch.log_softmax(logits.double(), -1)
    top_logp, top_ids = logp.topk(5, -1)
    assert signal.topk_ids_N_K.dtype == torch.int32 and signal.topk_logp_N_K.dtype == torch.float32
    assert torch.equal(signal.topk_ids_N_K.long(), top_ids)
    torch.testing.assert_close(signal.topk_logp_N_K.double(), top_logp, rtol=0, atol=1e-5)
    tail = torch.log1p(-top_logp.exp().sum(-1))
    torch.testing.assert_close(signal.tail_logmass_N.double(), tail, rtol=1e-5, atol=1e-6)


def test_topk_tail_is_precise_when_tiny():
    logits = torch.tensor([[30.0, 0.0, -1.0, -2.0]])  # tail mass ~ 1e-13: 1 - sum(top-k) would round to 0
    signal = TeacherSignal.from_logits(logits, "topk", k=1)
    expected = torch.logsumexp(logits[0, 1:].double(), 0) - torch.logsumexp(logits[0].double(), 0)
    torch.testing.assert_close(signal.tail_logmass_N.double(), expected.view(1), rtol=1e-5, atol=0)


def test_sampled_mode_keeps_the_log_prob_of_each_sampled_token():
    logits, ids = _logits(), torch.tensor([3, 0, 49, 7, 7, 1])
    signal = TeacherSignal.from_logits(logits, "sampled", sampled_ids_N=ids)
    expected = torch.log_softmax(logits, -1).gather(1, ids[:, None]).squeeze(1)
    torch.testing.assert_close(signal.sampled_logp_N, expected)
    assert torch.equal(signal.sampled_ids_N, ids.int())
    with pytest.raises(ValueError, match="sampled_ids_N"):
        TeacherSignal.from_logits(logits, "sampled")
    with pytest.raises(ValueError, match=r"sampled_ids_N must lie in \[0, 40\)"):
        TeacherSignal.from_logits(logits, "sampled", sampled_ids_N=ids, vocab_size=40)


def test_from_hidden_references_the_head_and_matches_logits_in_every_mode():
    gen = torch.Generator().manual_seed(1)
    hidden, weight, bias = (
        torch.randn(5, 8, generator=gen),
        torch.randn(30, 8, generator=gen),
        torch.randn(30),
    )
    signal = TeacherSignal.from_hidden(hidden, weight, bias)
    assert signal.mode == "hidden" and signal.hidden_N_H.dtype == torch.bfloat16
    assert signal.head_weight_V_H.data_ptr() == weight.data_ptr()  # shared, not copied
    assert signal.vocab_width == 30 and signal.nbytes_per_token() == 8 * 2
    logits = hidden @ weight.T + bias
    ids = torch.tensor([0, 24, 3, 3, 9])
    for mode in ("logits", "topk", "sampled"):
        kwargs = dict(k=4, sampled_ids_N=ids, vocab_size=25, dtype=torch.float32, chunk_size=2)
        from_hidden = TeacherSignal.from_hidden(hidden, weight, bias, mode, **kwargs)
        from_logits = TeacherSignal.from_logits(logits, mode, **kwargs)
        for name in teacher_signal._PER_TOKEN_FIELDS[mode]:
            torch.testing.assert_close(getattr(from_hidden, name), getattr(from_logits, name))


def test_slice_and_to_keep_the_shared_head():
    hidden, weight = torch.randn(6, 4), torch.randn(10, 4)
    signal = TeacherSignal.from_hidden(hidden, weight)
    part = signal.slice(slice(2, 5))
    assert part.num_tokens == 3 and part.head_weight_V_H is signal.head_weight_V_H
    assert torch.equal(part.hidden_N_H, signal.hidden_N_H[2:5])
    picked = TeacherSignal.from_logits(_logits(), "topk", k=3).slice(torch.tensor([5, 0]))
    assert picked.num_tokens == 2 and picked.topk_ids_N_K.shape == (2, 3)
    moved = signal.to("cpu")
    assert moved.mode == "hidden" and torch.equal(moved.hidden_N_H, signal.hidden_N_H)


def test_bytes_per_token_match_the_module_docstring():
    table = teacher_signal.storage_table()
    assert [b for _, _, b in table] == [303_872, 607_744, 3_072, 6_144, 516, 8]
    for mode, dtype, nbytes in table:
        line = f"{mode:<8} {dtype:<16} {nbytes:>11,} {table[0][2] / nbytes:>17,.1f}x"
        assert line in teacher_signal.__doc__, line


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(mode="full"), "unknown teacher signal mode"),
        (dict(mode="topk", topk_logp_N_K=torch.zeros(2, 3)), "needs topk_ids_N_K, tail_logmass_N"),
        (
            dict(mode="logits", logits_N_V=torch.zeros(2, 3), hidden_N_H=torch.zeros(2, 3)),
            "does not use hidden_N_H",
        ),
        (
            dict(
                mode="sampled", sampled_logp_N=torch.zeros(2), sampled_ids_N=torch.zeros(3, dtype=torch.int32)
            ),
            "disagree on the number of tokens",
        ),
        (
            dict(mode="hidden", hidden_N_H=torch.zeros(2, 3), head_weight_V_H=torch.zeros(9, 4)),
            "hidden sizes",
        ),
    ],
)
def test_malformed_signals_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TeacherSignal(**kwargs)


def test_hidden_mode_needs_hidden_states():
    with pytest.raises(ValueError, match="from_hidden"):
        TeacherSignal.from_logits(_logits(), "hidden")
