"""The Ray-free two-phase step (``opd.distill.step``): packed micro-batches and the fused output-head
divergence give the padded step's losses and gradients (``opd.bench.padded``) for every divergence and
teacher signal, on the tiny models and on models with the real vocabulary (V=151,936, tied and untied heads,
a teacher head wider than the tokenizer); the loss aggregation modes; packing; the typed config."""

from __future__ import annotations

import pytest
import torch

from opd.bench.padded import padded_micro_batches, padded_mini_batch_backward, padded_teacher_signals
from opd.distill.batch import build_opd_batch
from opd.distill.config import OPDConfig, OPDConfigError, check_trainer
from opd.distill.packing import mini_batches, pack_rows, pad_to, split_rows
from opd.distill.step import StepSettings, coefficients, plan_passes, run_step
from test_opd_batch import rollout_batch

PAIRS = [
    (signal, kind) for signal in ("logits", "hidden", "topk") for kind in ("reverse_kl", "forward_kl", "jsd")
]
PAIRS.append(("sampled", "reverse_kl"))
TINY_VOCAB = 438
REAL_VOCAB = 151_936


def rows(vocab: int, seed: int = 0, tool_row: bool = True):
    """Seven rollouts of uneven prompt and response lengths (like math: short prompts, long tails); one
    with a tool span in the middle of its response."""
    gen = torch.Generator().manual_seed(seed)
    shapes = [(3, 9), (6, 2), (4, 14), (5, 6), (2, 11), (7, 3), (3, 8)]
    out = []
    for prompt, response in shapes:
        ids = torch.randint(7, vocab, (prompt + response,), generator=gen).tolist()
        out.append((ids[:prompt], ids[prompt:], [1] * response))
    if tool_row:
        out[2] = (out[2][0], out[2][1], [1, 1, 1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 1])
    return out


def weights(n: int) -> list[float]:
    return [0.5 + 0.25 * i for i in range(n)]


def gradient(model) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def padded_gradient(student, teacher, opd, config: OPDConfig, micro_rows: int) -> tuple[torch.Tensor, float]:
    """The padded path's gradient for one mini-batch of all rows, and its mean token divergence."""
    student.zero_grad()
    micro = padded_micro_batches(opd, micro_rows, "cpu")
    total = padded_mini_batch_backward(student, micro, padded_teacher_signals(teacher, micro, config), config)
    return gradient(student), total / int(opd.target_mask_B_L.sum())


def step_gradient(
    student, teacher, opd, config: OPDConfig, settings: StepSettings
) -> tuple[torch.Tensor, dict]:
    """The new step's gradient (SGD with lr 0 and an unreachable clip leave it on the parameters)."""
    optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    metrics = run_step(student, teacher, optimizer, opd, config, settings)
    return gradient(student), metrics


SPLITS = {
    "rows": StepSettings(rows_per_mini_batch=7, max_rows=3, grad_clip=1e9),  # 3 micro-batches of <= 3 rows
    "tokens": StepSettings(rows_per_mini_batch=7, max_tokens=24, grad_clip=1e9),  # by a token budget
}


@pytest.fixture(scope="module")
def tiny_models(tiny_assets):
    from transformers import AutoModelForCausalLM

    def load(name):
        return AutoModelForCausalLM.from_pretrained(tiny_assets / name, dtype=torch.float32)

    return load("student"), load("teacher")


@pytest.mark.parametrize("split", sorted(SPLITS))
@pytest.mark.parametrize(("signal", "kind"), PAIRS)
def test_packed_step_equals_the_padded_step_on_the_tiny_models(tiny_models, signal, kind, split):
    student, teacher = tiny_models
    opd = build_opd_batch(rollout_batch(rows(TINY_VOCAB), weights=weights(7)), pad_token_id=0)
    config = OPDConfig(loss_type=kind, teacher_signal=signal, topk=8, vocab_size=TINY_VOCAB)
    reference, mean_div = padded_gradient(student, teacher, opd, config, micro_rows=3)
    grad, metrics = step_gradient(student, teacher, opd, config, SPLITS[split])
    assert relative_error(grad, reference) <= 1e-4
    # the metric is the unweighted token mean; the loss the weighted one
    assert metrics["opd/divergence"] == pytest.approx(mean_div, rel=1e-4)
    assert metrics["opd/logit_rows_per_target_token"] == 1.0
    assert metrics["opd/micro_batches"] == (3 if split == "rows" else metrics["opd/micro_batches"]) >= 3


