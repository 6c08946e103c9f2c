"""What every verl entry point does before training: check inputs, then fix Ray's settings.

Shared by ``opd.main_grpo`` and the later entry points so that a run is set up one way whatever the
algorithm. Nothing here imports verl or torch at import time.
"""

from __future__ import annotations

import json
import os
import re
import sys
from contextlib import contextmanager

from omegaconf import DictConfig, OmegaConf, open_dict

import opd.config  # noqa: F401  (registers the opd.* resolvers the recipes use)
from opd.agent.config import check_agent, write_tool_config
from opd.data.checks import InputError, as_list, check_chat_template, check_rl_parquet, resolve_model_dir


def check_inputs(config: DictConfig) -> None:
    model = config.actor_rollout_ref.model
    model_dir = resolve_model_dir(model.path)
    with open_dict(config):
        model.path = model_dir
    check_chat_template(model_dir)
    for key in ("train_files", "val_files"):
        for path in as_list(config.data.get(key)):
            check_rl_parquet(path, f"data.{key}")
    check_agent(config)


def configure_ray(config: DictConfig) -> None:
    """Explicit Ray address and, on CPU, the settings that let verl place its workers.

    A bare ``ray.init()`` attaches to whatever cluster ``/tmp/ray/ray_current_cluster`` names, possibly
    another user's: use ``RAY_ADDRESS`` (set by the in-job launcher) or start a private local cluster.
    """
    from opd.backends.cpu import ray_init_overrides

    with open_dict(config):
        ray_init = config.ray_kwargs.ray_init
        if not ray_init.get("address"):
            ray_init.address = os.environ.get("RAY_ADDRESS") or "local"
        if ray_init.get("runtime_env") is None:
            ray_init.runtime_env = {}
        # In every worker: verl's metrics file appends, the `hf` rollout is registered, and the CPU
        # adaptation applies where CUDA is absent.
        ray_init.runtime_env.worker_process_setup_hook = RAY_WORKER_SETUP
        if config.trainer.device == "cpu":
            n_workers = config.trainer.n_gpus_per_node * config.trainer.nnodes
            cpu = ray_init_overrides(n_workers)
            if ray_init.address == "local":
                ray_init.num_gpus = ray_init.get("num_gpus") or cpu["num_gpus"]
                ray_init.resources = OmegaConf.merge(cpu["resources"], ray_init.get("resources") or {})
                ray_init.num_cpus = ray_init.get("num_cpus") or cpu["num_cpus"]
                # A private CPU cluster (tests, laptops): the dashboard's processes cost ~3 CPU-seconds
                # per run and nobody looks at them; a job's cluster (RAY_ADDRESS) keeps its own settings.
                if ray_init.get("include_dashboard") is None:
                    ray_init.include_dashboard = False


METRICS_FILE = "metrics.jsonl"


# verl's loggers read where to write from these variables, in the TaskRunner actor (whose working
# directory is Ray's, not the run's): default each into the run directory unless the user set it.
LOGGER_DIRS = {"TENSORBOARD_DIR": "tensorboard", "WANDB_DIR": "."}  # W&B adds its own wandb/ below


def route_metrics_file(config: DictConfig, run_dir: str) -> str:
    """verl's ``file`` logger writes where VERL_FILE_LOGGER_PATH says, read in the TaskRunner actor:
    pass it through Ray's runtime env so every run keeps its metrics in its own run directory, and its
    TensorBoard events and W&B files (``trainer.logger``) beside them."""
    path = os.environ.get("VERL_FILE_LOGGER_PATH") or os.path.join(run_dir, METRICS_FILE)
    with open_dict(config):
        runtime_env = config.ray_kwargs.ray_init.runtime_env
        if runtime_env.get("env_vars") is None:
            runtime_env.env_vars = {}
        runtime_env.env_vars.VERL_FILE_LOGGER_PATH = os.path.abspath(path)
        for name, subdir in LOGGER_DIRS.items():
            runtime_env.env_vars[name] = os.path.abspath(
                os.environ.get(name) or os.path.join(run_dir, subdir)
            )
    return runtime_env.env_vars.VERL_FILE_LOGGER_PATH


