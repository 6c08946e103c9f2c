"""python -m opd.launch.status SWEEP_OR_RUN_DIR   (make status SWEEP=...)

One line per job of a sweep (or a single submitted run): SLURM state and exit code from sacct (the
accounting database, so finished, failed and requeued jobs are included), elapsed time, the last
training step in the run's metrics, run directory and sweep point; under a job that did not complete,
its error and where the log is; then the count per state.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

from opd.launch import JOBS_FILE

ARRAY = re.compile(r"^(\d+)_\[([^\]]+)\]$")
UNFINISHED = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "SUSPENDED", "RESIZING"}


def array_task_ids(job_id: str) -> list[str]:
    """``123_[0-2,5%4]`` (how sacct and squeue show an array's tasks that have not started) -> the task
    ids ``123_0 123_1 123_2 123_5``; any other id -> itself."""
    match = ARRAY.match(job_id)
    if not match:
        return [job_id]
    array, spec = match.group(1), match.group(2).split("%")[0]
    ids = []
    for part in spec.split(","):
        low, _, high = part.partition("-")
        ids += [f"{array}_{n}" for n in range(int(low), int(high or low) + 1)]
    return ids


def parse_sacct(text: str) -> dict[str, dict[str, str]]:
    """``sacct -X -n -P -o JobID,State,ExitCode,Elapsed,NodeList`` lines -> job id -> its fields, with
    pending array ranges expanded to their tasks."""
    states = {}
    for line in text.splitlines():
        if not line.strip():
            continue
        job, state, exit_code, elapsed, nodes = line.split("|")
        for task in array_task_ids(job):
            states[task] = {"state": state.split()[0], "exit": exit_code, "elapsed": elapsed, "nodes": nodes}
    return states


def sacct_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """job id -> {state, exit, elapsed, nodes} of the job allocations (-X: not their steps), array tasks
    by their own ids (123_4) whether they started or not."""
    fields = ["JobID", "State", "ExitCode", "Elapsed", "NodeList"]
    # an array's tasks that have not started are one record of the array (123_[1-3]): ask for it too
    arrays = [job.split("_")[0] for job in job_ids if "_" in job]
    result = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-j", ",".join(dict.fromkeys([*job_ids, *arrays])), "-o", ",".join(fields)],
        capture_output=True, text=True,
    )  # fmt: skip
    if result.returncode != 0:
        raise RuntimeError(
            f"sacct failed: {result.stderr.strip()} (is SLURM accounting reachable? SLURM_CONF?)"
        )
    states = parse_sacct(result.stdout)
    for job in job_ids:  # tasks of an array cancelled before they started are one record: the array's
        array = job.split("_")[0]
        if job not in states and "_" in job and array in states:
            states[job] = states[array]
    missing = [job for job in job_ids if job not in states]
    if missing:  # submitted a moment ago: not in the accounting database yet, but slurmctld knows them
        states.update(squeue_states(missing))
    return states


def squeue_states(job_ids: list[str]) -> dict[str, dict[str, str]]:
    """slurmctld's live view (-r: array tasks one per line) of jobs that accounting does not list yet."""
    result = subprocess.run(
        ["squeue", "-h", "-r", "-j", ",".join(job_ids), "-o", "%i|%T|%M"], capture_output=True, text=True
    )
    states = {}
    for line in result.stdout.splitlines() if result.returncode == 0 else []:
        job, state, elapsed = line.split("|")
        states[job] = {"state": state, "exit": "", "elapsed": elapsed, "nodes": ""}
    return states


def last_step(run_dir: Path) -> int | None:
    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return None
    steps = []
    for line in path.read_text().splitlines():
        try:
            steps.append(json.loads(line).get("step"))
        except ValueError:  # a line being written
            continue
    return max((s for s in steps if s is not None), default=None)


def failure(run_dir: Path, job_id: str) -> str:
    """What the job's last attempt recorded (``done.json``), or where its log is."""
    attempts = sorted(
        (run_dir / "logs").glob(f"{job_id}.*/done.json"), key=lambda p: int(p.parent.name.rsplit(".", 1)[1])
    )
    if attempts:
        error = json.loads(attempts[-1].read_text()).get("error")
        if error:
            return error
    for log in [
        run_dir / "logs" / f"slurm-{job_id}.out",
        *run_dir.parent.glob(f".submitit/{job_id}/*_log.out"),
    ]:
        if log.exists():
            return f"no error recorded by the node; see {log}"
    return f"no error recorded; see {run_dir / 'logs'}"


def upstream_runs(run_dir: Path) -> list[dict]:
    """The runs this run waits for (``after=``, recorded in its launch.yaml)."""
    import yaml

    path = run_dir / "launch.yaml"
    if not path.exists():
        return []
    return (yaml.safe_load(path.read_text()) or {}).get("after") or []


def chain_lines(run_dir: Path, state: str) -> list[str]:
    """For a chained run that has not run: what it waits for, or which upstream job cancelled it."""
    runs = upstream_runs(run_dir)
    if not runs or state not in {"PENDING", "CANCELLED"}:
        return []
    jobs = [job for run in runs for job in run["jobs"]]
    states = sacct_states(jobs)
    lines = []
    for run in runs:
        for job in run["jobs"]:
            upstream = states.get(job, {}).get("state", "UNKNOWN")
            if state == "PENDING":
                lines.append(f"after: job {job} ({upstream}) of {run['dir']}")
            elif upstream not in UNFINISHED | {"COMPLETED"}:
                lines.append(f"cancelled: job {job} of {run['dir']}, which it runs after, ended {upstream}")
    return lines


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
        if info["state"] not in UNFINISHED | {"COMPLETED", "UNKNOWN", "CANCELLED"}:
            print(f"{'':<12} error: {failure(run_dir, job_id)}")
        for line in chain_lines(run_dir, info["state"]):
            print(f"{'':<12} {line}")
    print(", ".join(f"{n} {state}" for state, n in sorted(counts.items())))


if __name__ == "__main__":
    main()
