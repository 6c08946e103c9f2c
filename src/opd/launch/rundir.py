"""Run directories: everything a job needs and everything needed to rerun it, written before submission.

``RUN_DIR/``
  ``config.yaml``      the resolved verl config the job runs (no interpolations left)
  ``launch.yaml``      the resolved login config: experiment, resources, cluster, container, verl overrides
  ``overrides.txt``    the command-line / sweep overrides of this run, then the verl overrides they became
  ``git.txt``          commit, branch and ``git diff --stat`` of the opd checkout that submitted it
  ``environment.sh``   the allowlisted variables (``env_allowlist``) as they were at submission
  ``rerun.sbatch``     ``sbatch RUN_DIR/rerun.sbatch`` reruns exactly this job (resuming its checkpoints)
  ``logs/<job>.<n>/``  one directory per attempt: node logs, driver log, the driver's .hydra
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

import opd.config  # noqa: F401  (opd.* resolvers used by the login configs)
from opd.launch import REPO, SubmissionError, container


def _value(value) -> str:
    """A Python value as a Hydra override value (quoted where the override grammar needs it)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, list | tuple):
        return "[" + ",".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{_value(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if re.fullmatch(r"[\w./@:+\-]+", text) and text not in ("null", "true", "false"):
        return text
    # Hydra's quoted strings: backslashes are escaped only where they precede a quote (or the end).
    text = re.sub(r"(\\+)('|$)", lambda m: m.group(1) * 2 + m.group(2), text)
    return "'" + text.replace("'", "\\'") + "'"


def _flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    items = []
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            items += _flatten(value, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", value))
    return items


def tree_overrides(tree: dict) -> list[str]:
    """``key.path=value`` overrides of a nested dict's leaves (lists and empty dicts stay whole)."""
    return [f"{key}={_value(value)}" for key, value in _flatten(tree)]


def login_values(cfg: DictConfig, key: str):
    """``cfg[key]`` resolved; an unset environment variable becomes a SubmissionError naming it."""
    try:
        return OmegaConf.to_container(cfg[key], resolve=True)
    except InterpolationResolutionError as error:
        found = re.search(r"Environment variable '(\w+)' not found", str(error))
        if found:
            name = found.group(1)
            raise SubmissionError(
                f"experiment {cfg.experiment.name} needs {name}: export {name}=... before submitting "
                f"(or set the key it feeds directly, e.g. verl.<key>=...)"
            ) from None
        raise SubmissionError(f"{key}: {error}") from None


def verl_overrides(cfg: DictConfig, run_dir: Path) -> list[str]:
    """Recipe, platform and resources (stated once, in resources/), the experiment's and sweep's
    ``verl`` keys, and the run directory as verl's checkpoint/validation/metrics location."""
    resources = login_values(cfg, "resources")
    overrides = []
    if cfg.experiment.recipe:
        overrides.append(f"experiment={cfg.experiment.recipe}")
    overrides += [
        f"platform={resources['platform']}",
        f"trainer.nnodes={resources['nodes']}",
        f"trainer.n_gpus_per_node={resources['workers_per_node']}",
    ]
    overrides += tree_overrides(login_values(cfg, "verl"))
    overrides += [
        f"trainer.default_local_dir={run_dir}",
        f"trainer.validation_data_dir={run_dir / 'validation'}",
        "trainer.resume_mode=auto",  # a requeued or rerun job continues from its last checkpoint
    ]
    return overrides


def compose_verl(entry: str, overrides: list[str], out: Path, python: list[str]) -> None:
    """``python -m opd.launch.compose`` in a subprocess (verl's config tree imports torch), with
    ``python`` the interpreter's command: the submitting one, or the image's behind its exec prefix."""
    result = subprocess.run(
        [*python, "-m", "opd.launch.compose", entry, str(out), *overrides],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error:")]
        raise SubmissionError(errors[-1] if errors else "\n".join(lines[-15:]))


def git_description() -> str:
    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    sha = git("rev-parse", "HEAD")
    if not sha:
        return f"{REPO} is not a git checkout\n"
    diff = git("diff", "--stat", "HEAD")
    untracked = git("ls-files", "--others", "--exclude-standard")
    return (
        f"commit {sha}\nbranch {git('rev-parse', '--abbrev-ref', 'HEAD')}\n"
        f"dirty {'yes' if diff or untracked else 'no'}\n\n{diff}\n"
        + (f"\nuntracked:\n{untracked}\n" if untracked else "")
    )


def environment_script(allowlist: list[str]) -> str:
    lines = ["# Allowlisted variables at submission (configs/launch.yaml env_allowlist)."]
    lines += [f"export {name}={shlex.quote(os.environ[name])}" for name in allowlist if name in os.environ]
    return "\n".join(lines) + "\n"


def sbatch_options(launch: dict, run_dir: Path) -> list[str]:
    """The scheduler request, from the same resources/ and cluster/ values the launcher uses."""
    resources, cluster = launch["resources"], launch["cluster"]
    options = {
        "job-name": launch["experiment"]["name"],
        "nodes": resources["nodes"],
        "ntasks-per-node": 1,
        "cpus-per-task": resources["cpus_per_task"],
        "gpus-per-node": resources["gpus_per_node"],
        "mem": f"{resources['mem_gb']}G" if resources.get("mem_gb") else None,
        "time": resources["timeout_min"],
        "partition": cluster.get("partition"),
        "account": cluster.get("account"),
        "qos": cluster.get("qos"),
        "output": f"{run_dir}/logs/slurm-%j.out",
        "open-mode": "append",  # a requeued job appends to its log instead of truncating it
        "requeue": True,
        # USR2 to the batch shell (B:) this long before the walltime: its trap requeues the job, which
        # resumes from its last checkpoint. Only the shell: Ray and verl would die of an unhandled USR2.
        "signal": f"B:USR2@{cluster.get('signal_delay_s', 120)}",
        **cluster.get("additional_parameters", {}),
    }
    lines = []
    for key, value in options.items():
        if value is None or value is False:
            continue
        lines.append(f"#SBATCH --{key}" if value is True else f"#SBATCH --{key}={value}")
    return lines


def python_command(launch: dict, gpu: bool = True) -> list[str]:
    """The interpreter a job (or the config composition, ``gpu=False``) runs: inside the image when the
    container config names one, else the submitting Python."""
    spec = launch["container"]
    if not container.enabled(spec):
        return [launch["python"]]
    return [*container.exec_prefix(spec, launch["env_allowlist"], gpu=gpu), spec.get("python") or "python"]


def node_command(launch: dict, run_dir: Path) -> list[str]:
    return [*python_command(launch), "-m", "opd.launch.node", str(run_dir)]


def rerun_script(launch: dict, run_dir: Path) -> str:
    setup = "\n".join(launch["cluster"].get("setup") or [])
    srun = shlex.join(["srun", "--ntasks-per-node=1", "--kill-on-bad-exit=1", *node_command(launch, run_dir)])
    return f"""#!/bin/bash
{chr(10).join(sbatch_options(launch, run_dir))}
# Rerun this run exactly: sbatch {run_dir}/rerun.sbatch
# It resumes from the last checkpoint in this directory (trainer.resume_mode=auto); each attempt keeps
# its logs in logs/<job id>.<restart count>/.
set -euo pipefail
source {shlex.quote(str(run_dir / "environment.sh"))}
{setup}
requeue() {{
    echo "[rerun.sbatch] SIGUSR2 (walltime near or preemption): requeueing job $SLURM_JOB_ID; it resumes from its last checkpoint"
    scontrol requeue "$SLURM_JOB_ID"
}}
trap requeue USR2
# srun in the background: bash runs a trap only between commands, and `wait` returns on a signal.
{srun} &
srun_pid=$!
while true; do
    set +e
    wait "$srun_pid"
    code=$?
    set -e
    kill -0 "$srun_pid" 2>/dev/null || exit "$code"  # srun ended: its exit code is the job's
done
"""


def prepare(cfg: DictConfig, run_dir: Path, overrides: list[str]) -> Path:
    """Write ``run_dir`` for the login config ``cfg``; raise SubmissionError before writing anything
    a job could start from (config.yaml and rerun.sbatch are written last)."""
    run_dir = Path(run_dir).resolve()
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch --output does not create directories
    python = sys.executable
    verl = verl_overrides(cfg, run_dir)
    launch = {
        key: login_values(cfg, key) for key in ("experiment", "resources", "cluster", "container", "verl")
    }
    launch.update(python=python, repo=str(REPO), verl_overrides=verl, env_allowlist=list(cfg.env_allowlist))
    if launch["experiment"]["entry"] is None:
        raise SubmissionError("experiment.entry is not set: choose an experiment (experiment=tiny_grpo, ...)")
    spec = launch["container"]
    if container.enabled(spec):
        variables = {name: os.environ[name] for name in launch["env_allowlist"] if name in os.environ}
        container.resolve(spec, run_dir, launch["verl"], variables)
    (run_dir / "overrides.txt").write_text(
        "# login overrides\n"
        + "".join(f"{o}\n" for o in overrides)
        + "# verl overrides\n"
        + "\n".join(verl)
        + "\n"
    )
    (run_dir / "git.txt").write_text(git_description())
    (run_dir / "environment.sh").write_text(environment_script(list(cfg.env_allowlist)))
    compose_verl(
        launch["experiment"]["entry"], verl, run_dir / "config.yaml", python_command(launch, gpu=False)
    )
    if container.enabled(spec):
        container.bind_config_paths(spec, OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")))
    OmegaConf.save(OmegaConf.create(launch), run_dir / "launch.yaml")
    script = run_dir / "rerun.sbatch"
    script.write_text(rerun_script(launch, run_dir))
    script.chmod(0o755)
    return run_dir