def real_vocab_models(tied_student: bool):
    """One-layer Qwen2 models with Qwen's tokenizer size: the student's head as wide as the tokenizer
    (tied or not), the teacher's untied and padded to 152,064 rows like Qwen2.5-7B's. Weights drawn wide
    (std 0.3) so the two distributions are peaked and differ: divergences of order 1, not the 1e-5 of two
    near-uniform distributions, where the comparison would measure rounding only."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def build(width, tied, seed):
        torch.manual_seed(seed)
        config = Qwen2Config(
            vocab_size=width,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=1,
            num_attention_heads=4,
            num_key_value_heads=2,
            tie_word_embeddings=tied,
            attn_implementation="sdpa",
            initializer_range=0.3,
        )
        return Qwen2ForCausalLM(config).float()

    return build(REAL_VOCAB, tied_student, 1), build(152_064, False, 2)


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "untied"])
def test_packed_step_equals_the_padded_step_at_the_real_vocabulary(tied):
    student, teacher = real_vocab_models(tied)
    opd = build_opd_batch(rollout_batch(rows(REAL_VOCAB), weights=weights(7)), pad_token_id=0)
    for signal, kind in PAIRS:
        config = OPDConfig(
            loss_type=kind, teacher_signal=signal, topk=16, chunk_size=16, vocab_size=REAL_VOCAB
        )
        reference, mean_div = padded_gradient(student, teacher, opd, config, micro_rows=4)
        grad, metrics = step_gradient(student, teacher, opd, config, SPLITS["tokens"])
        assert relative_error(grad, reference) <= 1e-4, (signal, kind)
        assert metrics["opd/divergence"] == pytest.approx(mean_div, rel=1e-4), (signal, kind)
        # student head rows beyond the compared vocabulary (none here) and the teacher's padding: untouched
        assert student.get_output_embeddings().weight.grad.shape[0] == REAL_VOCAB


def test_hidden_signal_stores_2h_bytes_per_token_and_the_head_once(tiny_models):
    student, teacher = tiny_models
    opd = build_opd_batch(rollout_batch(rows(TINY_VOCAB)), pad_token_id=0)
    config = OPDConfig(teacher_signal="hidden", vocab_size=TINY_VOCAB)
    _, metrics = step_gradient(student, teacher, opd, config, SPLITS["rows"])
    hidden = teacher.config.hidden_size
    assert metrics["opd/teacher_signal_bytes_per_token"] == 2 * hidden  # bf16 hidden states
    head_mb = TINY_VOCAB * hidden * 4 / 2**20  # the fp32 head, once for three micro-batches
    assert metrics["opd/teacher_head_mb"] == pytest.approx(head_mb)
    assert metrics["opd/teacher_signal_mb"] == pytest.approx(
        head_mb + opd.stats["opd/target_tokens"] * 2 * hidden / 2**20
    )


# --- loss aggregation -------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["token-mean", "seq-mean-token-mean"])
def test_loss_aggregation_weights_tokens_or_samples(tiny_models, mode):
    """token-mean: sum_n w d_n / sum_n w; seq-mean-token-mean: sum_i w_i mean_i / sum_i w_i."""
    student, teacher = tiny_models
    w = weights(7)
    opd = build_opd_batch(rollout_batch(rows(TINY_VOCAB), weights=w), pad_token_id=0)
    config = OPDConfig(teacher_signal="logits", vocab_size=TINY_VOCAB, loss_agg_mode=mode)
    settings = SPLITS["rows"]
    plan = plan_passes(opd, len(opd), settings, config)
    coef_N = torch.cat([coefficients(mb, opd, plan.normaliser_M[0], config, 1.0) for mb in plan.minis[0]])
    rows_N = torch.cat([mb.token_row_N for mb in plan.minis[0]])
    lengths = opd.target_mask_B_L.sum(-1)
    for row in range(7):
        expected = (
            w[row] / sum(w[r] * int(lengths[r]) for r in range(7))
            if mode == "token-mean"
            else (w[row] / int(lengths[row]) / sum(w))
        )
        assert torch.allclose(coef_N[rows_N == row], torch.tensor(expected), rtol=1e-6)
    assert float(coef_N.sum()) == pytest.approx(1.0)  # either way a weighted mean
    grads = {}
    for m in ("token-mean", "seq-mean-token-mean"):
        grads[m], _ = step_gradient(
            student,
            teacher,
            opd,
            OPDConfig(teacher_signal="logits", vocab_size=TINY_VOCAB, loss_agg_mode=m),
            settings,
        )
    assert relative_error(grads["token-mean"], grads["seq-mean-token-mean"]) > 1e-2  # they differ


# --- packing ----------------------------------------------------------------------------------------


def test_packed_rows_restart_positions_and_point_at_their_targets():
    batch_rows = [([5, 6], [7, 8, 9], [1, 1, 1]), ([11], [12, 13, 14], [1, 0, 1])]
    opd = build_opd_batch(rollout_batch(batch_rows), pad_token_id=0)
    mb = pack_rows(opd, [0, 1])
    assert mb.input_ids_T.tolist() == [5, 6, 7, 8, 9, 11, 12, 13, 14]
    assert mb.position_ids_T.tolist() == [0, 1, 2, 3, 4, 0, 1, 2, 3]
    # targets 7, 8, 9 (row 0) and 12, 14 (13 is a tool token), each predicted from the position before it
    assert mb.target_index_N.tolist() == [1, 2, 3, 5, 7]
    assert mb.target_ids_N.tolist() == [7, 8, 9, 12, 14]
    assert mb.token_row_N.tolist() == [0, 0, 0, 1, 1]
    assert mb.num_targets == 5 and mb.num_tokens == 9


def test_packed_forward_keeps_attention_within_each_row(tiny_models):
    """The hidden states of a packed row equal the row's own forward: no row sees another."""
    student, _ = tiny_models
    opd = build_opd_batch(rollout_batch(rows(TINY_VOCAB)), pad_token_id=0)
    with torch.no_grad():
        packed = student(**{**pack_rows(opd, [0, 1, 2]).model_inputs("cpu"), "logits_to_keep": 0}).logits[0]
        offset = 0
        for r in range(3):
            length = int(opd.attention_mask_B_L[r].sum())
            alone = student(input_ids=opd.input_ids_B_L[r : r + 1, :length]).logits[0]
            torch.testing.assert_close(packed[offset : offset + length], alone, rtol=1e-4, atol=1e-5)
            offset += length


