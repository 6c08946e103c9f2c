"""The tiny arithmetic problems written as the raw math layout users bring (``data/README.md``).

``jobs/*.sh`` and ``make data`` read DAPO-Math / AIME / MATH-500 files; on a laptop or in CI the same
launchers run end to end on these stand-ins: training problems from the tiny train split, evaluation
problems from its held-out split, in exactly the documented raw formats (DAPO's wrapped prompts,
AIME 2024's boxed solutions, jsonl for AIME 2025 and MATH-500).
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from opd.data.math_sources import AIME24_FILE, AIME25_FILE, DAPO_FILE, DAPO_PREFIX, DAPO_SUFFIX, MATH500_FILE
from opd.tiny.task import read_split


def write_raw_layout(tiny_dir: Path, data_dir: Path, n_train: int = 64, n_eval: int = 8) -> Path:
    """Write the four raw files under ``data_dir`` from the tiny assets in ``tiny_dir``; return ``data_dir``.

    Problems keep the tiny task's own wording (its boxed instruction included), so with
    ``INSTRUCTION_VARIANT=none`` the eval prompts are exactly the ones the tiny models were trained on."""
    train_prompts, train_answers = read_split(tiny_dir / "data", "train")
    val_prompts, val_answers = read_split(tiny_dir / "data", "val")
    train = [(p[-1]["content"], a) for p, a in zip(train_prompts, train_answers, strict=True)][:n_train]
    val = [(p[-1]["content"], a) for p, a in zip(val_prompts, val_answers, strict=True)]
    if len(train) < n_train or len(val) < 3 * n_eval:
        raise ValueError(
            f"the tiny splits are too small for {n_train} training and 3 x {n_eval} eval problems"
        )
    math500, aime24, aime25 = (val[i * n_eval : (i + 1) * n_eval] for i in range(3))
    for relative in (DAPO_FILE, AIME24_FILE, AIME25_FILE, MATH500_FILE):
        (data_dir / relative).parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(
        {
            "data_source": "math_dapo",
            "prompt": [[{"role": "user", "content": f"{DAPO_PREFIX}{q}{DAPO_SUFFIX}"}] for q, _ in train],
            "ability": "math",
            "reward_model": [{"ground_truth": a, "style": "rule"} for _, a in train],
            "extra_info": [{"index": i} for i in range(len(train))],
        }
    ).to_parquet(data_dir / DAPO_FILE, index=False)
    pd.DataFrame(
        {
            "problem": [q for q, _ in aime24],
            "solution": [f"Adding the numbers gives $\\boxed{{{a}}}$." for _, a in aime24],
        }
    ).to_parquet(data_dir / AIME24_FILE, index=False)
    _write_jsonl(data_dir / AIME25_FILE, [{"problem": q, "answer": int(a)} for q, a in aime25])
    _write_jsonl(data_dir / MATH500_FILE, [{"problem": q, "answer": a, "level": 1} for q, a in math500])
    return data_dir


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
