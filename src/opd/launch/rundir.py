"""Run directories: everything a job needs and everything needed to rerun it, written before submission.

``RUN_DIR/``
  ``config.yaml``      the resolved verl config the job runs (no interpolations left)
  ``launch.yaml``      the resolved login config: experiment, resources, cluster, container, verl overrides
  ``overrides.txt``    the command-line / sweep overrides of this run, then the verl overrides they became
  ``code/``            the package, job scripts and configs as submitted: what every attempt imports
                       (``opd.launch.snapshot``; a sweep's points link to one shared copy)
  ``git.txt``          commit, branch, the full diff and untracked files of the checkout that submitted it
  ``environment.sh``   the allowlisted variables (``env_allowlist``) as they were at submission
  ``rerun.sbatch``     ``sbatch RUN_DIR/rerun.sbatch`` reruns exactly this job (resuming its checkpoints)
  ``logs/<job>.<n>/``  one directory per attempt: node logs, driver log, the driver's .hydra
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import InterpolationResolutionError

import opd.config  # noqa: F401  (opd.* resolvers used by the login configs)
from opd.data.checks import DEFERRED_ENV
from opd.launch import JOBS_FILE, REPO, SubmissionError, container, sbatch, snapshot
from opd.launch.overrides import tree_overrides
from opd.launch.ray_cluster import ClusterError, PortLayout


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


def absolute_path_variables(names: list[str]) -> dict[str, str]:
    """Make the variables in ``names`` that hold a relative path to something that exists here absolute,
    in this process's environment; return the ones changed.

    The check at submission runs where the user stands, the job elsewhere (its run directory): a
    relative ``DATA_DIR`` would pass one and fail the other. A value that is no existing path (a hub
    model id, a URL) is left alone, and so is a missing path: the entry's own check names it."""
    changed = {}
    for name in names:
        value = os.environ.get(name)
        if value and "://" not in value and not os.path.isabs(value) and os.path.exists(value):
            changed[name] = os.environ[name] = os.path.abspath(value)
    return changed


def absolute_paths(tree, roots: list[str] = ()):
    """``tree`` with every string leaf that names a relative path (from here) made absolute: an existing
    one, or one under ``roots`` (the directories of the runs a chained run waits for, not written yet)."""
    if isinstance(tree, dict):
        return {key: absolute_paths(value, roots) for key, value in tree.items()}
    if isinstance(tree, list):
        return [absolute_paths(value, roots) for value in tree]
    if isinstance(tree, str) and tree and not os.path.isabs(tree) and "://" not in tree:
        # only values that look like paths: a bare word (`jsd`) that happens to name a file here stays
        absolute = os.path.abspath(tree)
        future = any(absolute.startswith(root.rstrip("/") + "/") for root in roots)
        if ("/" in tree or "." in tree) and (os.path.exists(tree) or future):
            return absolute
    return tree


def verl_overrides(cfg: DictConfig, run_dir: Path, roots: list[str] = ()) -> list[str]:
    """Recipe, platform and resources (stated once, in resources/), the experiment's and sweep's
    ``verl`` keys (relative paths made absolute), and the run directory as verl's
    checkpoint/validation/metrics location."""
    resources = login_values(cfg, "resources")
    overrides = []
    if cfg.experiment.recipe:
        overrides.append(f"experiment={cfg.experiment.recipe}")
    overrides += [
        f"platform={resources['platform']}",
        f"trainer.nnodes={resources['nodes']}",
        f"trainer.n_gpus_per_node={resources['workers_per_node']}",
    ]
    overrides += tree_overrides(absolute_paths(login_values(cfg, "verl"), roots))
    overrides += [
        f"trainer.default_local_dir={run_dir}",
        f"trainer.validation_data_dir={run_dir / 'validation'}",
        "trainer.resume_mode=auto",  # a requeued or rerun job continues from its last checkpoint
    ]
    return overrides


