"""python -m opd.tiny build [OUT_DIR] [--seed 0] [--force] [--task math|agent]
python -m opd.tiny data DATA_DIR

``build``: build (or reuse) the tiny offline assets: tokenizer, arithmetic parquet data, teacher and
student models. Without OUT_DIR the assets go to $OPD_TINY_DIR, else ~/.cache/opd/tiny/<key>.
``--task agent`` builds the tiny agent task instead (``opd.tiny.agent_build``: generated DeepPlanning-layout
databases, tool-agent rows, a tool-calling teacher and a lagging student) into $OPD_TINY_AGENT_DIR, else
~/.cache/opd/tiny-agent/<key>.
``data``: the tiny problems in the math recipes' raw layout under DATA_DIR, processed like `make data`
(grpo_processed/, eval_processed/<variant>/), so every math experiment runs at tiny size with DATA_DIR.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd.tiny.builder import build, default_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opd.tiny", description="Tiny offline assets (tokenizer, data, teacher, student)."
    )
    commands = parser.add_subparsers(dest="command", required=True)
    build_parser = commands.add_parser("build", help="build the assets, or reuse a matching build")
    build_parser.add_argument(
        "out_dir",
        nargs="?",
        type=Path,
        help="target directory (default: $OPD_TINY_DIR or ~/.cache/opd/tiny/<key>)",
    )
    build_parser.add_argument("--seed", type=int, default=0, help="seed for data, tokenizer and training")
    build_parser.add_argument("--force", action="store_true", help="rebuild even if a matching build exists")
    build_parser.add_argument(
        "--task", choices=("math", "agent"), default="math", help="math (default) | agent: the tool-use task"
    )
    data_parser = commands.add_parser("data", help="tiny problems in the math layout, processed")
    data_parser.add_argument("data_dir", type=Path, help="becomes DATA_DIR of tiny math runs")
    args = parser.parse_args(argv)
    if args.command == "data":
        return write_tiny_math_data(args.data_dir)
    if args.task == "agent":
        from opd.tiny.agent_build import build_agent, default_agent_dir

        builder, out_dir = (
            build_agent,
            args.out_dir if args.out_dir is not None else default_agent_dir(args.seed),
        )
    else:
        builder, out_dir = build, args.out_dir if args.out_dir is not None else default_dir(args.seed)
    try:
        builder(out_dir, seed=args.seed, force=args.force)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


def write_tiny_math_data(data_dir: Path) -> int:
    from opd.data.prepare_grpo_data import prepare_grpo_data
    from opd.data.process_eval_data import process_eval_data
    from opd.tiny.raw_layout import write_raw_layout

    assets = default_dir()
    build(assets)
    write_raw_layout(assets, data_dir)
    prepare_grpo_data(data_dir)
    process_eval_data(data_dir, variant="all")
    print(f"tiny math data: {data_dir}/{{grpo_processed,eval_processed}} (export DATA_DIR={data_dir})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
