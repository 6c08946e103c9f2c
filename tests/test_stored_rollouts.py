"""Stored rollouts and the off-policy warm-up (``opd.distill.stored``, ``opd.rollouts=stored``): a rollouts
file goes through verl's own data loader and comes back as the exact rows that were stored; the warm-up's
loss on them is the forward KL of the OPD step on the same tokens (and a plain full-vocabulary forward KL);
bad files and settings are refused with the fix."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from opd.distill import stored
from opd.distill.batch import build_opd_batch
from opd.distill.config import OPDConfig, OPDConfigError, check_trainer
from opd.distill.step import StepSettings, run_step
from test_opd_batch import rollout_batch


def stored_rows(tokenizer) -> list[dict]:
    """Six responses to three prompts, as the rollouts stage writes them: chat-templated prompt ids,
    response ids ending in EOS, one response with a tool answer (mask 0) in the middle, scores 0/1."""
    rows = []
    for i, question in enumerate(["What is 2+3?", "What is 7*6?", "Solve x+4=9."]):
        messages = [{"role": "user", "content": question}]
        prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        for j, answer in enumerate([f"\\boxed{{{i + 5}}}", f"{i} + {i} = {2 * i}"]):
            response = tokenizer.encode(answer, add_special_tokens=False) + [tokenizer.eos_token_id]
            mask = [1] * len(response)
            if i == 1 and j == 0:  # a tool span: stored, never a target
                mask[2:5] = [0, 0, 0]
            rows.append(
                {
                    "data_source": "tiny_math",
                    "prompt": messages,
                    "reward_model": {"ground_truth": str(i + 5), "style": "rule"},
                    "extra_info": {"index": i},
                    stored.PROMPT_IDS: list(prompt_ids),
                    stored.RESPONSE_IDS: response,
                    stored.RESPONSE_MASK: mask,
                    stored.SCORE: float(j == 0),
                }
            )
    return rows


@pytest.fixture(scope="module")
def tiny(tiny_assets):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def load(name):
        return AutoModelForCausalLM.from_pretrained(tiny_assets / name, dtype=torch.float32)

    return AutoTokenizer.from_pretrained(tiny_assets / "student"), load("student"), load("teacher")


def loaded_batch(path, tokenizer):
    """The rollouts file through verl's training data loader (RLHFDataset + collate_fn), then through the
    stand-in the trainer puts where generation was: the rollout batch the warm-up's step receives."""
    from omegaconf import OmegaConf
    from verl import DataProto
    from verl.utils.dataset.rl_dataset import RLHFDataset, collate_fn

    config = OmegaConf.create(
        {
            "max_prompt_length": 128,
            "return_raw_chat": True,
            "filter_overlong_prompts": False,
            "truncation": "error",
        }
    )
    dataset = RLHFDataset([str(path)], tokenizer, config)
    batch = DataProto.from_single_dict(collate_fn([dataset[i] for i in range(len(dataset))]))
    return stored.StoredRollouts(None, tokenizer.pad_token_id).generate_sequences(batch)


def test_stored_rows_come_back_exactly_through_verls_data_loader(tiny, tmp_path):
    tokenizer, _, _ = tiny
    rows = stored_rows(tokenizer)
    path = stored.write(tmp_path / stored.ROLLOUTS_FILE, rows)
    assert stored.check_files([str(path)]) == len(rows)
    output = loaded_batch(path, tokenizer)
    assert stored.rows_from_generation(output) == [
        (r[stored.PROMPT_IDS], r[stored.RESPONSE_IDS], r[stored.RESPONSE_MASK]) for r in rows
    ]
    # verl places a sequence's reward on its last response token
    lengths = [len(r[stored.RESPONSE_IDS]) for r in rows]
    scores_B_R = output.batch["rm_scores"]
    assert [float(scores_B_R[b, n - 1]) for b, n in enumerate(lengths)] == [r[stored.SCORE] for r in rows]
    assert float(scores_B_R.sum()) == sum(r[stored.SCORE] for r in rows)
    # the OPD rows: targets are exactly the stored model tokens
    opd = build_opd_batch(output, pad_token_id=tokenizer.pad_token_id)
    assert int(opd.target_mask_B_L.sum()) == sum(sum(r[stored.RESPONSE_MASK]) for r in rows)


