"""Tiny Qwen2 models, supervised fine-tuning on the arithmetic task, and batched greedy evaluation on CPU."""

from __future__ import annotations

import math
import time
from dataclasses import asdict
from pathlib import Path

import torch
from transformers import AutoTokenizer, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from opd.tiny.recipe import ModelSpec, SFTRecipe
from opd.tiny.task import extract_boxed, read_split, response_for

IGNORE_INDEX = -100
MAX_NEW_TOKENS = 16


def make_model(
    spec: ModelSpec,
    tokenizer: PreTrainedTokenizerFast,
    seed: int,
    max_positions: int = 512,
    tie_embeddings: bool = True,
) -> Qwen2ForCausalLM:
    """A freshly initialised Qwen2ForCausalLM with the tokenizer's special ids (embeddings tied unless
    ``tie_embeddings=False``)."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        max_position_embeddings=max_positions,
        tie_word_embeddings=tie_embeddings,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        use_sliding_window=False,
        dtype="float32",
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.generation_config.bos_token_id = tokenizer.pad_token_id
    model.generation_config.do_sample = False
    return model


def count_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def prompt_ids(tokenizer: PreTrainedTokenizerFast, prompts: list[list[dict]]) -> list[list[int]]:
    """Chat-template token ids of each prompt, ending with the assistant generation prompt."""
    texts = [tokenizer.apply_chat_template(p, add_generation_prompt=True, tokenize=False) for p in prompts]
    return tokenizer(texts, add_special_tokens=False)["input_ids"]


def sft_tensors(
    tokenizer: PreTrainedTokenizerFast, prompts: list[list[dict]], answers: list[str]
) -> dict[str, torch.Tensor]:
    """Right-padded input_ids/attention_mask/labels; the loss covers the response and its closing eos."""
    responses = tokenizer([response_for(a) for a in answers], add_special_tokens=False)["input_ids"]
    rows = [
        (p, r + [tokenizer.eos_token_id])
        for p, r in zip(prompt_ids(tokenizer, prompts), responses, strict=True)
    ]
    length = max(len(p) + len(r) for p, r in rows)
    input_ids = torch.full((len(rows), length), tokenizer.pad_token_id, dtype=torch.long)
    labels = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
    for i, (p, r) in enumerate(rows):
        n = len(p) + len(r)
        input_ids[i, :n] = torch.tensor(p + r)
        labels[i, len(p) : n] = torch.tensor(r)
        attention_mask[i, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def generate_greedy(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[list[dict]],
    batch_size: int = 256,
) -> list[str]:
    """Greedy completions (left-padded batches, stop at eos), decoded without special tokens."""
    was_training = model.training
    model.eval()
    ids = prompt_ids(tokenizer, prompts)
    texts = []
    for start in range(0, len(ids), batch_size):
        chunk = ids[start : start + batch_size]
        width = max(len(x) for x in chunk)
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(x)) + x for x in chunk])
        attention_mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in chunk])
        out = model.generate(
            input_ids=input_ids.to(model.device),
            attention_mask=attention_mask.to(model.device),
            max_new_tokens=MAX_NEW_TOKENS,
            do_sample=False,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        for row in out[:, width:].cpu().tolist():
            ended = tokenizer.eos_token_id in row
            row = row[: row.index(tokenizer.eos_token_id)] if ended else row
            texts.append((tokenizer.decode(row, skip_special_tokens=True), ended))
    model.train(was_training)
    return texts


def evaluate(
    model: Qwen2ForCausalLM, tokenizer: PreTrainedTokenizerFast, prompts: list[list[dict]], answers: list[str]
) -> dict[str, float]:
    """Exact-answer accuracy of greedy decoding, and the share of replies with a boxed answer and an eos."""
    completions = generate_greedy(model, tokenizer, prompts)
    boxed = [extract_boxed(text) if ended else None for text, ended in completions]
    return {
        "val_accuracy": sum(b == a for b, a in zip(boxed, answers, strict=True)) / len(answers),
        "format_rate": sum(b is not None for b in boxed) / len(answers),
    }


def learning_rate(step: int, recipe: SFTRecipe) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak at ``max_steps``."""
    if step < recipe.warmup_steps:
        return recipe.lr * (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.max_steps - recipe.warmup_steps)
    return recipe.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * min(1.0, progress))))