def test_split_by_token_budget_and_rows():
    assert split_rows([5, 5, 5, 12, 3], max_tokens=10) == [[0, 1], [2], [3], [4]]  # 12 > budget: alone
    assert split_rows([5, 5, 5, 12, 3], max_rows=2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="exactly one"):
        split_rows([1], max_tokens=4, max_rows=2)


def test_mini_batches_follow_the_rollout_index_and_padding_evens_the_passes():
    """Rows 1 (overlong) and 2 (tool-only) are dropped; mini-batches still cover rollout rows [0, 2) and
    [2, 4): the second keeps only row 3. pad_to brings both to the counts other ranks have."""
    batch_rows = [
        ([5], [6, 7], [1, 1]),
        ([5], [6] * 30, [1] * 30),
        ([5], [6, 7], [0, 0]),
        ([5], [8, 9], [1, 1]),
    ]
    opd = build_opd_batch(rollout_batch(batch_rows), pad_token_id=0, max_length=10, overlong="skip")
    assert opd.kept_rows == [0, 3]
    minis = mini_batches(opd, 4, 2, max_rows=1)
    assert [[mb.rows_R.tolist() for mb in micro] for micro in minis] == [[[0]], [[1]]]
    pad_to(minis, [3, 1])
    assert [len(micro) for micro in minis] == [3, 1]
    assert [mb.padding for mb in minis[0]] == [False, True, True] and minis[0][1].num_targets == 0
    empty = build_opd_batch(
        rollout_batch(batch_rows[1:3]), pad_token_id=0, max_length=10, overlong="skip", allow_empty=True
    )
    assert len(empty) == 0 and mini_batches(empty, 2, 2, max_rows=1) == [[]]