def resume_step(config: DictConfig) -> int:
    """The step a run will resume from (0: none, it trains from scratch), read as verl will read it."""
    trainer = config.trainer
    mode = trainer.get("resume_mode", "auto")
    if mode == "disable":
        return 0
    if mode == "resume_path":
        match = re.search(r"global_step_(\d+)", str(trainer.get("resume_from_path") or ""))
        return int(match.group(1)) if match else 0
    marker = os.path.join(str(trainer.default_local_dir), "latest_checkpointed_iteration.txt")
    try:
        with open(marker) as f:
            return int(f.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def trim_metrics_file(path: str, keep_through_step: int) -> None:
    """Keep the records of steps up to ``keep_through_step`` (the checkpoint a requeued job resumes from)
    and drop the rest: those steps run again. From scratch (step 0) nothing is kept, so the metrics of an
    earlier attempt never mix with a new run's. A torn last line (a killed writer) is dropped too."""
    if not os.path.exists(path):
        return
    with open(path, "rb") as f:
        lines = f.read().splitlines(keepends=True)
    kept = []
    for line in lines if keep_through_step > 0 else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if line.endswith(b"\n") and record.get("step", 0) <= keep_through_step:
            kept.append(line)
    tmp = f"{path}.tmp"
    with open(tmp, "wb") as f:
        f.writelines(kept)
    os.replace(tmp, path)


def keep_metrics_across_attempts() -> None:
    """verl's ``file`` logger opens its file with "wb", so a requeued job's second attempt would erase the
    first attempt's metrics; append instead (the driver trimmed the file to the resumed step first)."""
    from verl.utils import tracking

    original = tracking.FileLogger.__init__
    if getattr(original, "appends", False):
        return

    def __init__(self, project_name: str, experiment_name: str):
        path = os.environ.get("VERL_FILE_LOGGER_PATH")
        if not path:
            return original(self, project_name, experiment_name)
        self.project_name, self.experiment_name, self.filepath = project_name, experiment_name, path
        self.fp = open(path, "ab", buffering=0)  # noqa: SIM115 (closed by FileLogger.finish)

    __init__.appends = True
    tracking.FileLogger.__init__ = __init__


RAY_WORKER_SETUP = "opd.runtime.setup_ray_worker"


def setup_ray_worker() -> None:
    """Ray ``worker_process_setup_hook`` of every run: metrics that survive a requeue, then the CPU
    backend's registration (which changes nothing else where CUDA is present)."""
    from opd.backends.cpu import setup_worker

    keep_metrics_across_attempts()
    setup_worker()


def prepare(config: DictConfig, run_dir: str | None = None, check=check_inputs) -> DictConfig:
    """Validate and complete a verl config in the driver; raise InputError with a clear message.

    The config is resolved here, once: Ray workers then see plain values (no ``opd.*`` resolvers needed
    there) and every check reads the values the run will use. ``check`` is the entry's ``check_config``
    (the same function ``opd.launch.compose`` runs before a job is submitted)."""
    OmegaConf.resolve(config)
    check(config)
    configure_ray(config)
    run_dir = run_dir or os.getcwd()
    write_tool_config(config, run_dir)
    trim_metrics_file(route_metrics_file(config, run_dir), resume_step(config))
    if config.trainer.device == "cpu":
        from opd.backends.cpu import setup_worker

        setup_worker()
    return config


def exit_on_input_error(error: InputError) -> None:
    print(f"error: {error}", file=sys.stderr)
    sys.exit(2)


@contextmanager
def trainer_class(cls):
    """verl's TaskRunner.run builds ``RayPPOTrainer`` by its module-level name; swap it for this process
    (a dedicated Ray actor) rather than copying verl's 100-line setup."""
    from verl.trainer import main_ppo

    original = main_ppo.RayPPOTrainer
    main_ppo.RayPPOTrainer = cls
    try:
        yield
    finally:
        main_ppo.RayPPOTrainer = original
