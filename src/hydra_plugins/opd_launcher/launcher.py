"""hydra-submitit-launcher, made to write every run directory before anything is submitted.

The plugin's own launcher composes each sweep point only inside the job. Ours composes and checks all
points on the login node first (``opd.launch.rundir.prepare``): a bad point refuses the whole sweep
before anything is queued, and each run directory exists (with its ``rerun.sbatch``) from the start.
After submission it writes ``SWEEP_DIR/jobs.tsv`` (job id, run directory, overrides), which
``opd.launch.sweep`` waits for, then blocks until the jobs end, as the plugin does.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn
from hydra_plugins.hydra_submitit_launcher import submitit_launcher
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf
from omegaconf import OmegaConf, open_dict

from opd.launch import JOBS_FILE, REFUSED_FILE
from opd.launch.rundir import SubmissionError, prepare

log = logging.getLogger(__name__)


def run_dir_of(sweep_config) -> Path:
    return Path(sweep_config.hydra.sweep.dir) / str(sweep_config.hydra.sweep.subdir)


class _PrepareFirst:
    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        run_dirs, created = [], []
        try:
            for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
                sweep_config = self.hydra_context.config_loader.load_sweep_config(
                    self.config, list(overrides)
                )
                with open_dict(sweep_config.hydra.job):
                    sweep_config.hydra.job.num = idx
                run_dir = run_dir_of(sweep_config)
                if not run_dir.exists():
                    created.append(run_dir)
                log.info(f"#{idx} {' '.join(overrides)}: preparing {run_dir}")
                run_dirs.append(prepare(sweep_config, run_dir, list(overrides)))
        except SubmissionError as error:
            for run_dir in created:
                shutil.rmtree(run_dir, ignore_errors=True)
            message = f"refused: {error} (nothing was submitted)"
            (sweep_dir / REFUSED_FILE).write_text(message + "\n")
            raise SubmissionError(message) from None

        import submitit

        executor = submitit.AutoExecutor(
            folder=self.params["submitit_folder"],
            cluster=self._EXECUTOR,
            **{f"{self._EXECUTOR}_max_num_timeout": self.params.get("max_num_timeout", 0)},
        )
        executor.update_parameters(**self.executor_parameters())
        job_params = [
            (list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state())
            for idx, overrides in enumerate(job_overrides, start=initial_job_idx)
        ]
        jobs = executor.map_array(self, *zip(*job_params, strict=True))
        lines = [
            f"{job.job_id}\t{run_dir}\t{' '.join(overrides)}\n"
            for job, run_dir, overrides in zip(jobs, run_dirs, job_overrides, strict=True)
        ]
        (sweep_dir / (JOBS_FILE + ".tmp")).write_text("".join(lines))
        (sweep_dir / (JOBS_FILE + ".tmp")).replace(sweep_dir / JOBS_FILE)
        log.info(
            f"submitted {len(jobs)} job(s): {' '.join(job.job_id for job in jobs)}; list: {sweep_dir / JOBS_FILE}"
        )
        return [job.results()[0] for job in jobs]

    def executor_parameters(self) -> dict:
        """The plugin's parameters under submitit's names; on SLURM every job is requeueable and one
        failing node fails the job at once instead of leaving the others waiting."""
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        skip = {"submitit_folder", "max_num_timeout"}
        params = {
            k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k not in skip
        }
        if self._EXECUTOR == "slurm":
            params["slurm_srun_args"] = ["--kill-on-bad-exit=1"]
            params["slurm_additional_parameters"] = {
                "requeue": True,
                **(params.get("slurm_additional_parameters") or {}),
            }
        return params


class SlurmLauncher(_PrepareFirst, submitit_launcher.SlurmLauncher):
    pass


class LocalLauncher(_PrepareFirst, submitit_launcher.LocalLauncher):
    pass
