"""The launch layer against a real SLURM cluster (``opd.launch.local_slurm``: slurmctld, two slurmd
"nodes", munge, slurmdbd + MariaDB on this host), each job running verl on CPU in its own Ray cluster.

One module-scoped sweep (2 tiny OPD runs at once) serves several tests; the requeue, 2-node and
failure tests submit their own single runs with ``make submit``."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO
from opd.launch.local_slurm import CLUSTER
from opd.launch.status import sacct_states

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
JOB_TIMEOUT_S = 1200


def make(target: str, env: dict, *variables: str, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["make", "-s", "--no-print-directory", target, *variables],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip


def wait_terminal(job_ids: list[str], timeout: float = JOB_TIMEOUT_S) -> dict[str, dict]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = sacct_states(job_ids)
        if all(states.get(j, {}).get("state") in TERMINAL for j in job_ids):
            return states
        time.sleep(2)
    raise AssertionError(f"jobs {job_ids} not finished after {timeout} s: {sacct_states(job_ids)}")


def submitted_job(result: subprocess.CompletedProcess) -> tuple[str, Path]:
    assert result.returncode == 0, result.stdout + result.stderr
    job = re.search(r"submitted job (\S+)", result.stdout).group(1)
    run_dir = Path(re.search(r"run directory: (\S+)", result.stdout).group(1))
    return job, run_dir


def train_steps(run_dir: Path) -> list[int]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [
        r["step"]
        for r in map(json.loads, lines)
        if "opd/divergence" in r["data"] or "actor/pg_loss" in r["data"]
    ]


def all_job_ids(env) -> set[str]:
    result = subprocess.run(
        ["sacct", "-X", "-n", "-P", "-o", "JobID", "--starttime=2000-01-01"],
        env=env,
        capture_output=True,
        text=True,
    )
    return set(result.stdout.split())


@pytest.fixture(scope="module")
def slurm_env(slurm_cluster, tiny_math_data, tmp_path_factory) -> dict:
    env = {
        k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "TEACHER_MODEL_PATH", "RAY_ADDRESS")
    }
    env.update(
        SLURM_CONF=str(slurm_cluster),
        DATA_DIR=str(tiny_math_data),
        OUTPUT_ROOT=str(tmp_path_factory.mktemp("launch_outputs")),
        PYTHONUNBUFFERED="1",
    )
    os.environ["SLURM_CONF"] = str(slurm_cluster)  # for sacct_states in this process
    return env


@pytest.fixture(scope="module")
def sweep(slurm_env) -> SimpleNamespace:
    """``make sweep-opd`` over two tiny OPD points (reverse vs forward KL) on the test cluster."""
    started = time.monotonic()
    result = make("sweep-opd", slurm_env, "EXP=tiny_opd", "SWEEP=tiny_opd", "ARGS=cluster=ci")
    returned_after = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = re.findall(r"^  job (\S+)  (\S+)  (.*)$", result.stdout, flags=re.M)
    # squeue: slurmctld's own view (accounting reaches sacct a moment later)
    queued = subprocess.run(
        ["squeue", "-h", "-r", "-j", ",".join(job for job, _, _ in jobs), "-o", "%i %T"],
        env=slurm_env, capture_output=True, text=True,
    ).stdout  # fmt: skip
    states = wait_terminal([job for job, _, _ in jobs])
    return SimpleNamespace(
        output=result.stdout,
        dir=Path(re.search(r"^sweep: (\S+)", result.stdout, flags=re.M).group(1)),
        jobs=[(job, Path(run_dir), point) for job, run_dir, point in jobs],
        returned_after=returned_after,
        queued_at_return=dict(line.split() for line in queued.splitlines()),
        states=states,
    )


def test_sweep_returns_promptly_and_every_point_completes_with_config_metrics_and_checkpoint(
    sweep, slurm_env
):
    assert len(sweep.jobs) == 2, sweep.output
    loss_types = [re.search(r"\+\+verl.opd.loss_type=(\w+)", point).group(1) for _, _, point in sweep.jobs]
    assert sorted(loss_types) == ["forward_kl", "reverse_kl"]
    # make returned with the jobs queued, not after they ran
    assert set(sweep.queued_at_return) == {job for job, _, _ in sweep.jobs}, sweep.queued_at_return
    assert set(sweep.queued_at_return.values()) <= {"PENDING", "CONFIGURING", "RUNNING"}
    assert (sweep.dir / "launcher.log").exists()
    for job, run_dir, point in sweep.jobs:
        assert sweep.states[job]["state"] == "COMPLETED", (job, sweep.states[job], _tail(run_dir, job))
        text = (run_dir / "config.yaml").read_text()
        assert "${" not in text  # resolved: no interpolation left
        config = yaml.safe_load(text)
        assert config["opd"]["loss_type"] == re.search(r"loss_type=(\w+)", point).group(1)
        assert config["trainer"]["default_local_dir"] == str(run_dir)
        for name in ("launch.yaml", "overrides.txt", "git.txt", "environment.sh", "rerun.sbatch"):
            assert (run_dir / name).is_file(), name
        assert "commit " in (run_dir / "git.txt").read_text()
        assert f"export DATA_DIR={slurm_env['DATA_DIR']}" in (run_dir / "environment.sh").read_text()
        assert train_steps(run_dir) == [1, 2]
        assert (run_dir / "global_step_2" / "actor").is_dir()
        # the job ran exactly the resolved config of its run directory
        ran = yaml.safe_load((run_dir / "logs" / f"{job}.0" / "hydra" / "config.yaml").read_text())
        assert ran == config


def test_concurrent_jobs_use_their_own_ports_temp_dirs_and_tokens_and_leave_nothing_behind(sweep):
    heads = []
    for job, run_dir, _ in sweep.jobs:
        attempt = run_dir / "logs" / f"{job}.0"
        head = json.loads((attempt / "head.json").read_text())
        head["token"] = (attempt / "ray_token").read_text()
        assert (attempt / "ray_token").stat().st_mode & 0o077 == 0  # readable by the job's user only
        heads.append(head)
        assert not Path(head["temp_dir"]).exists()  # removed at teardown
    a, b = heads
    ports_a = set(a["ports"].values()) | set(
        range(a["ports"]["min-worker-port"], a["ports"]["max-worker-port"])
    )
    ports_b = set(b["ports"].values()) | set(
        range(b["ports"]["min-worker-port"], b["ports"]["max-worker-port"])
    )
    assert not ports_a & ports_b and a["temp_dir"] != b["temp_dir"] and a["token"] != b["token"]
    # and they really ran at the same time on this host
    spans = []
    for job, _, _ in sweep.jobs:
        out = subprocess.run(
            ["sacct", "-X", "-n", "-P", "-j", job, "-o", "Start,End"], capture_output=True, text=True
        )
        spans.append(out.stdout.strip().split("|"))
    assert max(s for s, _ in spans) < min(e for _, e in spans), spans
    leftovers = subprocess.run(["ps", "-ww", "-eo", "args"], capture_output=True, text=True).stdout
    for head in heads:
        assert head["temp_dir"] not in leftovers


def test_status_summarises_the_sweep_from_sacct(sweep, slurm_env):
    result = make("status", slurm_env, f"SWEEP={sweep.dir}")
    assert result.returncode == 0, result.stderr
    for job, run_dir, _ in sweep.jobs:
        line = next(line for line in result.stdout.splitlines() if line.startswith(job))
        assert "COMPLETED" in line and str(run_dir) in line and re.search(r"\s2\s", line)
    assert "2 COMPLETED" in result.stdout


def test_rerun_sbatch_of_a_finished_run_completes_with_the_same_config_and_trains_nothing_more(
    sweep, slurm_env
):
    job, run_dir, _ = sweep.jobs[0]
    config_before = (run_dir / "config.yaml").read_bytes()
    metrics_before = (run_dir / "metrics.jsonl").read_bytes()
    out = subprocess.run(
        ["sbatch", "--parsable", str(run_dir / "rerun.sbatch")], env=slurm_env, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    rerun = out.stdout.strip()
    assert wait_terminal([rerun], 300)[rerun]["state"] == "COMPLETED", _tail(run_dir, rerun)
    assert (run_dir / "config.yaml").read_bytes() == config_before
    assert (run_dir / "metrics.jsonl").read_bytes() == metrics_before
    assert (
        "run already complete (checkpoint at step 2 of 2)"
        in (run_dir / "logs" / f"slurm-{rerun}.out").read_text()
    )


REQUEUE_BY = {
    "scontrol_requeue": lambda job: ["scontrol", "requeue", job],
    # what SLURM does before the walltime (--signal=B:USR2@N): rerun.sbatch's trap requeues the job
    "walltime_signal": lambda job: ["scancel", "--batch", "--signal=USR2", job],
}


@pytest.mark.parametrize("requeue_by", sorted(REQUEUE_BY))
def test_requeued_job_resumes_from_its_checkpoint_and_keeps_both_attempts_logs(slurm_env, requeue_by):
    job, run_dir = submitted_job(
        make(
            "submit", slurm_env, "EXP=tiny_opd",
            "ARGS=cluster=ci verl.trainer.total_training_steps=4 verl.trainer.test_freq=-1",
        )
    )  # fmt: skip
    marker = run_dir / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (marker.exists() and marker.read_text().strip()):
        assert time.monotonic() < deadline, _tail(run_dir, job)
        assert sacct_states([job]).get(job, {}).get("state") not in TERMINAL, _tail(run_dir, job)
        time.sleep(0.3)
    subprocess.run(REQUEUE_BY[requeue_by](job), env=slurm_env, check=True)
    assert wait_terminal([job])[job]["state"] == "COMPLETED", _tail(run_dir, job)
    first, second = run_dir / "logs" / f"{job}.0", run_dir / "logs" / f"{job}.1"
    assert (first / "driver.log").is_file() and (second / "driver.log").is_file()
    assert "Training from scratch" in (first / "driver.log").read_text()
    resumed = re.search(
        r"Load from checkpoint folder: \S*global_step_(\d+)", (second / "driver.log").read_text()
    )
    assert resumed, (second / "driver.log").read_text()[-3000:]
    steps = train_steps(run_dir)
    assert steps == sorted(set(steps)) and steps[-1] == 4 and int(resumed.group(1)) >= 1
    assert int(resumed.group(1)) + 1 in steps  # the second attempt trained on from the checkpoint
    assert not list(Path("/tmp").glob(f"opd-{CLUSTER}-{job}.*"))  # both attempts' Ray temp dirs removed
    if requeue_by == "walltime_signal":
        assert "requeueing job" in (run_dir / "logs" / f"slurm-{job}.out").read_text()


def test_two_node_job_in_the_container_runs_one_ray_cluster_across_both_nodes_fake_apptainer(
    slurm_env, tmp_path
):
    """container=apptainer through a FAKE apptainer (tests/fake_apptainer; Apptainer cannot be installed
    here) that gives each node only the variables apptainer --cleanenv would, then runs it on the host."""
    image = tmp_path / "opd.sif"
    image.write_bytes(os.urandom(1 << 16))
    calls = tmp_path / "apptainer_calls"
    env = {
        **slurm_env,
        "PATH": f"{REPO / 'tests' / 'fake_apptainer'}:{slurm_env['PATH']}",
        "FAKE_APPTAINER_LOG": str(calls),
        "FAKE_APPTAINER_PATH": f"{REPO / '.venv' / 'bin'}:/usr/bin:/bin",
        "OPD_IMAGE": str(image),
    }
    job, run_dir = submitted_job(
        make(
            "submit",
            env,
            "EXP=tiny_grpo",
            "ARGS=cluster=ci resources=cpu_tiny_2node container=apptainer verl.trainer.total_training_steps=1",
        )
    )
    states = wait_terminal([job])
    assert states[job]["state"] == "COMPLETED", _tail(run_dir, job)
    assert states[job]["nodes"] == "node[1-2]"
    attempt = run_dir / "logs" / f"{job}.0"
    assert (attempt / "node0.log").is_file() and (attempt / "node1.log").is_file()
    assert "Ray cluster up: 2 node(s)" in (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["trainer"]["nnodes"] == 2
    assert train_steps(run_dir) == [1]
    # each node ran inside the image with its own task's variables; the run records the image's sha256
    digest = yaml.safe_load((run_dir / "launch.yaml").read_text())["container"]["digest"]
    assert f"node 1 runs in the image {digest}" in (run_dir / "logs" / f"slurm-{job}.out").read_text()
    nodes = [json.loads(p.read_text()) for p in calls.glob("*.json")]
    nodes = [call for call in nodes if "opd.launch.node" in call["command"]]
    assert sorted(call["env"]["SLURM_PROCID"] for call in nodes) == ["0", "1"]
    assert sorted(call["env"]["SLURMD_NODENAME"] for call in nodes) == ["node1", "node2"]
    for call in nodes:
        assert call["options"] == ["--nv", "--cleanenv"] and call["image"] == str(image)
        assert call["env"]["SLURM_JOB_ID"] == job and call["env"]["OPD_CONTAINER_DIGEST"] == digest
        assert any(Path(b) in [run_dir, *run_dir.parents] for b in call["binds"])
        assert call["env"]["HF_HUB_OFFLINE"] == "1"


def test_a_node_that_dies_fails_the_job_fast_naming_the_node_and_its_log(slurm_env):
    job, run_dir = submitted_job(
        make(
            "submit",
            slurm_env,
            "EXP=tiny_grpo",
            "ARGS=cluster=ci resources=cpu_tiny_2node verl.trainer.total_training_steps=50",
        )
    )
    attempt = run_dir / "logs" / f"{job}.0"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (attempt / "driver.log").exists():  # both nodes joined, the experiment started
        assert (
            time.monotonic() < deadline and sacct_states([job]).get(job, {}).get("state") not in TERMINAL
        ), _tail(run_dir, job)
        time.sleep(0.3)
    # node 1's Ray (the `ray start --block` process group with this job's node-1 temp dir) dies
    ps = subprocess.run(["ps", "-ww", "-eo", "pgid,args"], capture_output=True, text=True).stdout
    groups = {
        int(line.split()[0])
        for line in ps.splitlines()
        if f"--temp-dir=/tmp/opd-{CLUSTER}-{job}.0.1" in line and "ray start" in line
    }
    assert len(groups) == 1, ps
    os.killpg(groups.pop(), 9)
    killed_at = time.monotonic()
    assert wait_terminal([job], 300)[job]["state"] == "FAILED"
    assert time.monotonic() - killed_at < 90  # fails fast, not at the walltime
    slurm_log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert "node 1 (" in slurm_log and str(attempt / "node1.log") in slurm_log, slurm_log[-3000:]


def test_failing_experiment_is_reported_failed_with_its_error_in_the_log(slurm_env):
    job, run_dir = submitted_job(
        make(
            "submit",
            slurm_env,
            "EXP=tiny_grpo",
            "ARGS=cluster=ci verl.algorithm.adv_estimator=no_such_estimator verl.trainer.val_before_train=false",
        )
    )
    assert wait_terminal([job])[job]["state"] == "FAILED"
    driver_log = (run_dir / "logs" / f"{job}.0" / "driver.log").read_text()
    assert "no_such_estimator" in driver_log and "Traceback" in driver_log
    slurm_log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert "exited with code" in slurm_log and str(run_dir / "logs" / f"{job}.0" / "driver.log") in slurm_log


@pytest.mark.parametrize(
    "target,variables,unset,expected",
    [
        ("sweep-opd", ["EXP=opd", "SWEEP=tiny_opd"], "TEACHER_MODEL_PATH", "needs TEACHER_MODEL_PATH"),
        ("submit", ["EXP=tiny_opd"], "DATA_DIR", "grpo_processed/train.parquet"),
    ],
)
def test_missing_teacher_or_data_is_refused_before_anything_is_queued(
    slurm_env, tiny_assets, tmp_path, target, variables, unset, expected
):
    env = dict(slurm_env, MODEL_PATH=str(tiny_assets / "student"), OUTPUT_ROOT=str(tmp_path))
    env.pop("TEACHER_MODEL_PATH", None)
    if unset == "DATA_DIR":
        env["DATA_DIR"] = str(tmp_path / "no_data_here")
    before = all_job_ids(env)
    result = make(target, env, *variables, "ARGS=cluster=ci")
    assert result.returncode != 0
    assert expected in result.stderr and "nothing was submitted" in result.stderr, result.stderr
    assert all_job_ids(env) == before
    assert not list(tmp_path.glob("**/rerun.sbatch"))  # no half-written run directory left behind


def _tail(run_dir: Path, job: str) -> str:
    logs = sorted((run_dir / "logs").glob(f"slurm-{job}.out")) + sorted(
        (run_dir / "logs").glob(f"{job}.*/driver.log")
    )
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs if p.exists())
