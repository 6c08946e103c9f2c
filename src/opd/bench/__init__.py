"""Benchmarks: runnable comparisons that print tables and write JSON under outputs/bench (not tests)."""

from __future__ import annotations

import json
import subprocess
import sys


def run_child(module: str, args: list[str]) -> dict:
    """``python -m module *args`` in a fresh process (clean memory accounting); its last stdout line is JSON."""
    proc = subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark child {module} {args} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
