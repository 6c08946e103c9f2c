"""srun --ntasks-per-node=1 python -m opd.launch.node RUN_DIR

The in-job side, started once per node of the allocation (by ``rerun.sbatch`` or by the submitit
launcher's job): node 0 starts the job's Ray head, every other node joins it, node 0 waits until all
nodes are in, then runs the experiment's entry point on the run directory's resolved config with an
explicit ``RAY_ADDRESS``. Any node leaving fails the job with the node's name and log; teardown stops
only the processes this job started. Logs of each attempt (restart) stay in ``RUN_DIR/logs/<job>.<n>/``.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from omegaconf import OmegaConf

from opd import preemption
from opd.launch import container, rundir
from opd.launch.ray_cluster import (
    ClusterError,
    JobIdentity,
    PortLayout,
    alive_nodes,
    node_address,
    ray_env,
    ray_start_command,
    spawn_group,
    start_ray,
    stop_process_groups,
    wait_for,
    write_token,
)

HEAD_TIMEOUT_S = float(os.environ.get("OPD_RAY_HEAD_TIMEOUT_S", 180))
JOIN_TIMEOUT_S = float(os.environ.get("OPD_RAY_JOIN_TIMEOUT_S", 600))
NODE_CHECK_INTERVAL_S = 5.0
# After the walltime signal, the time kept for the requeue itself (scontrol, SLURM's KillWait) out of
# cluster.signal_delay_s (a third of short delays): the current step must be saved within the rest, or
# the job requeues without it.
REQUEUE_MARGIN_S = 30.0
# launch.yaml export_model: the run's last checkpoint as a Hugging Face model, for the stages after it
EXPORTED_MODEL = "model"


class JobFailed(RuntimeError):
    """The experiment exited non-zero; the message names the log with its error."""


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _say(message: str) -> None:
    print(f"[opd.launch.node {socket.gethostname()}] {message}", flush=True)


class Node:
    """One node's part of one attempt of a job."""

    def __init__(self, run_dir: Path):
        self.run_dir = run_dir.resolve()
        self.launch = OmegaConf.load(self.run_dir / "launch.yaml")
        self.trainer = OmegaConf.load(self.run_dir / "config.yaml").trainer
        self.job = JobIdentity.from_env()
        self.attempt_dir = self.run_dir / "logs" / self.job.tag
        self.attempt_dir.mkdir(parents=True, exist_ok=True)
        self.rank = self.job.node_rank
        self.log = self.attempt_dir / f"node{self.rank}.log"
        self.token = self.attempt_dir / "ray_token"
        self.head_file = self.attempt_dir / "head.json"
        self.done_file = self.attempt_dir / "done.json"
        # Unix socket paths are limited to 107 bytes: keep Ray's temp dir short, one per node and attempt.
        self.temp_dir = f"/tmp/opd-{self.job.cluster}-{self.job.tag}.{self.rank}"
        self.ray_process: subprocess.Popen | None = None
        self.driver: subprocess.Popen | None = None
        self.ray = str(Path(sys.executable).with_name("ray"))
        cluster = self.launch.cluster
        self.ports = PortLayout.from_config(cluster.get("ray_ports"))
        self.network_interface = cluster.get("network_interface")
        self.signal_delay_s = float(cluster.get("signal_delay_s", 120))
        self.max_requeues = int(cluster.get("max_requeues", 3))
        self.stop_signal_at: float | None = None  # monotonic time of the walltime/preemption signal
        self.error: str | None = None

    def resources(self) -> dict:
        """Ray resources of this node. On CPU verl needs logical GPUs and a ``cpu`` resource per worker."""
        if self.trainer.device == "cpu":
            from opd.backends.cpu import ray_init_overrides  # what a local CPU run gives ray.init

            return ray_init_overrides(int(self.trainer.n_gpus_per_node))
        cpus = os.environ.get("SLURM_CPUS_ON_NODE")
        return {"num_cpus": int(cpus) if cpus else None}

    def check_allocation(self) -> None:
        """Resources are stated once (configs/resources): the allocation must be what the config says."""
        expected = int(self.trainer.nnodes)
        if self.job.nnodes != expected:
            raise ClusterError(
                f"the job has {self.job.nnodes} node(s) but the run's config says trainer.nnodes={expected}: "
                f"submit with `sbatch {self.run_dir}/rerun.sbatch` (its --nodes matches) or recompose the run"
            )

    def total_steps(self) -> int | None:
        """The run's total steps: ``trainer.total_training_steps`` if set, else what verl computed
        (epochs x batches) and the trainer recorded when it first started."""
        total = self.trainer.get("total_training_steps")
        if total is not None:
            return int(total)
        plan = self.run_dir / preemption.PLAN
        if plan.exists():
            return int(json.loads(plan.read_text())["total_training_steps"])
        return None

    def finished_step(self) -> int | None:
        """The last checkpointed step if the run already reached its total steps.

        verl resumes at checkpoint + 1 and would train one step past the end of a finished run, so a
        finished run (a rerun, or a requeue racing the end) starts nothing."""
        marker = self.run_dir / "latest_checkpointed_iteration.txt"
        total = self.total_steps()
        if total is None or not marker.exists():
            return None
        step = int(marker.read_text().strip() or 0)
        return step if step >= total else None

    # --- node 0 -------------------------------------------------------------------------------------
    def run_head(self) -> int:
        step = self.finished_step()
        if step is not None:
            _say(
                f"run already complete (checkpoint at step {step} of {self.total_steps()}): "
                "nothing to train. To repeat it from scratch, submit it anew with the login overrides in "
                f"{self.run_dir / 'overrides.txt'} (make submit EXP=... ARGS=...)"
            )
            return self.export_model()
        write_token(self.token)
        (self.run_dir / preemption.STOP_REQUEST).unlink(missing_ok=True)  # an earlier attempt's
        (self.run_dir / preemption.STOPPED).unlink(missing_ok=True)
        ports = self.ports.free_ports(self.job.job_id, self.rank, head=True)
        command = ray_start_command(
            self.ray, ports, self.temp_dir, None, self.resources(), node_address(self.network_interface)
        )
        _say(f"job {self.job.tag}: starting the Ray head (GCS port {ports['port']}), log {self.log}")
        self.ray_process = start_ray(command, ray_env(self.token), self.log)
        local = f"127.0.0.1:{ports['port']}"
        nodes = wait_for(
            "the Ray head",
            lambda: alive_nodes(local, self.token),
            HEAD_TIMEOUT_S,
            str(self.log),
            check_alive=self.check_own_ray,
        )
        address = f"{next(iter(nodes.values()))}:{ports['port']}"
        _write_json(
            self.head_file,
            {
                "address": address,
                "host": socket.gethostname(),
                "ports": ports,
                "temp_dir": self.temp_dir,
                "code": str(Path(preemption.__file__).resolve().parent),  # the opd package this attempt runs
            },
        )
        if self.job.nnodes > 1:
            _say(f"waiting for {self.job.nnodes - 1} more node(s) to join {address}")
            wait_for(
                f"{self.job.nnodes} nodes in the Ray cluster",
                lambda: len(alive_nodes(local, self.token)) >= self.job.nnodes,
                JOIN_TIMEOUT_S,
                f"{self.attempt_dir}/node*.log",
                check_alive=self.check_head_side,
            )
        _say(f"Ray cluster up: {self.job.nnodes} node(s) at {address}")
        return self.run_driver(address, local)

    def run_driver(self, address: str, local: str) -> int:
        entry = self.launch.experiment.entry
        command = [
            sys.executable, "-m", entry,
            "--config-path", str(self.run_dir), "--config-name", "config",
            f"hydra.run.dir={self.run_dir}",
            f"hydra.output_subdir=logs/{self.job.tag}/hydra",
        ]  # fmt: skip
        driver_log = self.attempt_dir / "driver.log"
        _say(f"running {entry}; log {driver_log}")
        env = ray_env(self.token, address)
        env["PYTHONUNBUFFERED"] = "1"
        self.driver = spawn_group(
            command, env=env, cwd=self.run_dir, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
        )
        copier = threading.Thread(target=_tee, args=(self.driver.stdout, driver_log), daemon=True)
        copier.start()
        next_check = time.monotonic() + NODE_CHECK_INTERVAL_S
        while self.driver.poll() is None:
            time.sleep(0.5)
            self.check_own_ray()
            if self.stop_signal_at is not None and time.monotonic() > self.stop_deadline():
                _say(
                    f"the current step was not saved within {self.stop_deadline() - self.stop_signal_at:.0f} s of "
                    "the signal: requeueing without it (raise cluster.signal_delay_s above a step's time + a save)"
                )
                return self.requeue()
            if self.job.nnodes > 1 and time.monotonic() >= next_check:
                next_check = time.monotonic() + NODE_CHECK_INTERVAL_S
                if len(alive_nodes(local, self.token)) < self.job.nnodes:
                    raise ClusterError(self.lost_node_message())
        copier.join(timeout=10)
        code = self.driver.returncode
        if code != 0:
            raise JobFailed(f"{entry} exited with code {code}: the error is at the end of {driver_log}")
        stopped = self.run_dir / preemption.STOPPED
        if stopped.exists():
            step = json.loads(stopped.read_text())["step"]
            _say(f"step {step} saved for the walltime/preemption signal")
            return self.requeue(step)
        return self.export_model()

    def export_model(self) -> int:
        """With ``export_model`` (a pipeline stage whose model later stages read): the last checkpoint as a
        verified Hugging Face model in ``RUN_DIR/model``. Runs after training, so a failed conversion fails
        the job (and the stages waiting for it) instead of handing on a broken path."""
        if not self.launch.get("export_model"):
            return 0
        from opd.checkpoint import LATEST_STEP_FILE, MARKER_FILE

        target = self.run_dir / EXPORTED_MODEL
        latest = self.run_dir / LATEST_STEP_FILE
        if not latest.is_file():
            raise JobFailed(
                f"export_model: the run saved no checkpoint ({latest} is missing): set trainer.save_freq > 0 "
                "(verl also saves at the last step then)"
            )
        source = str((self.run_dir / f"global_step_{latest.read_text().strip()}" / "actor").resolve())
        marker = target / MARKER_FILE
        if marker.is_file():
            held = json.loads(marker.read_text())
            if held.get("source") == source and held.get("verified"):
                _say(f"{target} already holds the last checkpoint's model")
                return 0
            shutil.rmtree(target)  # an older checkpoint's conversion (a run continued past it)
        log = self.attempt_dir / "export_model.log"
        _say(f"converting the last checkpoint to a Hugging Face model in {target}; log {log}")
        with open(log, "w") as out:
            code = subprocess.run(
                [
                    sys.executable,
                    "-m",
                    "opd.checkpoint",
                    "convert",
                    str(self.run_dir),
                    "--target",
                    str(target),
                ],
                stdout=out,
                stderr=subprocess.STDOUT,
            ).returncode
        if code != 0:
            raise JobFailed(
                f"converting the last checkpoint to {target} failed: the error is at the end of {log}"
            )
        return 0

    # --- the walltime / preemption signal -----------------------------------------------------------
    def on_stop_signal(self, signum, frame) -> None:
        """SIGUSR2 (``--signal=USR2@signal_delay_s``, or a preemption): ask the trainer to save the
        step it is in and stop; ``run_driver`` requeues once it has (or at the deadline)."""
        if self.stop_signal_at is None:
            self.stop_signal_at = time.monotonic()
            (self.run_dir / preemption.STOP_REQUEST).write_text(f"{time.time()}\n")
            _say(
                f"SIGUSR2 (walltime near or preemption): the trainer saves the current step, then the job "
                f"requeues (deadline {self.stop_deadline() - self.stop_signal_at:.0f} s)"
            )

    def stop_deadline(self) -> float:
        margin = min(REQUEUE_MARGIN_S, self.signal_delay_s / 3)
        return self.stop_signal_at + max(10.0, self.signal_delay_s - margin)

    def requeue(self, step: int | None = None) -> int:
        """``scontrol requeue`` this job (it resumes from its last checkpoint), within the run's budget."""
        if self.job.attempt >= self.max_requeues:
            saved = f"step {step} is saved" if step else "the current step was not saved"
            raise JobFailed(
                f"stopped for the walltime/preemption signal ({saved}), and this was attempt "
                f"{self.job.attempt + 1}, past cluster.max_requeues={self.max_requeues}: continue the run with "
                f"`sbatch {self.run_dir}/rerun.sbatch` (it resumes from the last checkpoint)"
            )
        _say(f"requeueing job {self.job.job_id} (attempt {self.job.attempt + 1} of {self.max_requeues + 1}); "
             "it resumes from its last checkpoint")  # fmt: skip
        result = subprocess.run(["scontrol", "requeue", str(self.job.job_id)], capture_output=True, text=True)
        if result.returncode != 0:
            raise JobFailed(f"scontrol requeue {self.job.job_id} failed: {result.stderr.strip()}")
        stop_process_groups(self.driver, self.ray_process)
        time.sleep(120)  # SLURM ends this attempt (SIGTERM) now; returning first could end the job instead
        raise JobFailed(f"job {self.job.job_id} was requeued but still runs after 120 s")

    def check_head_side(self) -> None:
        self.check_own_ray()
        for failed in sorted(self.attempt_dir.glob("node*.failed")):
            raise ClusterError(failed.read_text().strip())

    def lost_node_message(self) -> str:
        for failed in sorted(self.attempt_dir.glob("node*.failed")):
            return failed.read_text().strip()
        logs = ", ".join(str(p) for p in sorted(self.attempt_dir.glob("node*.log")) if p != self.log)
        return f"a node left the Ray cluster (its host may have died); node logs: {logs}"

    # --- other nodes --------------------------------------------------------------------------------
    def run_worker(self) -> int:
        def head_or_done():
            if self.head_file.exists():
                return json.loads(self.head_file.read_text())
            return {"done": True} if self.done_file.exists() else None

        head = wait_for(
            "the Ray head's address",
            head_or_done,
            HEAD_TIMEOUT_S + JOIN_TIMEOUT_S,
            f"{self.attempt_dir}/node0.log",
        )
        if "done" in head:  # node 0 had nothing to run (finished run) or failed before starting Ray
            return json.loads(self.done_file.read_text()).get("code", 0)
        ports = self.ports.free_ports(self.job.job_id, self.rank, head=False)
        command = ray_start_command(
            self.ray,
            ports,
            self.temp_dir,
            head["address"],
            self.resources(),
            node_address(self.network_interface),
        )
        _say(f"node {self.rank}: joining {head['address']}, log {self.log}")
        self.ray_process = start_ray(command, ray_env(self.token), self.log)
        while not self.done_file.exists():
            time.sleep(0.5)
            if self.ray_process.poll() is not None and not self.done_file.exists():
                message = (
                    f"node {self.rank} ({socket.gethostname()}): Ray exited with code "
                    f"{self.ray_process.returncode}; its log: {self.log}"
                )
                (self.attempt_dir / f"node{self.rank}.failed").write_text(message + "\n")
                raise ClusterError(message)
        return json.loads(self.done_file.read_text()).get("code", 0)

    def check_own_ray(self) -> None:
        if self.ray_process is not None and self.ray_process.poll() is not None:
            raise ClusterError(
                f"node {self.rank} ({socket.gethostname()}): Ray exited with code "
                f"{self.ray_process.returncode}; its log: {self.log}"
            )

    # --- all nodes ----------------------------------------------------------------------------------
    def remove_stale_temp_dirs(self) -> None:
        """Temp dirs of this job's earlier attempts on this node: a requeued attempt is killed before
        its teardown can finish, and its Ray processes are gone once SLURM restarts the job."""
        for stale in Path("/tmp").glob(f"opd-{self.job.cluster}-{self.job.name}.*.{self.rank}"):
            shutil.rmtree(stale, ignore_errors=True)

    def run(self) -> int:
        if container.INSIDE in os.environ:
            _say(f"node {self.rank} runs in the image {os.environ[container.INSIDE]}")
        self.check_allocation()
        self.remove_stale_temp_dirs()
        code = 1
        # Only node 0 acts on the walltime signal; SLURM sends it to every node's task, whose default
        # action (terminate) would fail the job.
        handler = self.on_stop_signal if self.rank == 0 and "SLURM_JOB_ID" in os.environ else signal.SIG_IGN
        previous = signal.signal(signal.SIGUSR2, handler)
        try:
            code = self.run_head() if self.rank == 0 else self.run_worker()
            return code
        except (ClusterError, JobFailed) as error:
            self.error = str(error)
            raise
        finally:
            signal.signal(signal.SIGUSR2, previous)
            if self.rank == 0:
                _write_json(self.done_file, {"code": code, "error": self.error})
            stop_process_groups(self.driver, self.ray_process)
            _remove_tree(self.temp_dir)


