"""Reward weights, and the worker's extension hooks (``select_tokens``, ``divergence_at``) run through the
worker's real update (``update_actor_opd``: the verl adapter around ``opd.distill.step``) on the tiny
models, without Ray or FSDP: the gradient the worker leaves on the student equals autograd's on the loss
written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from verl import DataProto

from opd.bench.padded import padded_micro_batches, padded_teacher_signals
from opd.distill.batch import build_opd_batch
from opd.distill.config import OPDConfig
from opd.distill.losses import token_divergence
from opd.distill.weights import reward_weights
from opd.distill.worker import OPDActorRolloutRefWorker

VOCAB = 438  # the tiny tokenizer's size (both tiny heads are this wide)


# --- reward_weights -------------------------------------------------------------------------------------


def softmax_times_batch(rewards: list[float], beta: float) -> list[float]:
    """w_i = B * exp(r_i / beta) / sum_j exp(r_j / beta), in plain Python (shifted by the max)."""
    top = max(rewards)
    exps = [math.exp((r - top) / beta) for r in rewards]
    return [len(rewards) * e / sum(exps) for e in exps]


@pytest.mark.parametrize(
    ("rewards", "beta"),
    [
        ([0.0, 1.0, 0.0, 1.0], 0.5),
        ([1.0, -2.0, 0.5], 2.0),
        ([0.0, 1.0], 1e-3),
        ([3.0, 1.0, 2.0, 0.0, 1.0], 1.0),
    ],
)
def test_reward_weights_are_the_batch_softmax_times_the_batch_size(rewards, beta):
    weights_B = reward_weights(torch.tensor(rewards), beta)
    assert weights_B.dtype == torch.float32 and weights_B.shape == (len(rewards),)
    torch.testing.assert_close(weights_B, torch.tensor(softmax_times_batch(rewards, beta)))
    assert abs(float(weights_B.mean()) - 1.0) < 1e-6  # the loss scale is unchanged
    # mixed rewards: rewarded samples weigh more than 1, unrewarded ones less
    assert float(weights_B.min()) < 1.0 < float(weights_B.max())
    assert int(weights_B.argmax()) == int(torch.tensor(rewards).argmax())


def test_equal_rewards_weigh_every_sample_one():
    weights_B = reward_weights(torch.tensor([0.7, 0.7, 0.7]), 0.1)
    torch.testing.assert_close(weights_B, torch.ones(3))


@pytest.mark.parametrize("beta", [0.0, -1.0])
def test_non_positive_reward_beta_turns_weighting_off(beta):
    weights_B = reward_weights(torch.tensor([0.0, 1.0, 5.0]), beta)
    assert torch.equal(weights_B, torch.ones(3))


# --- the worker's hooks ---------------------------------------------------------------------------------

OPD_CONFIG = {
    "loss_type": "reverse_kl",
    "teacher_signal": "logits",
    "beta": 0.5,
    "topk": 8,
    "chunk_size": 1024,
    "vocab_size": VOCAB,
    "max_length": 4096,
    "overlong": "truncate",
    "reward_beta": 0.0,
    "loss_agg_mode": "token-mean",
    "teacher_path": None,
}
ROWS, MICRO_ROWS = 4, 2  # one mini-batch of two micro-batches: the normaliser spans both


def rollout_batch(seed: int = 0) -> DataProto:
    """Four rollouts as verl lays them out (prompts left-padded, responses right-padded); the third
    response has a tool span (response_mask 0) in the middle."""
    gen = torch.Generator().manual_seed(seed)
    prompt_lengths, response_lengths = [3, 6, 4, 5], [7, 5, 8, 6]
    width_p, width_r = max(prompt_lengths), max(response_lengths)
    prompts_B_P = torch.zeros(ROWS, width_p, dtype=torch.long)
    responses_B_R = torch.zeros(ROWS, width_r, dtype=torch.long)
    response_mask_B_R = torch.zeros(ROWS, width_r, dtype=torch.long)
    attention_B_T = torch.zeros(ROWS, width_p + width_r, dtype=torch.long)
    for b, (p, r) in enumerate(zip(prompt_lengths, response_lengths, strict=True)):
        prompts_B_P[b, width_p - p :] = torch.randint(7, VOCAB, (p,), generator=gen)
        responses_B_R[b, :r] = torch.randint(7, VOCAB, (r,), generator=gen)
        response_mask_B_R[b, :r] = 1
        attention_B_T[b, width_p - p : width_p + r] = 1
    response_mask_B_R[2, 3:5] = 0  # tool tokens: inputs, never targets
    tensors = {
        "prompts": prompts_B_P,
        "responses": responses_B_R,
        "response_mask": response_mask_B_R,
        "attention_mask": attention_B_T,
        "input_ids": torch.cat([prompts_B_P, responses_B_R], dim=1),
    }
    return DataProto.from_dict(
        tensors=tensors, non_tensors={"uid": np.array(["a", "b", "c", "d"], dtype=object)}
    )


def load(model_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)


class Tokenizer:
    pad_token_id = 0


def bare_worker(cls, student, teacher) -> OPDActorRolloutRefWorker:
    """The worker object without Ray or FSDP: only the attributes the update reads. The optimizer has
    lr 0 (its step leaves the weights and their .grad as the update computed them) and the clip is
    never reached, so the student's .grad after an update is the loss's gradient."""
    worker = object.__new__(cls)
    worker.actor_module_fsdp, worker.ref_module_fsdp = student, teacher
    worker.actor_optimizer = torch.optim.SGD(student.parameters(), lr=0.0)
    worker.actor_lr_scheduler = torch.optim.lr_scheduler.LambdaLR(worker.actor_optimizer, lambda _: 1.0)
    worker.config = OmegaConf.create(
        {
            "actor": {
                "grad_clip": 1e9,
                "ppo_mini_batch_size": ROWS,
                "ppo_micro_batch_size_per_gpu": MICRO_ROWS,
                "ppo_epochs": 1,
                "use_dynamic_bsz": False,
            }
        }
    )
    worker.tokenizer = Tokenizer()
    worker._is_actor = worker._is_ref = True
    worker._is_offload_param = worker._is_offload_optimizer = False
    return worker


def update(worker, step: int = 0, total_steps: int | None = None, **opd) -> dict:
    batch = rollout_batch()
    batch.meta_info.update(opd=dict(OPD_CONFIG, **opd), global_steps=step, total_steps=total_steps)
    return worker.update_actor_opd(batch).meta_info["metrics"]


@pytest.fixture
def setup(tiny_assets):
    """(opd batch, padded micro-batches with the teacher's logits for the hand-written loss, the teacher,
    a fresh tiny student)."""
    torch.manual_seed(0)
    opd = build_opd_batch(rollout_batch(), pad_token_id=0)
    micro = padded_micro_batches(opd, MICRO_ROWS, "cpu")
    assert len(micro) == 2
    teacher = load(tiny_assets / "teacher")
    signals = padded_teacher_signals(teacher, micro, OPDConfig(**OPD_CONFIG))
    return opd, micro, signals, teacher, load(tiny_assets / "student")


def student_logits_N_V(student, mb) -> torch.Tensor:
    """Full-sequence forward; the logits at position t - 1 predict the target token at t."""
    logits_B_T_V = student(
        input_ids=mb.input_ids, attention_mask=mb.attention_mask, position_ids=mb.position_ids
    ).logits
    return logits_B_T_V[mb.batch_idx_N, mb.target_pos_N - 1]


def divergence_by_hand(logits_N_V: torch.Tensor, teacher_logits_N_V: torch.Tensor, kind: str) -> torch.Tensor:
    logp_N_V = torch.log_softmax(logits_N_V.float(), dim=-1)
    logq_N_V = torch.log_softmax(teacher_logits_N_V.float(), dim=-1)
    if kind == "reverse_kl":
        return (logp_N_V.exp() * (logp_N_V - logq_N_V)).sum(-1)
    assert kind == "forward_kl"
    return (logq_N_V.exp() * (logq_N_V - logp_N_V)).sum(-1)


def gradient(student) -> torch.Tensor:
    return torch.cat([p.grad.flatten() for p in student.parameters()])


def reference_gradient(student, micro, signals, kind, masks_N=None) -> tuple[torch.Tensor, float]:
    """autograd's gradient of sum(div_N * mask_N) / (target tokens of the mini-batch), and the mean
    divergence over all target tokens."""
    n_tokens = sum(len(mb.target_ids_N) for mb in micro)
    student.zero_grad()
    total_div = 0.0
    for i, (mb, signal) in enumerate(zip(micro, signals, strict=True)):
        div_N = divergence_by_hand(student_logits_N_V(student, mb), signal.logits_N_V, kind)
        mask_N = torch.ones_like(div_N) if masks_N is None else masks_N[i]
        ((div_N * mask_N).sum() / n_tokens).backward()
        total_div += float(div_N.detach().sum())
    return gradient(student), total_div / n_tokens


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


class KeepHighDivergence(OPDActorRolloutRefWorker):
    """A token-importance hook: keep the tokens whose divergence is above the micro-batch's median."""

    def select_tokens(self, div_N, entropy_N, mb, step):
        assert div_N.shape == entropy_N.shape == mb.target_ids_N.shape and not div_N.requires_grad
        keep_N = (div_N > div_N.median()).float()
        self.masks_N.append(keep_N)
        return keep_N


