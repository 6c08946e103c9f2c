"""The raw math datasets, their instruction variants and verl's RL parquet format: the one home shared by
``opd.data.prepare_grpo_data`` and ``opd.data.process_eval_data``, so training and evaluation prompts can
never drift apart.

Every raw file is validated completely before anything is written; problems surface as ``InputError``
naming the file, the row (parquet, 0-based) or line (jsonl, 1-based) and the fix.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
from pathlib import Path
from typing import NamedTuple

import pyarrow as pa
import pyarrow.parquet as pq

from opd.data.checks import InputError
from opd.rewards.boxed import last_boxed

DAPO_PREFIX = (
    "Solve the following math problem step by step. The last line of your response should be of the form "
    "Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n"
)
DAPO_SUFFIX = '\n\nRemember to put your answer on its own line after "Answer:".'
BOXED_INSTRUCTION = "Let's think step by step and output the final answer within \\boxed{}."
VARIANTS = ("boxed", "dapo", "none")
DEFAULT_VARIANT = "boxed"

# Raw files, relative to DATA_DIR.
DAPO_FILE = "DAPO-Math-17k-dedup/distinct-prompts-with-rewards.parquet"
AIME24_FILE = "AIME_2024/aime_2024_problems.parquet"
AIME25_FILE = "AIME_2025/train.jsonl"
MATH500_FILE = "MATH-500/test.jsonl"
# Evaluation outputs: file name -> (data_source, raw file). data_source names are the seed's; metrics key on them.
EVAL_SETS = {
    "val_math500.parquet": ("math", MATH500_FILE),
    "val_aime24.parquet": ("aime24", AIME24_FILE),
    "val_aime25.parquet": ("aime25", AIME25_FILE),
}
DAPO_DATA_SOURCE = "math_dapo"

# Where each raw file keeps its question and answer. Answers are tried in order, per row:
# "value" is the field itself, "ground_truth" the field's `ground_truth` key, "boxed" the last \boxed{} in it.
_FIELDS = {
    DAPO_FILE: ("prompt", (("reward_model", "ground_truth"), ("answer", "value"), ("solution", "boxed"))),
    AIME24_FILE: ("problem", (("answer", "value"), ("solution", "boxed"))),
    AIME25_FILE: ("problem", (("answer", "value"),)),
    MATH500_FILE: ("problem", (("answer", "value"),)),
}
_ANSWER_LABELS = {
    "value": "`{}` is empty",
    "ground_truth": "`{}.ground_truth` is empty",
    "boxed": "`{}` has no \\boxed{{}}",
}

RL_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        ("extra_info", pa.struct([("index", pa.int64()), ("split", pa.string())])),
    ]
)


class Problem(NamedTuple):
    index: int  # row index in the raw file (jsonl: index among its non-blank lines)
    question: str
    answer: str


def default_data_dir() -> Path:
    """$DATA_DIR if set, else ./data: `make data` runs from the repository root, so that is <repo>/data."""
    return Path(os.environ.get("DATA_DIR") or Path.cwd() / "data")


def check_variant(variant: str) -> None:
    if variant not in VARIANTS:
        raise InputError(
            f"unknown instruction variant {variant!r}: use --instruction-variant with one of {', '.join(VARIANTS)}"
        )


def with_instruction(question: str, variant: str) -> str:
    """The user message for ``question`` under one instruction variant."""
    check_variant(variant)
    question = question.rstrip()
    if variant == "boxed":
        return f"{question}\n\n{BOXED_INSTRUCTION}"
    if variant == "dapo":
        return f"{DAPO_PREFIX}{question}{DAPO_SUFFIX}"
    return question


def strip_dapo_instruction(text: str) -> str:
    """The bare question of a DAPO prompt, so our own instruction variant can be applied instead."""
    text = text.removeprefix(DAPO_PREFIX)
    return text.removesuffix(DAPO_SUFFIX)


def _layout(data_dir: Path) -> str:
    files = (DAPO_FILE, AIME24_FILE, AIME25_FILE, MATH500_FILE)
    return f"expected raw layout under {data_dir}:\n" + "\n".join(f"  {data_dir / f}" for f in files)


def check_files_exist(data_dir: Path, files) -> None:
    missing = [str(data_dir / f) for f in files if not (data_dir / f).is_file()]
    if missing:
        raise InputError(
            f"missing raw data file(s): {', '.join(missing)}\n{_layout(data_dir)}\n"
            "put the files there, or point DATA_DIR / --data-dir at the folder that holds them "
            "(see data/README.md; nothing is downloaded)"
        )


def load_problems(data_dir: Path, raw_file: str) -> list[Problem]:
    """Every problem of one raw file, validated; raise InputError on the first bad row or line."""
    path = data_dir / raw_file
    question_field, answer_fields = _FIELDS[raw_file]
    rows = (
        _read_jsonl(path) if path.suffix == ".jsonl" else _read_parquet(path, question_field, answer_fields)
    )
    if not rows:
        raise InputError(f"{path} has no rows: re-export the complete dataset into it")
    is_dapo = raw_file == DAPO_FILE
    problems = []
    for index, (where, row) in enumerate(rows):
        if question_field not in row or not any(f in row for f, _ in answer_fields):  # jsonl: per line
            raise InputError(
                f"{path} {where} lacks a required field: it needs `{question_field}` and "
                f"`{answer_fields[0][0]}`; found {sorted(row)}. Write each line as "
                '{"problem": "...", "answer": "42"}'
            )
        question = _question(row[question_field], is_dapo)
        if question is None:
            raise InputError(
                f"{path} {where} has an empty or missing {question_field}: fill in the problem text or drop the row"
            )
        answer = next((a for f, kind in answer_fields if (a := _answer(row.get(f), kind)) is not None), None)
        if answer is None:
            tried = "; ".join(_ANSWER_LABELS[kind].format(f) for f, kind in answer_fields if f in row)
            raise InputError(f"{path} {where} has no answer ({tried}): fill in the answer or drop the row")
        problems.append(Problem(index, question, answer))
    return problems


def _read_parquet(path: Path, question_field: str, answer_fields) -> list[tuple[str, dict]]:
    try:
        table = pq.read_table(path)
    except Exception as error:
        raise InputError(
            f"{path} is not a readable parquet file ({error}): re-download or re-export it as parquet"
        ) from error
    found = table.column_names
    names = {name.lower(): name for name in found}  # the public AIME 2024 copy spells them `Problem`, ...
    answer_options = [f for f, _ in answer_fields]
    if question_field not in names or not any(f in names for f in answer_options):
        need = f"`{question_field}` and one of " + ", ".join(f"`{f}`" for f in answer_options)
        raise InputError(
            f"{path} lacks a required column: it needs {need} (case-insensitive); found {found}. "
            "Re-export the dataset with those columns (see data/README.md)"
        )
    renamed = table.rename_columns([name.lower() for name in found])
    return [(f"row {i}", row) for i, row in enumerate(renamed.to_pylist())]


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    try:
        lines = path.read_text(encoding="utf-8").split("\n")  # not splitlines: U+2028 may sit in a string
    except UnicodeDecodeError as error:
        raise InputError(f"{path} is not UTF-8 text ({error}): re-export it as UTF-8 JSON lines") from error
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(
                f"{path} line {number} is not valid JSON ({error.msg}): every non-blank line must be one "
                'JSON object such as {"problem": "...", "answer": "42"}'
            ) from error
        if not isinstance(row, dict):
            raise InputError(
                f'{path} line {number} is not a JSON object: write {{"problem": "...", "answer": "42"}}'
            )
        rows.append((f"line {number}", {key.lower(): value for key, value in row.items()}))
    return rows


def _question(value, is_dapo: bool) -> str | None:
    if is_dapo and isinstance(value, (list, tuple)):  # chat messages
        value = next(
            (m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"), None
        )
    if not isinstance(value, str):
        return None
    if is_dapo:
        value = strip_dapo_instruction(value)
    return value if value.strip() else None


def _answer(value, kind: str) -> str | None:
    if kind == "ground_truth":
        value = value.get("ground_truth") if isinstance(value, dict) else None
    elif kind == "boxed":
        value = last_boxed(value) if isinstance(value, str) else None
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)  # an int column with a null reads back as float
    text = str(value).strip()
    return text or None


def rl_table(problems: list[Problem], data_source: str, split: str, variant: str) -> pa.Table:
    """Problems as rows of verl's RL parquet format."""
    rows = [
        {
            "data_source": data_source,
            "prompt": [{"role": "user", "content": with_instruction(p.question, variant)}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": p.answer},
            "extra_info": {"index": p.index, "split": split},
        }
        for p in problems
    ]
    return pa.Table.from_pylist(rows, schema=RL_SCHEMA)


def write_tables(tables: dict[Path, pa.Table]) -> None:
    """Write every table to a temporary file beside its target, then rename them all into place: an
    interrupted run leaves the previous files (or none), never a half-written one."""
    staged = []
    try:
        for path, table in tables.items():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
            os.close(fd)
            staged.append((tmp, path))
            pq.write_table(table, tmp)
        for tmp, path in staged:
            os.replace(tmp, path)
    finally:
        for tmp, _ in staged:
            if os.path.exists(tmp):
                os.remove(tmp)


def add_common_arguments(
    parser: argparse.ArgumentParser, variants: tuple[str, ...], output_help: str
) -> None:
    """--data-dir, --output-dir, --instruction-variant (underscore spellings accepted as aliases)."""
    parser.add_argument(
        "--data-dir",
        "--data_dir",
        dest="data_dir",
        type=Path,
        help="raw data folder (default: $DATA_DIR or ./data)",
    )
    parser.add_argument("--output-dir", "--output_dir", dest="output_dir", type=Path, help=output_help)
    parser.add_argument(
        "--instruction-variant",
        "--instruction_variant",
        dest="variant",
        default=DEFAULT_VARIANT,
        help=f"instruction added to each problem: {' | '.join(variants)} (default: {DEFAULT_VARIANT})",
    )


def report(counts: dict[str, int], output_dir: Path) -> None:
    for name, rows in counts.items():
        print(f"{rows:>7} rows  {name}")
    print(f"wrote {len(counts)} files to {output_dir}")