def upstream(directories: list[str]) -> list[dict]:
    """The runs a chained run waits for (``after=``): each directory with the job ids of its jobs.tsv."""
    from opd.launch.status import read_jobs

    runs = []
    for directory in directories:
        path = Path(directory).resolve()
        try:
            jobs = [job for job, _, _ in read_jobs(path)]
        except FileNotFoundError:
            raise SubmissionError(
                f"after={directory}: no {JOBS_FILE} there; give a directory printed by make submit or make sweep-*"
            ) from None
        runs.append({"dir": str(path), "jobs": jobs})
    return runs


def compose_verl(
    entry: str, overrides: list[str], out: Path, python: list[str], deferred: list[str] = ()
) -> None:
    """``python -m opd.launch.compose`` in a subprocess (verl's config tree imports torch), with
    ``python`` the interpreter's command: the submitting one, or the image's behind its exec prefix.
    ``deferred``: directories whose not-yet-written inputs are checked in the job instead (``after=``)."""
    env = dict(os.environ, **{DEFERRED_ENV: os.pathsep.join(deferred)}) if deferred else None
    result = subprocess.run(
        [*python, "-m", "opd.launch.compose", entry, str(out), *overrides],
        capture_output=True,
        text=True,
        env=env,
    )
    if result.returncode != 0:
        lines = [line for line in result.stderr.splitlines() if line.strip()]
        errors = [line.removeprefix("error: ") for line in lines if line.startswith("error:")]
        raise SubmissionError(errors[-1] if errors else "\n".join(lines[-15:]))


GPU_PROBE = """
import importlib.util, json, sys
try:
    import torch
    info = {"torch": torch.__version__, "cuda": torch.version.cuda}
except ImportError as error:
    info = {"torch": None, "cuda": None, "error": str(error)}
info["engines"] = {name: importlib.util.find_spec(name) is not None for name in ("sglang", "vllm")}
info["executable"] = sys.executable
print(json.dumps(info))
"""


def check_gpu_environment(python: list[str], engine: str | None, what: str) -> dict:
    """Refuse a GPU run whose job interpreter has a CPU-only torch, or lacks the rollout engine.

    The job's interpreter is the submitting Python (``container: none``) or the image's: a login node's
    ``make setup`` venv (CPU torch, no engine) would start, allocate GPUs, and fail inside the job."""
    result = subprocess.run([*python, "-c", GPU_PROBE], capture_output=True, text=True)
    lines = result.stdout.strip().splitlines()
    if result.returncode != 0 or not lines:
        raise SubmissionError(
            f"could not run the job's Python ({' '.join(python)}): {result.stderr.strip()[-500:]}"
        )
    info = json.loads(lines[-1])
    fix = (
        "build the GPU environment on a shared filesystem (make setup ENV=gpu VENV=/shared/opd-gpu) and submit "
        "with its Python, or run in the image (container=apptainer with OPD_IMAGE=...; make container-pull)"
    )
    if not info.get("cuda"):
        build = f"torch {info['torch']} (a CPU-only build)" if info.get("torch") else "no torch"
        raise SubmissionError(
            f"{what} asks for GPUs, but the job's Python ({info['executable']}) has {build}: {fix}"
        )
    if engine and engine in info["engines"] and not info["engines"][engine]:
        raise SubmissionError(
            f"{what} rolls out with {engine}, which the job's Python ({info['executable']}) cannot import: {fix} "
            f"(or choose the engine it has: verl.actor_rollout_ref.rollout.name=...)"
        )
    return info


def environment_script(allowlist: list[str]) -> str:
    lines = ["# Allowlisted variables at submission (configs/launch.yaml env_allowlist)."]
    lines += [f"export {name}={shlex.quote(os.environ[name])}" for name in allowlist if name in os.environ]
    return "\n".join(lines) + "\n"


def python_command(launch: dict, gpu: bool = True) -> list[str]:
    """The interpreter a job (or the config composition at submission, ``gpu=False``) runs: inside the
    image when the container config names one, else the submitting Python. The job runs the run's code
    snapshot (``launch["code"]``); the composition, the checkout it is taken from."""
    spec = launch["container"]
    if not container.enabled(spec):
        return [launch["python"]]
    code = launch.get("code") if gpu else None
    prefix = container.exec_prefix(spec, launch["env_allowlist"], gpu=gpu, code=code)
    return [*prefix, spec.get("python") or "python"]