def test_select_tokens_mask_gives_the_gradient_of_the_masked_loss(setup):
    opd, micro, signals, teacher, student = setup
    worker = bare_worker(KeepHighDivergence, student, teacher)
    worker.masks_N = []
    metrics = update(worker)
    worker_grad = gradient(student)

    n_tokens = int(opd.target_mask_B_L.sum())
    n_kept = int(sum(mask_N.sum() for mask_N in worker.masks_N))
    assert len(worker.masks_N) == 2 and 0 < n_kept < n_tokens
    assert metrics["opd/target_tokens"] == n_tokens
    assert metrics["opd/selected_token_fraction"] == n_kept / n_tokens  # only the kept tokens count as kept

    masked_grad, mean_div = reference_gradient(student, micro, signals, "reverse_kl", worker.masks_N)
    assert relative_error(worker_grad, masked_grad) < 1e-4
    assert metrics["opd/divergence"] == pytest.approx(mean_div, rel=1e-4)  # the divergence of every token
    full_grad, _ = reference_gradient(student, micro, signals, "reverse_kl")
    # the mask matters: the unmasked gradient is far further off than the masked one. A ratio, not a fixed
    # size: how much the dropped (low-divergence) tokens weigh depends on the tiny models (0.04% in one build)
    assert relative_error(worker_grad, full_grad) > 30 * relative_error(worker_grad, masked_grad)


