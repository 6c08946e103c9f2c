"""The scheduler request of a run, stated once for both submission paths.

A run is submitted either by the sweep launcher (submitit, one job array per distinct request) or by
``sbatch RUN_DIR/rerun.sbatch`` (``make submit``, and every rerun). Both take their ``#SBATCH`` options,
the lines run before the nodes start and the ``srun`` options from the functions here, reading the run's
own ``launch.yaml`` values (its resources/ and cluster/ groups), so a sweep point's request and its
``rerun.sbatch`` cannot drift apart.
"""

from __future__ import annotations

import shlex
from pathlib import Path

# Ray opens a descriptor per worker connection and object transfer; the common soft limit of 1,024 runs
# out on an 8-GPU node. The hard limit is the most a job may raise it to without privileges.
RAISE_OPEN_FILES = 'ulimit -n "$(ulimit -Hn)" 2>/dev/null || ulimit -n 65536 2>/dev/null || true'
# Slurm 22.05-23.02: srun does not inherit the job's --cpus-per-task, and each node's task (Ray, verl and
# the rollout engine) would run pinned to one core. srun's option does it; the variable covers any srun
# started inside the job by other tools.
SRUN_CPUS = 'export SRUN_CPUS_PER_TASK="${SLURM_CPUS_PER_TASK:-}"'


def request(launch: dict) -> dict:
    """sbatch options (submitit's underscore spelling) of the run: what the scheduler allocates."""
    resources, cluster = launch["resources"], launch["cluster"]
    options = {
        "job_name": launch["experiment"]["name"],
        "nodes": resources["nodes"],
        "ntasks_per_node": 1,  # one opd.launch.node per node; it starts that node's Ray
        "cpus_per_task": resources["cpus_per_task"],
        "gpus_per_node": resources["gpus_per_node"],
        "mem": f"{resources['mem_gb']}G" if resources.get("mem_gb") else None,
        "time": resources["timeout_min"],
        "partition": cluster.get("partition"),
        "account": cluster.get("account"),
        "qos": cluster.get("qos"),
        "requeue": True,  # a requeued job resumes from its last checkpoint (trainer.resume_mode=auto)
        # USR2 to the job step's processes this long before the walltime: opd.launch.node asks the
        # trainer to save at the end of the current step, then requeues the job (opd.launch.node). Not to
        # the batch shell (no B:), so the node sees it on both submission paths.
        "signal": f"USR2@{cluster.get('signal_delay_s', 120)}",
        **(cluster.get("additional_parameters") or {}),
    }
    after = [job for run in launch.get("after") or [] for job in run["jobs"]]
    if after:
        options["dependency"] = "afterok:" + ":".join(after)  # every job of every upstream run completed
        options["kill_on_invalid_dep"] = (
            "yes"  # an upstream failure cancels this job instead of leaving it pending
        )
    return {key: value for key, value in options.items() if value is not None and value is not False}


def option_lines(options: dict) -> list[str]:
    """``#SBATCH --key=value`` lines (``True``: a bare ``--key``), as submitit writes them."""
    lines = []
    for key, value in options.items():
        flag = key.replace("_", "-")
        lines.append(f"#SBATCH --{flag}" if value is True else f"#SBATCH --{flag}={value}")
    return lines


def srun_options(launch: dict) -> list[str]:
    """Options of the srun that starts one ``opd.launch.node`` per node (submitit adds its own first)."""
    return [
        "--kill-on-bad-exit=1",  # one node's task failing ends the others at once instead of at the walltime
        f"--cpus-per-task={launch['resources']['cpus_per_task']}",
    ]


def setup_lines(launch: dict) -> list[str]:
    """Shell lines run in the batch script before the nodes start: ours, the cluster's own, then the
    run's code snapshot first on PYTHONPATH (after ``module load`` lines that may set it)."""
    code = (
        [f'export PYTHONPATH="{launch["code"]}/src${{PYTHONPATH:+:$PYTHONPATH}}"']
        if launch.get("code")
        else []
    )
    return [RAISE_OPEN_FILES, SRUN_CPUS, *(launch["cluster"].get("setup") or []), *code]


def submitit_parameters(launch: dict, array_parallelism: int) -> dict:
    """``submitit.SlurmExecutor.update_parameters`` arguments that make its sbatch file carry ``request``.

    Every option goes through ``slurm_additional_parameters``, which submitit applies last, so its own
    defaults (a 5-minute time limit, one node, its signal) never leak into the request. ``wckey`` is
    dropped: submitit's default ``--wckey=submitit`` is refused on sites that enforce their own keys."""
    return {
        "time": launch["resources"]["timeout_min"],
        "additional_parameters": request(launch),
        "setup": setup_lines(launch),
        "srun_args": srun_options(launch),
        "wckey": None,  # AutoExecutor would drop a None and write submitit's default
        "array_parallelism": array_parallelism,
        "stderr_to_stdout": True,
    }


def rerun_script(launch: dict, run_dir: Path, node_command: list[str]) -> str:
    """``rerun.sbatch``: the run as one job, with the same request, setup and srun as a sweep point."""
    options = {
        **request(launch),
        "output": f"{run_dir}/logs/slurm-%j.out",
        "open_mode": "append",  # a requeued job appends to its log instead of truncating it
    }
    srun = shlex.join(["srun", "--ntasks-per-node=1", *srun_options(launch), *node_command])
    setup = "\n".join(setup_lines(launch))
    return f"""#!/bin/bash
{chr(10).join(option_lines(options))}
# Rerun this run exactly: sbatch {run_dir}/rerun.sbatch
# It resumes from the last checkpoint in this directory (trainer.resume_mode=auto); each attempt keeps
# its logs in logs/<job id>.<restart count>/. On the walltime signal the node saves the current step and
# requeues the job (opd.launch.node), within cluster.max_requeues.
set -euo pipefail
source {shlex.quote(str(run_dir / "environment.sh"))}
{setup}
exec {srun}
"""
