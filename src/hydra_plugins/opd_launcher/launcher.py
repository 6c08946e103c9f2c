"""hydra-submitit-launcher, made to write every run directory before anything is submitted.

The plugin's own launcher composes each sweep point only inside the job. Ours composes and checks all
points on the login node first (``opd.launch.rundir.prepare``): a bad point refuses the whole sweep
before anything is queued, and each run directory exists (with its ``rerun.sbatch``) from the start.
On SLURM the points are submitted as one job array per distinct scheduler request, each request taken
from the point's own run directory (``opd.launch.sbatch``): a sweep over ``resources=`` asks each point's
resources, exactly as its ``rerun.sbatch`` does. After submission it writes ``SWEEP_DIR/jobs.tsv`` (job
id, run directory, overrides), which ``opd.launch.sweep`` waits for, then blocks until the jobs end, as
the plugin does. A point whose run fails ends its job with a non-zero exit (sacct: FAILED).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, JobStatus
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf, open_dict

from opd.launch import JOBS_FILE, REFUSED_FILE, sbatch, snapshot
from opd.launch.rundir import SubmissionError, prepare

log = logging.getLogger(__name__)
COMPOSE_WORKERS = min(8, os.cpu_count() or 1)


def run_dir_of(sweep_config) -> Path:
    return Path(sweep_config.hydra.sweep.dir) / str(sweep_config.hydra.sweep.subdir)


class PointFailed(RuntimeError):
    """A sweep point's run failed; raised in its job so that SLURM records the job as FAILED."""


class _PrepareFirst:
    def __call__(self, *args, **kwargs) -> JobReturn:
        """The job's task. Hydra's ``run_job`` returns a failed task as a JobReturn instead of raising,
        which would end the job with exit 0 (COMPLETED): raise it instead."""
        result = super().__call__(*args, **kwargs)
        if result.status == JobStatus.FAILED:
            error = result._return_value
            print(f"error: {error}", flush=True)
            raise PointFailed(str(error)) from error
        return result

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        points, created = [], []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            sweep_config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            with open_dict(sweep_config.hydra.job):
                sweep_config.hydra.job.num = idx
            run_dir = run_dir_of(sweep_config)
            if not run_dir.exists():
                created.append(run_dir)
            points.append((idx, sweep_config, run_dir, list(overrides)))

        code = snapshot.take(sweep_dir / snapshot.DIRECTORY)  # one copy of the code for every point

        def prepare_point(point):
            idx, sweep_config, run_dir, overrides = point
            log.info(f"#{idx} {' '.join(overrides)}: preparing {run_dir}")
            return prepare(sweep_config, run_dir, overrides, code=code)

        # Each point's composition is a subprocess that imports verl (seconds): in parallel, a large sweep
        # is queued within the submitting command's wait.
        with ThreadPoolExecutor(max_workers=COMPOSE_WORKERS) as pool:
            futures = [pool.submit(prepare_point, point) for point in points]
            errors = [f.exception() for f in futures]
        refused = next((e for e in errors if e is not None), None)
        if refused is not None:
            for run_dir in [*created, code]:
                shutil.rmtree(run_dir, ignore_errors=True)
            if not isinstance(refused, SubmissionError):
                raise refused
            message = f"refused: {refused} (nothing was submitted)"
            (sweep_dir / REFUSED_FILE).write_text(message + "\n")
            raise SubmissionError(message) from None
        run_dirs = [f.result() for f in futures]

        job_params = [
            (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
            for idx, overrides in enumerate(job_overrides, start=initial_job_idx)
        ]
        jobs = [None] * len(job_params)
        for indices, parameters in self.arrays(run_dirs):
            executor = self.executor()
            executor.update_parameters(**parameters)
            submitted = executor.map_array(self, *zip(*(job_params[i] for i in indices), strict=True))
            for i, job in zip(indices, submitted, strict=True):
                jobs[i] = job
        lines = [
            f"{job.job_id}\t{run_dir}\t{' '.join(overrides)}\n"
            for job, run_dir, overrides in zip(jobs, run_dirs, job_overrides, strict=True)
        ]
        (sweep_dir / (JOBS_FILE + ".tmp")).write_text("".join(lines))
        (sweep_dir / (JOBS_FILE + ".tmp")).replace(sweep_dir / JOBS_FILE)
        log.info(
            f"submitted {len(jobs)} job(s): {' '.join(job.job_id for job in jobs)}; list: {sweep_dir / JOBS_FILE}"
        )
        results = []
        for job, overrides in zip(jobs, job_overrides, strict=True):
            try:
                results.append(job.results()[0])
            except Exception as error:  # the job failed: SLURM has it as FAILED; say so here too
                log.error(f"job {job.job_id} ({' '.join(overrides)}) failed: {str(error).strip()[-2000:]}")
                failed = JobReturn(overrides=list(overrides), status=JobStatus.FAILED)
                failed._return_value = error
                results.append(failed)
        return results

    def executor(self):
        raise NotImplementedError

    def arrays(self, run_dirs: list[Path]) -> list[tuple[list[int], dict]]:
        """Points grouped by their executor parameters: one submission (job array) per group."""
        groups: dict[str, tuple[list[int], dict]] = {}
        for i, run_dir in enumerate(run_dirs):
            parameters = self.point_parameters(run_dir)
            key = json.dumps(parameters, sort_keys=True, default=str)
            groups.setdefault(key, ([], parameters))[0].append(i)
        return list(groups.values())

    def point_parameters(self, run_dir: Path) -> dict:
        raise NotImplementedError


class SlurmLauncher(_PrepareFirst, submitit_launcher.SlurmLauncher):
    def executor(self):
        import submitit

        return submitit.SlurmExecutor(folder=self.params["submitit_folder"])

    def point_parameters(self, run_dir: Path) -> dict:
        """The point's own request, setup and srun options, as its ``rerun.sbatch`` has them."""
        launch = OmegaConf.to_container(OmegaConf.load(run_dir / "launch.yaml"))
        return sbatch.submitit_parameters(launch, int(self.params.get("array_parallelism", 256)))


class LocalLauncher(_PrepareFirst, submitit_launcher.LocalLauncher):
    def executor(self):
        import submitit

        return submitit.AutoExecutor(folder=self.params["submitit_folder"], cluster="local")

    def point_parameters(self, run_dir: Path) -> dict:
        """Processes on this machine: only the time limit and the base queue parameters apply."""
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        return {k: v for k, v in self.params.items() if k in base and k != "submitit_folder"}