class ForwardKLWorker(OPDActorRolloutRefWorker):
    """A divergence schedule hook: forward KL whatever opd.loss_type says."""

    def divergence_at(self, step, opd_config, total_steps=None):
        self.asked_at.append(step)
        return "forward_kl"


def test_divergence_at_chooses_the_divergence_the_update_optimises(setup):
    _, micro, signals, teacher, student = setup
    worker = bare_worker(ForwardKLWorker, student, teacher)
    worker.asked_at = []
    metrics = update(worker, step=7)  # opd.loss_type: reverse_kl
    worker_grad = gradient(student)
    assert worker.asked_at == [7]
    assert "opd/divergence/forward_kl" in metrics and "opd/divergence/reverse_kl" not in metrics
    assert metrics["opd/selected_token_fraction"] == 1.0

    with torch.no_grad():  # the loss value, by the library's divergence of either kind
        pairs = [(student_logits_N_V(student, mb), signal) for mb, signal in zip(micro, signals, strict=True)]
        forward_N, reverse_N = (
            torch.cat([token_divergence(logits_N_V, s, kind, vocab_size=VOCAB)[0] for logits_N_V, s in pairs])
            for kind in ("forward_kl", "reverse_kl")
        )
    assert metrics["opd/divergence"] == pytest.approx(float(forward_N.mean()), rel=1e-4)
    assert metrics["opd/divergence"] != pytest.approx(float(reverse_N.mean()), rel=1e-2)

    forward_grad, _ = reference_gradient(student, micro, signals, "forward_kl")
    assert relative_error(worker_grad, forward_grad) < 1e-4
    reverse_grad, _ = reference_gradient(student, micro, signals, "reverse_kl")
    assert relative_error(worker_grad, reverse_grad) > 1e-2


def test_the_student_keeps_its_tokenizer_after_the_teacher_is_built(monkeypatch):
    """verl assigns ``self.tokenizer`` for every model it builds (the teacher last) and gives it to the
    checkpoint manager: the worker keeps the student's. (verl's builder replaced: it needs a GPU-less FSDP
    setup that this unit test does not start; the e2e runs build the real thing.)"""
    from verl.workers.fsdp_workers import AsyncActorRolloutRefWorker

    def fake_build(self, model_path, *args, role="actor", **kwargs):
        self.tokenizer, self.processor = f"tokenizer of {model_path}", None
        return model_path

    monkeypatch.setattr(AsyncActorRolloutRefWorker, "_build_model_optimizer", fake_build, raising=False)
    worker = object.__new__(OPDActorRolloutRefWorker)
    assert worker._build_model_optimizer("student", role="actor") == "student"
    assert worker._build_model_optimizer("teacher", role="ref") == "teacher"
    assert worker.tokenizer == "tokenizer of student"


def test_the_default_divergence_follows_opd_schedule_by_the_step_of_the_trainer(setup):
    """Forward KL for the first half of 4 steps, then reverse KL: the worker's default ``divergence_at``
    reads the stage from the step and the total the trainer sends."""
    _, _, _, teacher, student = setup
    worker = bare_worker(OPDActorRolloutRefWorker, student, teacher)
    schedule = {"stages": [{"loss_type": "forward_kl", "until": 0.5}, {"loss_type": "reverse_kl"}]}
    logged = {}
    for step in (1, 2, 3, 4):
        metrics = update(worker, step=step, total_steps=4, schedule=schedule)
        logged[step] = [t for t in ("forward_kl", "reverse_kl") if f"opd/divergence/{t}" in metrics]
        assert metrics["opd/schedule/stage"] == (0 if step <= 2 else 1)
    assert logged == {1: ["forward_kl"], 2: ["forward_kl"], 3: ["reverse_kl"], 4: ["reverse_kl"]}
