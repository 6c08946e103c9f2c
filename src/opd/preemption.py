"""Save the current step, then stop, when the job is about to lose its allocation; record the run's plan.

SLURM sends the walltime (or preemption) signal ``cluster.signal_delay_s`` before it kills a job.
``opd.launch.node`` then writes ``RUN_DIR/stop_requested``; the trainer (``SaveThenStop``) sees it at the
end of the step it is in, saves a checkpoint of that step (verl's own save, as if ``save_freq`` had come
round), logs the step, and returns from ``fit()``; the node requeues the job, which resumes from that
step. Without it a requeue loses up to ``save_freq`` steps.

``RUN_DIR/training_plan.json`` records the total steps verl computed (``total_training_steps``, or
epochs x batches when it is unset), so that a rerun of a finished run trains nothing more.

Files live in the run directory (``trainer.default_local_dir``), which the login side, every node and
the trainer share. Nothing here imports verl at import time (``opd.launch.node`` reads the names).
"""

from __future__ import annotations

import json
import os
import time

STOP_REQUEST = "stop_requested"  # written by opd.launch.node on the signal; removed when an attempt starts
STOPPED = "stopped.json"  # written by the trainer once the step is saved and logged: {"step": N}
PLAN = "training_plan.json"  # written by the trainer at start: {"total_training_steps": N}


def _write_json(path: str, data: dict) -> None:
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


class _Stop(Exception):
    """Raised at the start of the step after the saved one: leaves verl's loop without training it."""


class SaveThenStop:
    """Mixin for verl's ``RayPPOTrainer`` (put it first): the save-then-stop and the training plan."""

    def _opd_file(self, name: str) -> str:
        return os.path.join(str(self.config.trainer.default_local_dir), name)

    def _opd_stop_requested(self) -> bool:
        return os.path.exists(self._opd_file(STOP_REQUEST))

    def fit(self):
        from verl.trainer.ppo import ray_trainer

        os.makedirs(str(self.config.trainer.default_local_dir), exist_ok=True)
        _write_json(self._opd_file(PLAN), {"total_training_steps": int(self.total_training_steps)})
        self._opd_saved_step = None
        # verl checks this after every actor update and saves when it says so (it exists for cloud
        # capacity blocks); a stop request answers it too.
        original = ray_trainer.should_save_ckpt_esi

        def should_save(*args, **kwargs):
            return self._opd_stop_requested() or original(*args, **kwargs)

        ray_trainer.should_save_ckpt_esi = should_save
        try:
            return super().fit()
        except _Stop:
            step = self._opd_saved_step
            print(f"[opd] saved step {step} for the stop request; leaving the training loop", flush=True)
            _write_json(self._opd_file(STOPPED), {"step": step, "time": time.time()})
        finally:
            ray_trainer.should_save_ckpt_esi = original

    def _save_checkpoint(self):
        super()._save_checkpoint()
        if self._opd_stop_requested():
            self._opd_saved_step = self.global_steps

    def _start_profiling(self, *args, **kwargs):
        # the first call of every step: the saved step is logged by now
        if getattr(self, "_opd_saved_step", None) is not None:
            raise _Stop
        return super()._start_profiling(*args, **kwargs)