# --- the typed config -------------------------------------------------------------------------------


ACTOR = {
    "actor": {
        "ppo_micro_batch_size_per_gpu": 4,
        "use_dynamic_bsz": False,
        "ulysses_sequence_parallel_size": 1,
    },
    "rollout": {"temperature": 1.0, "top_p": 1.0, "top_k": -1},
    "model": {"use_fused_kernels": False},
}


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"loss_typ": "jsd"}, "unknown opd key(s) ['loss_typ']"),
        ({"loss_type": "kl"}, "opd.loss_type=kl: choose one of"),
        (
            {"loss_type": "jsd", "teacher_signal": "sampled"},
            "use teacher_signal in ['logits', 'hidden', 'topk']",
        ),
        ({"loss_type": "jsd", "beta": 1.0}, "jsd needs 0 < beta < 1"),
        ({"topk": "8"}, "opd.topk='8' must be a int"),
        ({"chunk_size": 0}, "opd.chunk_size=0 must be >= 1"),
        ({"loss_agg_mode": "seq-mean"}, "choose one of ['seq-mean-token-mean', 'token-mean']"),
        ({"topk": 500, "teacher_signal": "topk", "vocab_size": 438}, "exceeds the vocabulary"),
    ],
)
def test_config_refuses_bad_opd_values_with_the_fix(values, message):
    with pytest.raises(OPDConfigError) as error:
        OPDConfig.from_mapping(values)
    assert message in str(error.value)


@pytest.mark.parametrize(
    ("patch", "signal", "message"),
    [
        ({"actor": {"ulysses_sequence_parallel_size": 2}}, "hidden", "ulysses_sequence_parallel_size > 1"),
        ({"model": {"use_fused_kernels": True}}, "hidden", "use_fused_kernels=true"),
        (
            {"actor": {"use_dynamic_bsz": True, "ppo_max_token_len_per_gpu": None}},
            "hidden",
            "ppo_max_token_len",
        ),
        ({"actor": {"ppo_micro_batch_size_per_gpu": None}}, "hidden", "ppo_micro_batch_size_per_gpu must be"),
        ({"rollout": {"temperature": 0.6}}, "sampled", "temperature=0.6"),
        ({"rollout": {"top_p": 0.9}}, "sampled", "top_p=0.9"),
    ],
)
def test_trainer_settings_the_step_cannot_honour_are_refused(patch, signal, message):
    actor_rollout_ref = {key: {**value, **patch.get(key, {})} for key, value in ACTOR.items()}
    with pytest.raises(OPDConfigError, match=message.replace("(", r"\(").replace("[", r"\[")):
        check_trainer(OPDConfig(teacher_signal=signal), actor_rollout_ref)
    check_trainer(OPDConfig(teacher_signal=signal), ACTOR)  # the unpatched settings pass


def test_sampled_with_a_tempered_rollout_is_fine_for_exact_signals():
    tempered = {**ACTOR, "rollout": {"temperature": 0.6, "top_p": 0.95, "top_k": 20}}
    check_trainer(OPDConfig(teacher_signal="hidden"), tempered)


def test_config_module_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, opd.distill.config; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
