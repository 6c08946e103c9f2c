"""python -m opd.data.process_eval_data [--data-dir D] [--output-dir O] [--instruction-variant boxed|dapo|none|all]

Evaluation sets (MATH-500, AIME 2024, AIME 2025) in verl's RL parquet format under one instruction variant,
or all of them: the same problems with different instructions measure how much a score owes to the prompt.
Writes ``val_math500.parquet``, ``val_aime24.parquet`` and ``val_aime25.parquet`` to
<data-dir>/eval_processed/<variant> (with ``all``: one such folder per variant, under --output-dir if given).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd.data.checks import InputError
from opd.data.math_sources import (
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


def default_output_dir(data_dir: Path, variant: str) -> Path:
    return data_dir / "eval_processed" / ("" if variant == "all" else variant)


def process_eval_data(
    data_dir: str | Path | None = None, output_dir: str | Path | None = None, variant: str = DEFAULT_VARIANT
) -> dict[str, int]:
    """Write the evaluation files; return ``{path relative to output_dir: row count}``.

    With ``variant="all"`` ``output_dir`` (default <data-dir>/eval_processed) is the parent of one folder
    per variant; otherwise the files go straight into it (default <data-dir>/eval_processed/<variant>).
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir()
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(data_dir, variant)
    variants = VARIANTS if variant == "all" else (variant,)
    if variant != "all":
        check_variant(variant)
    check_files_exist(data_dir, [raw for _, raw in EVAL_SETS.values()])
    problems = {name: load_problems(data_dir, raw) for name, (_, raw) in EVAL_SETS.items()}

    tables = {}
    for each in variants:
        folder = Path(each) if variant == "all" else Path()
        for name, (data_source, _) in EVAL_SETS.items():
            tables[folder / name] = rl_table(problems[name], data_source, "test", each)
    write_tables({output_dir / relative: table for relative, table in tables.items()})
    return {str(relative): table.num_rows for relative, table in tables.items()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opd.data.process_eval_data",
        description="Evaluation parquet files per instruction variant.",
    )
    add_common_arguments(
        parser,
        (*VARIANTS, "all"),
        "where to write (default: <data-dir>/eval_processed/<variant>; with `all`, the parent of the variant folders)",
    )
    args = parser.parse_args(argv)
    data_dir = args.data_dir or default_data_dir()
    output_dir = args.output_dir or default_output_dir(data_dir, args.variant)
    try:
        counts = process_eval_data(data_dir, output_dir, args.variant)
    except InputError as error:
        exit_on_input_error(error)
    report(counts, output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
