"""python -m opd.tiny build [OUT_DIR] [--seed 0] [--force]

Build (or reuse) the tiny offline assets: tokenizer, arithmetic parquet data, teacher and student models.
Without OUT_DIR the assets go to $OPD_TINY_DIR, else ~/.cache/opd/tiny/<key>.
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
    args = parser.parse_args(argv)
    out_dir = args.out_dir if args.out_dir is not None else default_dir(args.seed)
    try:
        build(out_dir, seed=args.seed, force=args.force)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
