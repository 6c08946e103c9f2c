"""python -m opd.launch.status SWEEP_OR_RUN_DIR   (make status SWEEP=...)

One line per job of a sweep (or a single submitted run): SLURM state and exit code from sacct (the
accounting database, so finished, failed and requeued jobs are included), elapsed time, the last
training step in the run's metrics, run directory and sweep point; then the count per state.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

from opd.launch import JOBS_FILE


def sacct_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """job id -> {state, exit, elapsed, nodes} of the job allocations (-X: not their steps)."""
    fields = ["JobID", "State", "ExitCode", "Elapsed", "NodeList"]
    result = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", ",".join(job_ids), "-o", ",".join(fields)],
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(
            f"sacct failed: {result.stderr.strip()} (is SLURM accounting reachable? SLURM_CONF?)"
        )
    states = {}
    for line in result.stdout.splitlines():
        job, state, exit_code, elapsed, nodes = line.split("|")
        states[job] = {"state": state.split()[0], "exit": exit_code, "elapsed": elapsed, "nodes": nodes}
    return states


def last_step(run_dir: Path) -> int | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    steps = [json.loads(line).get("step") for line in path.read_text().splitlines() if line.strip()]
    return max((s for s in steps if s is not None), default=None)


def read_jobs(directory: Path) -> list[tuple[str, Path, str]]:
    path = directory / JOBS_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: pass a directory printed by make sweep-* or make submit")
    rows = []
    for line in path.read_text().splitlines():
        job_id, run_dir, point = (line.split("\t") + [""])[:3]
        rows.append((job_id, Path(run_dir), point))
    return rows


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print(__doc__.splitlines()[0], file=sys.stderr)
        sys.exit(2)
    try:
        rows = read_jobs(Path(argv[0]))
        states = sacct_states([job_id for job_id, _, _ in rows])
    except (FileNotFoundError, RuntimeError) as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    counts = Counter()
    print(f"{'job':<12} {'state':<11} {'exit':<6} {'elapsed':<10} {'step':>5}  run directory / point")
    for job_id, run_dir, point in rows:
        info = states.get(job_id, {"state": "UNKNOWN", "exit": "", "elapsed": ""})
        counts[info["state"]] += 1
        step = last_step(run_dir)
        print(
            f"{job_id:<12} {info['state']:<11} {info['exit']:<6} {info['elapsed']:<10} "
            f"{'' if step is None else step:>5}  {run_dir}  {point}"
        )
    print(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