def full_vocabulary_forward_kl(student, teacher, rows) -> float:
    """Mean over the stored model tokens of KL(teacher || student) of the next-token distributions, from
    plain forwards of each row: the definition, with nothing of the step's machinery."""
    total, count = 0.0, 0
    with torch.no_grad():
        for row in rows:
            prompt, response, mask = (
                row[stored.PROMPT_IDS],
                row[stored.RESPONSE_IDS],
                row[stored.RESPONSE_MASK],
            )
            ids_1_L = torch.tensor([prompt + response])
            logp_s_L_V = torch.log_softmax(student(ids_1_L).logits[0].double(), -1)
            logp_t_L_V = torch.log_softmax(teacher(ids_1_L).logits[0].double(), -1)
            for k, keep in enumerate(mask):
                if keep:
                    t = len(prompt) + k - 1  # the logits that predict response token k
                    total += float((logp_t_L_V[t].exp() * (logp_t_L_V[t] - logp_s_L_V[t])).sum())
                    count += 1
    return total / count


def test_warmup_loss_is_the_opd_steps_forward_kl_on_the_same_stored_tokens(tiny, tmp_path):
    tokenizer, student, teacher = tiny
    rows = stored_rows(tokenizer)
    path = stored.write(tmp_path / stored.ROLLOUTS_FILE, rows)
    config = OPDConfig(
        loss_type="forward_kl", teacher_signal="hidden", rollouts="stored", vocab_size=len(tokenizer)
    )
    settings = StepSettings(rows_per_mini_batch=len(rows), max_rows=4, grad_clip=1e9)

    def step(batch):
        student.zero_grad()
        optimizer = torch.optim.SGD(student.parameters(), lr=0.0)  # lr 0: the gradient stays, weights too
        opd = build_opd_batch(batch, pad_token_id=tokenizer.pad_token_id)
        metrics = run_step(student, teacher, optimizer, opd, config, settings)
        return metrics, torch.cat([p.grad.flatten() for p in student.parameters()])

    warmup, warmup_grad = step(loaded_batch(path, tokenizer))
    # the same tokens as an on-policy rollout batch (what verl's agent loop hands the OPD step)
    on_policy = rollout_batch(
        [(r[stored.PROMPT_IDS], r[stored.RESPONSE_IDS], r[stored.RESPONSE_MASK]) for r in rows]
    )
    opd_step, opd_grad = step(on_policy)
    assert warmup["opd/divergence/forward_kl"] == pytest.approx(
        opd_step["opd/divergence/forward_kl"], rel=1e-6
    )
    assert torch.allclose(warmup_grad, opd_grad, rtol=1e-5, atol=1e-9)
    reference = full_vocabulary_forward_kl(student, teacher, rows)
    # the step keeps the teacher's signal in 16 bits between its two phases (2H bytes per token): 1e-3
    assert warmup["opd/divergence"] == pytest.approx(reference, rel=1e-3)
    assert reference > 0.01  # two different models: a loss that is not trivially zero


def test_a_plain_data_file_is_refused_as_rollouts_with_the_fix(tmp_path, tiny):
    tokenizer, _, _ = tiny
    plain = tmp_path / "train.parquet"
    pd.DataFrame([{"data_source": "x", "prompt": [{"role": "user", "content": "hi"}]}]).to_parquet(plain)
    with pytest.raises(
        stored.RolloutsError, match=r"not a rollouts file: no column\(s\).*eval.save_rollouts=true"
    ):
        stored.check_files([str(plain)])
    with pytest.raises(stored.RolloutsError, match="does not exist"):
        stored.check_files([str(tmp_path / "missing.parquet")])
    rows = stored_rows(tokenizer)
    rows[3][stored.RESPONSE_MASK] = rows[3][stored.RESPONSE_MASK][:-1]
    damaged = stored.write(tmp_path / "damaged.parquet", rows)
    with pytest.raises(stored.RolloutsError, match="row 3: .* response ids but .* mask values"):
        stored.check_files([str(damaged)])


def test_stored_rollouts_refuse_the_sampled_signal_and_repeated_rows():
    with pytest.raises(OPDConfigError, match="rollouts=stored with opd.teacher_signal=sampled"):
        OPDConfig(rollouts="stored", teacher_signal="sampled")
    with pytest.raises(OPDConfigError, match="opd.rollouts=own: choose one of"):
        OPDConfig(rollouts="own")
    actor_rollout_ref = {
        "actor": {"ppo_micro_batch_size_per_gpu": 2},
        "rollout": {"n": 4},
        "model": {},
    }
    with pytest.raises(OPDConfigError, match="set actor_rollout_ref.rollout.n=1"):
        check_trainer(OPDConfig(rollouts="stored"), actor_rollout_ref)
    actor_rollout_ref["rollout"]["n"] = 1
    check_trainer(OPDConfig(rollouts="stored"), actor_rollout_ref)
