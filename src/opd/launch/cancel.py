"""python -m opd.launch.cancel SWEEP_OR_RUN_DIR   (make cancel SWEEP=...)

Cancel every job of a sweep (or a single submitted run) that has not finished: ``scancel`` of the job
ids in ``jobs.tsv``, pending array tasks included, then the sweep's launcher (which only waits for their
results by then). A launcher still composing its points (no ``jobs.tsv`` yet) is stopped instead, so
nothing is submitted after the cancel. Finished jobs are left as they are; prints what it cancelled.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from opd.launch import JOBS_FILE
from opd.launch.status import UNFINISHED, read_jobs, sacct_states

LAUNCHER_PID_FILE = "launcher.pid"  # in a sweep directory: the background launcher (opd.launch.sweep)


def stop_launcher(directory: Path) -> str | None:
    """SIGTERM the sweep's launcher (its own process group) if it still runs."""
    path = directory / LAUNCHER_PID_FILE
    if not path.exists():
        return None
    pid = int(path.read_text().split()[0])
    try:
        os.killpg(pid, signal.SIGTERM)
    except (ProcessLookupError, PermissionError):
        return None
    return f"stopped the launcher (pid {pid})"


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.splitlines()[0], file=sys.stderr)
        sys.exit(2)
    directory = Path(argv[0])
    if not (directory / JOBS_FILE).exists():
        stopped = stop_launcher(directory)
        if stopped:
            print(f"{stopped} before it submitted anything (no {JOBS_FILE} yet)")
            return
        print(f"error: {directory / JOBS_FILE} not found: pass a directory printed by make sweep-* or make submit",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)
    rows = read_jobs(directory)
    states = sacct_states([job for job, _, _ in rows])
    active = [job for job, _, _ in rows if states.get(job, {}).get("state", "PENDING") in UNFINISHED]
    if active:
        result = subprocess.run(["scancel", *active], capture_output=True, text=True)
        if result.returncode != 0:
            print(f"error: scancel failed: {result.stderr.strip()}", file=sys.stderr)
            sys.exit(1)
    print(f"cancelled {len(active)} of {len(rows)} job(s): {' '.join(active) or '-'}")
    stopped = stop_launcher(directory)  # it only waits for the jobs' results now
    if stopped:
        print(stopped)
    print(f"status: make status SWEEP={directory}")


if __name__ == "__main__":
    main()