def node_command(launch: dict, run_dir: Path) -> list[str]:
    return [*python_command(launch), "-m", "opd.launch.node", str(run_dir)]


def prepare(
    cfg: DictConfig,
    run_dir: Path,
    overrides: list[str],
    code: Path | None = None,
    after: list[dict] | None = None,
) -> Path:
    """Write ``run_dir`` for the login config ``cfg``; raise SubmissionError before writing anything
    a job could start from (config.yaml and rerun.sbatch are written last). ``code``: the code snapshot
    the job runs (a sweep's shared one); by default the run takes its own, ``RUN_DIR/code``. ``after``:
    the upstream runs ({"dir", "jobs"}) when the caller knows them before they are queued (a pipeline,
    which passes the dependency to sbatch itself); by default those of ``cfg.after``'s jobs.tsv files."""
    run_dir = Path(run_dir).resolve()
    absolute_path_variables(list(cfg.path_variables))
    (run_dir / "logs").mkdir(parents=True, exist_ok=True)  # sbatch --output does not create directories
    python = sys.executable
    after = after if after is not None else upstream(list(cfg.get("after") or []))
    roots = [run["dir"] for run in after]
    verl = verl_overrides(cfg, run_dir, roots)
    launch = {
        key: login_values(cfg, key) for key in ("experiment", "resources", "cluster", "container", "verl")
    }
    launch["verl"] = absolute_paths(launch["verl"], roots)
    launch["after"] = after
    # the job converts its last checkpoint to RUN_DIR/model when it ends (a pipeline stage whose model a
    # later stage reads): opd.launch.node
    launch["export_model"] = bool(cfg.get("export_model", False))
    code = snapshot.take(Path(code) if code else run_dir / snapshot.DIRECTORY).resolve()
    snapshot.link(run_dir, code)
    launch.update(
        python=python,
        repo=str(REPO),
        code=str(code),
        verl_overrides=verl,
        env_allowlist=list(cfg.env_allowlist),
    )
    if launch["experiment"]["entry"] is None:
        raise SubmissionError("experiment.entry is not set: choose an experiment (experiment=tiny_grpo, ...)")
    try:
        PortLayout.from_config(launch["cluster"].get("ray_ports"))
    except ClusterError as error:
        raise SubmissionError(str(error)) from None
    spec = launch["container"]
    if container.enabled(spec):
        variables = {name: os.environ[name] for name in launch["env_allowlist"] if name in os.environ}
        container.resolve(spec, run_dir, launch["verl"], variables)
        spec["binds"] = container.bind_list([*spec["binds"], code])
    (run_dir / "overrides.txt").write_text(
        "# login overrides\n"
        + "".join(f"{o}\n" for o in overrides)
        + "# verl overrides\n"
        + "\n".join(verl)
        + "\n"
    )
    (run_dir / "git.txt").write_text(snapshot.git_description())
    (run_dir / "environment.sh").write_text(environment_script(list(cfg.env_allowlist)))
    compose_verl(
        launch["experiment"]["entry"],
        verl,
        run_dir / "config.yaml",
        python_command(launch, gpu=False),
        deferred=[run["dir"] for run in launch["after"]],
    )
    if launch["resources"].get("gpus_per_node"):
        engine = OmegaConf.load(run_dir / "config.yaml").actor_rollout_ref.rollout.get("name")
        what = f"resources (gpus_per_node={launch['resources']['gpus_per_node']})"
        check_gpu_environment(python_command(launch, gpu=False), engine, what)
    if container.enabled(spec):
        container.bind_config_paths(spec, OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml")))
    OmegaConf.save(OmegaConf.create(launch), run_dir / "launch.yaml")
    script = run_dir / "rerun.sbatch"
    script.write_text(sbatch.rerun_script(launch, run_dir, node_command(launch, run_dir)))
    script.chmod(0o755)
    return run_dir
