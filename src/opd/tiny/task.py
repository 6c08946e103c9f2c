"""The tiny arithmetic task: 2-digit addition word problems in verl's RL parquet format.

Small enough that a ~0.5M-parameter model learns it on CPU in a couple of minutes, hard enough (carries, several
phrasings) that a smaller, briefly trained model visibly lags behind. Subtraction is left out on purpose: mixing
in a second operation doubled the steps a tiny model needs, which the CPU time budget cannot afford.
"""

from __future__ import annotations

import random
from pathlib import Path

import pandas as pd

from opd.rewards.boxed import last_boxed

DATA_SOURCE = "tiny_arith"
INSTRUCTION = "Put the final answer in \\boxed{}."

NAMES = ["Ava", "Ben", "Cleo", "Dan", "Eli", "Fay", "Gus", "Ivy", "Jon", "Kim", "Leo", "Mia", "Noa", "Sam"]
ITEMS = ["marbles", "apples", "stamps", "coins", "shells", "cards", "books", "stickers"]

TEMPLATES = [
    "{name} has {a} {item} and finds {b} more. How many {item} does {name} have now?",
    "There are {a} {item} in a box. {name} puts in {b} more. How many {item} are in the box now?",
    "{name} collected {a} {item} on Monday and {b} {item} on Tuesday. How many {item} in total?",
    "{name} buys {a} {item}, then gets {b} {item} as a gift. How many {item} does {name} have?",
    "What is {a} plus {b}?",
]


def response_for(answer: str) -> str:
    """The target assistant reply: short, because every generated token costs time in CPU rollouts."""
    return f"The answer is \\boxed{{{answer}}}."


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text``, stripped, or None when there is none."""
    found = last_boxed(text)
    return found.strip() if found is not None else None


def all_triples() -> list[tuple[int, int, str]]:
    """Every (a, b, op) the task can ask: a + b for 2-digit a and b."""
    return [(a, b, "+") for a in range(10, 100) for b in range(10, 100)]


def make_row(a: int, b: int, op: str, split: str, index: int, rng: random.Random) -> dict:
    """One verl RL row; the phrasing (template, name, item) is drawn from ``rng``."""
    if op != "+":
        raise ValueError(f"unsupported operation {op!r}")
    question = rng.choice(TEMPLATES).format(a=a, b=b, name=rng.choice(NAMES), item=rng.choice(ITEMS))
    answer = str(a + b)
    return {
        "data_source": DATA_SOURCE,
        "prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}],
        "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": answer},
        "extra_info": {"split": split, "index": index, "answer": answer},
    }


def make_splits(seed: int, n_train: int = 7000, n_val: int = 200) -> dict[str, pd.DataFrame]:
    """Deterministic train/val frames; val holds (a, b, op) triples that never occur in train."""
    rng = random.Random(seed)
    triples = all_triples()
    rng.shuffle(triples)
    if n_train + n_val > len(triples):
        raise ValueError(f"only {len(triples)} distinct problems; asked for {n_train} + {n_val}")
    chosen = {"val": triples[:n_val], "train": triples[n_val : n_val + n_train]}
    return {
        split: pd.DataFrame([make_row(a, b, op, split, i, rng) for i, (a, b, op) in enumerate(rows)])
        for split, rows in chosen.items()
    }


def write_splits(splits: dict[str, pd.DataFrame], data_dir: Path) -> dict[str, Path]:
    """Write ``{split}.parquet`` files (no index, so the bytes depend only on the rows)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split, frame in splits.items():
        paths[split] = data_dir / f"{split}.parquet"
        frame.to_parquet(paths[split], index=False)
    return paths


def read_split(data_dir: Path, split: str) -> tuple[list[list[dict]], list[str]]:
    """Chat prompts and ground-truth answers of a written split."""
    frame = pd.read_parquet(data_dir / f"{split}.parquet")
    prompts = [[dict(message) for message in prompt] for prompt in frame["prompt"]]
    return prompts, [reward["ground_truth"] for reward in frame["reward_model"]]