def _remove_tree(path: str, deadline_s: float = 5.0) -> None:
    """rmtree, again while processes that were just killed still drop files into it."""
    deadline = time.monotonic() + deadline_s
    while os.path.exists(path) and time.monotonic() < deadline:
        shutil.rmtree(path, ignore_errors=True)
        if os.path.exists(path):
            time.sleep(0.2)


def _tee(stream, path: Path) -> None:
    with open(path, "a") as log:
        for line in stream:
            log.write(line)
            log.flush()
            sys.stdout.write(line)
        sys.stdout.flush()


def _raise_on_sigterm(signum, frame):
    raise SystemExit(128 + signum)


def run(run_dir: str | Path) -> int:
    """Run this node's part; raise (ClusterError, JobFailed) with a message naming the node and log.

    SIGTERM (scancel, requeue, preemption) unwinds through the teardown, so the job's Ray processes
    never outlive it as orphans that SLURM no longer tracks. Started outside the run's container (the
    submitit launcher's task), it runs the same command as ``rerun.sbatch``: itself inside the image."""
    previous = signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        launch = OmegaConf.to_container(OmegaConf.load(Path(run_dir) / "launch.yaml"))
        if container.enabled(launch["container"]) and container.INSIDE not in os.environ:
            return _run_in_container(launch, Path(run_dir))
        return Node(Path(run_dir)).run()
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run_in_container(launch: dict, run_dir: Path) -> int:
    command = rundir.node_command(launch, run_dir)
    _say(f"entering the container: {shlex.join(command[:4])} ...")
    child = spawn_group(command)

    def forward(signum, frame):  # the walltime signal may reach only this task's first process
        try:
            os.killpg(child.pid, signum)
        except ProcessLookupError:
            pass

    previous = signal.signal(signal.SIGUSR2, forward)
    try:
        return child.wait()
    finally:
        signal.signal(signal.SIGUSR2, previous)
        stop_process_groups(child, grace_s=10.0)  # SIGTERM: the node inside tears its Ray down first


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1 or argv[0].startswith("-"):
        print("usage: python -m opd.launch.node RUN_DIR", file=sys.stderr)
        sys.exit(2)
    try:
        sys.exit(run(argv[0]))
    except (ClusterError, JobFailed) as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
