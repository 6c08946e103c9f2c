"""python -m opd.launch.submit experiment=NAME [overrides]   (make submit EXP=NAME ARGS='...')

``verl.<key>=value`` arguments set verl keys, as for sweeps.

Submit one run with plain sbatch: write its run directory (``opd.launch.rundir``), then
``sbatch RUN_DIR/rerun.sbatch`` — the very script that reruns it later. Prints the job id and the run
directory; a run that would fail (missing model, teacher or data) is refused with exit 2, nothing queued.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from opd.launch import CONFIGS, JOBS_FILE
from opd.launch.rundir import SubmissionError, prepare
from opd.launch.sweep import hydra_arguments


def sbatch(script: Path) -> str:
    return sbatch_command(script)


def sbatch_command(script: Path, options: list[str] = ()) -> str:
    """``sbatch --parsable [options] script``; the job id. Command-line options win over the script's
    ``#SBATCH`` lines (a pipeline's dependencies, which a rerun of the same script must not inherit)."""
    result = subprocess.run(["sbatch", "--parsable", *options, str(script)], capture_output=True, text=True)
    if result.returncode != 0:
        raise SubmissionError(f"sbatch {script} failed: {result.stderr.strip()}")
    return result.stdout.strip().split(";")[0]


@hydra.main(config_path=CONFIGS, config_name="launch", version_base=None)
def main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    try:
        prepare(cfg, run_dir, list(hydra_cfg.overrides.task))
        job_id = sbatch(run_dir / "rerun.sbatch")
        (run_dir / JOBS_FILE).write_text(f"{job_id}\t{run_dir}\t{' '.join(hydra_cfg.overrides.task)}\n")
    except SubmissionError as error:
        shutil.rmtree(run_dir, ignore_errors=True)
        print(f"error: refused: {error} (nothing was submitted)", file=sys.stderr)
        sys.exit(2)
    print(f"submitted job {job_id}\nrun directory: {run_dir}\nstatus: make status SWEEP={run_dir}")


if __name__ == "__main__":
    sys.argv[1:] = hydra_arguments(sys.argv[1:])
    main()