def sft(
    model: Qwen2ForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    train: dict[str, torch.Tensor],
    val_prompts: list[list[dict]],
    val_answers: list[str],
    recipe: SFTRecipe,
    seed: int,
    name: str,
    evaluate_fn=None,
    loss_fn=None,
) -> dict:
    """Train until val accuracy lands in ``recipe.stop_band``; returns the final evaluation and step count.

    ``evaluate_fn(model) -> {"val_accuracy", "format_rate"}`` replaces the arithmetic task's evaluation
    (the agent task evaluates through the tool agent loop); ``loss_fn(model, batch) -> loss`` replaces the
    model's own loss (the agent task's skips padding and the unlabelled positions' logits)."""
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=(0.9, 0.98), weight_decay=0.0)
    low, high = recipe.stop_band
    n_rows = train["input_ids"].shape[0]
    order = torch.randperm(n_rows, generator=generator)
    cursor, below_band, result = 0, None, None
    started = time.perf_counter()
    model.train()
    for step in range(1, recipe.max_steps + 1):
        if cursor + recipe.batch_size > n_rows:
            order, cursor = torch.randperm(n_rows, generator=generator), 0
        batch = {k: v[order[cursor : cursor + recipe.batch_size]].to(model.device) for k, v in train.items()}
        cursor += recipe.batch_size
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step - 1, recipe)
        loss = loss_fn(model, batch) if loss_fn else model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % recipe.eval_every and step != recipe.max_steps:
            continue
        scores = evaluate_fn(model) if evaluate_fn else evaluate(model, tokenizer, val_prompts, val_answers)
        elapsed = time.perf_counter() - started
        print(
            f"[{name}] step {step:5d}  loss {loss.item():.4f}  val_acc {scores['val_accuracy']:.3f}  "
            f"format {scores['format_rate']:.3f}  {elapsed:6.1f}s"
            + "".join(f"  {k} {v}" for k, v in scores.items() if k not in ("val_accuracy", "format_rate")),
            flush=True,
        )
        result = {**scores, "steps": step}
        if scores["format_rate"] < recipe.min_format_rate:
            continue
        if low <= scores["val_accuracy"] <= high:
            break
        if scores["val_accuracy"] < low:
            below_band = (result, {k: v.clone() for k, v in model.state_dict().items()})
        elif below_band is not None:
            result, state = below_band
            model.load_state_dict(state)
            print(f"[{name}] overshot the band; rolled back to step {result['steps']}", flush=True)
            break
    model.eval()
    return {**result, "train_seconds": round(time.perf_counter() - started, 1)}


def train_and_save(role: str, build_dir: str, spec: ModelSpec, recipe: SFTRecipe, seed: int) -> dict:
    """Worker (one process per model): SFT a fresh model on the written train split, save it next to the
    tokenizer already in ``build_dir/role``, and return its metrics.

    Each worker uses a single thread: two single-threaded processes use both cores without the
    oversubscription stalls that multi-threaded torch suffers when other jobs share the CPU.
    """
    torch.set_num_threads(1)
    root = Path(build_dir)
    tokenizer = AutoTokenizer.from_pretrained(root / role)
    train_prompts, train_answers = read_split(root / "data", "train")
    val_prompts, val_answers = read_split(root / "data", "val")
    model = make_model(spec, tokenizer, seed)
    train = sft_tensors(tokenizer, train_prompts, train_answers)
    metrics = sft(model, tokenizer, train, val_prompts, val_answers, recipe, seed, role)
    model.save_pretrained(root / role)
    return {**metrics, "params": count_params(model), **asdict(spec)}
