"""python -m opd.data.prepare_grpo_data [--data-dir D] [--output-dir O] [--train-ratio 0.8] [--seed 42] [--instruction-variant boxed]

GRPO/OPD training data from the raw math datasets (layout: data/README.md): DAPO-Math-17k split into
``train.parquet`` and ``val_dapo.parquet`` by a seeded permutation, plus ``val_math500.parquet``,
``val_aime24.parquet`` and ``val_aime25.parquet``, all in verl's RL parquet format with one instruction
variant. The data dir defaults to $DATA_DIR, else ./data (so <repo>/data under `make data`); the output
dir to <data-dir>/grpo_processed. Every input is validated before anything is written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

from opd.data.checks import InputError
from opd.data.math_sources import (
    DAPO_DATA_SOURCE,
    DAPO_FILE,
    DEFAULT_VARIANT,
    EVAL_SETS,
    VARIANTS,
    add_common_arguments,
    check_files_exist,
    check_variant,
    default_data_dir,
    load_problems,
    report,
    rl_table,
    write_tables,
)
from opd.runtime import exit_on_input_error


def default_output_dir(data_dir: Path) -> Path:
    return data_dir / "grpo_processed"


def prepare_grpo_data(
    data_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    train_ratio: float = 0.8,
    seed: int = 42,
    variant: str = DEFAULT_VARIANT,
) -> dict[str, int]:
    """Write the five parquet files; return ``{file name: row count}``. Raises InputError on bad input."""
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(data_dir)
    check_variant(variant)
    if not 0 < train_ratio < 1:
        raise InputError(f"--train-ratio must lie strictly between 0 and 1, got {train_ratio}")
    check_files_exist(data_dir, [DAPO_FILE] + [raw for _, raw in EVAL_SETS.values()])

    dapo = load_problems(data_dir, DAPO_FILE)
    n_train = int(len(dapo) * train_ratio)
    if not 0 < n_train < len(dapo):
        raise InputError(
            f"{data_dir / DAPO_FILE} has {len(dapo)} rows: --train-ratio {train_ratio} leaves the "
            f"{'train' if n_train == 0 else 'val'} split empty; choose a ratio that keeps both non-empty"
        )
    order = np.random.default_rng(seed).permutation(len(dapo))
    tables = {
        "train.parquet": rl_table([dapo[i] for i in order[:n_train]], DAPO_DATA_SOURCE, "train", variant),
        "val_dapo.parquet": rl_table([dapo[i] for i in order[n_train:]], DAPO_DATA_SOURCE, "val", variant),
    }
    for name, (data_source, raw) in EVAL_SETS.items():
        tables[name] = rl_table(load_problems(data_dir, raw), data_source, "test", variant)

    write_tables({output_dir / name: table for name, table in tables.items()})
    return {name: table.num_rows for name, table in tables.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opd.data.prepare_grpo_data", description="GRPO training and validation parquet files."
    )
    add_common_arguments(parser, VARIANTS, "where to write (default: <data-dir>/grpo_processed)")
    parser.add_argument(
        "--train-ratio", "--train_ratio", dest="train_ratio", type=float, default=0.8, help="DAPO train share"
    )
    parser.add_argument("--seed", type=int, default=42, help="seed of the DAPO train/val permutation")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    output_dir = args.output_dir or default_output_dir(data_dir)
    try:
        counts = prepare_grpo_data(data_dir, output_dir, args.train_ratio, args.seed, args.variant)
    except InputError as error:
        exit_on_input_error(error)
    report(counts, output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
