"""The launch layer against a real SLURM cluster (``opd.launch.local_slurm``: slurmctld, two slurmd
"nodes", munge, slurmdbd + MariaDB on this host), each job running verl on CPU in its own Ray cluster.

The sweep (2 tiny OPD runs, DATA_DIR given relative), a sweep of 2 failing points and a 2-node run in a
(fake) container are queued together
(fixture ``queued``); the requeue and node-failure tests, which act on their job while it runs, submit
their own with ``make submit``. The machine's 2 cores are the limit: queueing more at once does not make
the file faster, only the per-job overhead (Ray, verl's workers: ~45 CPU-s) does."""

from __future__ import annotations

import csv
import json
import os
import re
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from conftest import REPO
from opd.launch import local_slurm
from opd.launch.local_slurm import CLUSTER
from opd.launch.status import sacct_states

pytestmark = [pytest.mark.slurm, pytest.mark.e2e]

# drawn per session: a literal would sit in this file, and so in git.txt's diff of an uncommitted checkout
SECRETS = {"HF_TOKEN": f"hf_{secrets.token_hex(12)}", "WANDB_API_KEY": f"wandb_{secrets.token_hex(12)}"}
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED"}
JOB_TIMEOUT_S = 1200


# --- the cluster itself (before any job is queued: one test restarts a slurmd) -------------------------


@pytest.fixture(scope="module")
def cluster_info(slurm_cluster):
    """``local_slurm.up`` on the tests' cluster (already up: it starts nothing) and its state directory."""
    state = slurm_cluster.parent
    return local_slurm.up(state), state


def client_env(info) -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": info["slurm_conf"]}


@pytest.mark.timeout(180)
def test_up_is_idempotent_and_status_reports_it(cluster_info):
    first, state = cluster_info
    assert first["nodes"] == ["node1", "node2"]
    again = local_slurm.up(state)
    assert again["started"] == []
    assert again["pids"] == first["pids"] and all(first["pids"].values())
    st = local_slurm.status(state)
    assert st["up"] and st["daemons"] == first["pids"]
    assert st["nodes"] == {"node1": "idle", "node2": "idle"}


@pytest.mark.timeout(180)
def test_sbatch_wrap_job_completes_and_is_accounted(cluster_info, tmp_path):
    info, _ = cluster_info
    env = client_env(info)
    out = tmp_path / "job.out"
    job_id = subprocess.run(
        ["sbatch", "--parsable", "-N2", "-o", str(out), "--wrap", "srun hostname; echo done"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.strip().split(";")[0]  # fmt: skip
    deadline = time.monotonic() + 60
    state = ""
    while state != "COMPLETED" and time.monotonic() < deadline:
        state = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], env=env, capture_output=True, text=True
        ).stdout.strip()
        time.sleep(0.5)
    assert state == "COMPLETED"
    assert out.read_text().splitlines()[-1] == "done"


@pytest.mark.timeout(180)
def test_up_through_a_pipe_restarts_only_the_missing_daemon(cluster_info):
    """A restarted daemon must not hold the caller's pipe open (``up | tee`` or a CI step would hang)."""
    info, state = cluster_info
    before = local_slurm.status(state)["daemons"]
    os.kill(before["slurmd-node2"], signal.SIGTERM)
    deadline = time.monotonic() + 30
    while local_slurm.status(state)["daemons"]["slurmd-node2"] and time.monotonic() < deadline:
        time.sleep(0.1)
    r = subprocess.run(
        [sys.executable, "-m", "opd.launch.local_slurm", "up", "--dir", str(state)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f"export SLURM_CONF={Path(info['slurm_conf'])}"
    assert "started slurmd-node2" in r.stderr
    after = local_slurm.status(state)
    assert after["up"]
    assert {k: v for k, v in after["daemons"].items() if k != "slurmd-node2"} == {
        k: v for k, v in before.items() if k != "slurmd-node2"
    }
    assert after["daemons"]["slurmd-node2"] != before["slurmd-node2"]


# --- jobs -------------------------------------------------------------------------------------------


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


def train_records(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [
        r for r in map(json.loads, lines) if "opd/divergence" in r["data"] or "actor/pg_loss" in r["data"]
    ]


def train_steps(run_dir: Path) -> list[int]:
    return [r["step"] for r in train_records(run_dir)]


def train_metrics(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r["data"] for r in train_records(run_dir)}


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
def queued(slurm_env, tmp_path_factory) -> SimpleNamespace:
    """``make sweep-opd`` over two tiny OPD points (reverse KL from ``sampled`` vs ``topk``) and, queued
    right behind it, the jobs that need nothing from a test while they run: a sweep of two failing points, and a 1-step
    tiny GRPO run on both nodes with container=apptainer through a FAKE apptainer (tests/fake_apptainer;
    Apptainer cannot be installed here) that gives each node only the variables apptainer --cleanenv
    would, then runs it on the host."""
    # DATA_DIR relative to where the user stands (make runs in the checkout): absolute at submission
    relative = dict(slurm_env, DATA_DIR=os.path.relpath(slurm_env["DATA_DIR"], REPO))
    result = make("sweep-opd", relative, "EXP=tiny_opd", "SWEEP=tiny_opd", "ARGS=cluster=ci")
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = re.findall(r"^  job (\S+)  (\S+)  (.*)$", result.stdout, flags=re.M)
    # squeue: slurmctld's own view (accounting reaches sacct a moment later)
    queued_at_return = subprocess.run(
        ["squeue", "-h", "-r", "-j", ",".join(job for job, _, _ in jobs), "-o", "%i %T"],
        env=slurm_env, capture_output=True, text=True,
    ).stdout  # fmt: skip
    # a sweep whose two points both fail inside their jobs (an estimator verl does not know)
    failing = make(
        "sweep-grpo", slurm_env, "EXP=tiny_grpo", "SWEEP=none",
        "ARGS=cluster=ci verl.trainer.val_before_train=false verl.algorithm.adv_estimator=no_such_estimator,no_such_either",
    )  # fmt: skip
    assert failing.returncode == 0, failing.stdout + failing.stderr
    failing_dir = re.search(r"^sweep: (\S+)", failing.stdout, flags=re.M).group(1)
    # chains (after=): two runs behind the failing sweep, never started; two behind the OPD sweep, the
    # last one training from the model the one before it writes
    blocked = submitted_job(
        make("submit", slurm_env, "EXP=tiny_grpo", f"AFTER={failing_dir}", "ARGS=cluster=ci")
    )
    blocked_2 = submitted_job(
        make("submit", slurm_env, "EXP=tiny_grpo", f"AFTER={blocked[1]}", "ARGS=cluster=ci")
    )
    one_step = "verl.trainer.total_training_steps=1 verl.trainer.val_before_train=false"
    sweep_dir = re.search(r"^sweep: (\S+)", result.stdout, flags=re.M).group(1)
    second = submitted_job(
        make(
            "submit", slurm_env, "EXP=tiny_grpo", f"AFTER={sweep_dir}",
            f"ARGS=cluster=ci {one_step} verl.actor_rollout_ref.actor.checkpoint.save_contents=[model,optimizer,extra,hf_model]",
        )
    )  # fmt: skip
    model = second[1] / "global_step_1" / "actor" / "huggingface"  # written by `second`, later
    third = submitted_job(
        make(
            "submit", slurm_env, "EXP=tiny_grpo", f"AFTER={second[1]}",
            f"ARGS=cluster=ci {one_step} verl.actor_rollout_ref.model.path={model}",
        )
    )  # fmt: skip
    container = tmp_path_factory.mktemp("container")
    image, calls = container / "opd.sif", container / "apptainer_calls"
    image.write_bytes(os.urandom(1 << 16))
    container_env = {
        **slurm_env,
        "PATH": f"{REPO / 'tests' / 'fake_apptainer'}:{slurm_env['PATH']}",
        "FAKE_APPTAINER_LOG": str(calls),
        "FAKE_APPTAINER_PATH": f"{REPO / '.venv' / 'bin'}:/usr/bin:/bin",
        "OPD_IMAGE": str(image),
        **SECRETS,  # set at submission: they must reach the job, and no file of the run directory
        "WANDB_MODE": "offline",
    }
    two_node = submitted_job(
        make(
            "submit", container_env, "EXP=tiny_grpo",
            "ARGS=cluster=ci resources=cpu_tiny_2node container=apptainer verl.trainer.total_training_steps=1 "
            "verl.trainer.logger=[console,file,tensorboard,wandb]",
        )
    )  # fmt: skip
    return SimpleNamespace(
        sweep_output=result.stdout,
        sweep_jobs=[(job, Path(run_dir), point) for job, run_dir, point in jobs],
        queued_at_return=dict(line.split() for line in queued_at_return.splitlines()),
        failing=SimpleNamespace(
            dir=Path(re.search(r"^sweep: (\S+)", failing.stdout, flags=re.M).group(1)),
            jobs=[
                (job, Path(run_dir))
                for job, run_dir, _ in re.findall(r"^  job (\S+)  (\S+)  (.*)$", failing.stdout, flags=re.M)
            ],
        ),
        chains=SimpleNamespace(blocked=[blocked, blocked_2], ok=[second, third], model=model),
        two_node=SimpleNamespace(job=two_node[0], run_dir=two_node[1], image=image, calls=calls),
    )


@pytest.fixture(scope="module")
def sweep(queued) -> SimpleNamespace:
    """The sweep's jobs, finished."""
    return SimpleNamespace(
        output=queued.sweep_output,
        dir=Path(re.search(r"^sweep: (\S+)", queued.sweep_output, flags=re.M).group(1)),
        jobs=queued.sweep_jobs,
        queued_at_return=queued.queued_at_return,
        states=wait_terminal([job for job, _, _ in queued.sweep_jobs]),
    )


@pytest.mark.timeout(900)
def test_sweep_returns_with_its_jobs_queued_and_every_point_completes_with_its_config_signal_and_checkpoint(
    sweep, slurm_env
):
    assert len(sweep.jobs) == 2, sweep.output
    signals = [re.search(r"\+\+verl.opd.teacher_signal=(\w+)", point).group(1) for _, _, point in sweep.jobs]
    assert sorted(signals) == ["sampled", "topk"]
    # make returned with the jobs queued, not after they ran
    assert set(sweep.queued_at_return) == {job for job, _, _ in sweep.jobs}, sweep.queued_at_return
    assert set(sweep.queued_at_return.values()) <= {"PENDING", "CONFIGURING", "RUNNING"}
    assert (sweep.dir / "launcher.log").exists()
    for job, run_dir, point in sweep.jobs:
        assert sweep.states[job]["state"] == "COMPLETED", (job, sweep.states[job], _tail(run_dir, job))
        text = (run_dir / "config.yaml").read_text()
        assert "${" not in text  # resolved: no interpolation left
        config = yaml.safe_load(text)
        signal = re.search(r"teacher_signal=(\w+)", point).group(1)
        assert config["opd"]["teacher_signal"] == signal
        # the job optimised the recipe's reverse KL from that signal (bytes per token: sampled 8, topk 8K+4)
        for data in train_metrics(run_dir).values():
            assert [k for k in data if k.startswith("opd/divergence/")] == ["opd/divergence/reverse_kl"]
            expected = 8 if signal == "sampled" else 8 * config["opd"]["topk"] + 4
            assert data["opd/teacher_signal_bytes_per_token"] == expected
        assert config["trainer"]["default_local_dir"] == str(run_dir)
        # the job ran the sweep's code snapshot, not the checkout; verl's computed total is recorded
        head = json.loads((run_dir / "logs" / f"{job}.0" / "head.json").read_text())
        assert head["code"] == str((sweep.dir / "code" / "src" / "opd").resolve())
        assert (run_dir / "code").resolve() == (sweep.dir / "code").resolve()
        assert json.loads((run_dir / "training_plan.json").read_text()) == {"total_training_steps": 2}
        for name in ("launch.yaml", "overrides.txt", "git.txt", "environment.sh", "rerun.sbatch"):
            assert (run_dir / name).is_file(), name
        assert "commit " in (run_dir / "git.txt").read_text()
        assert f"export DATA_DIR={slurm_env['DATA_DIR']}" in (run_dir / "environment.sh").read_text()
        assert train_steps(run_dir) == [1, 2]
        assert (run_dir / "global_step_2" / "actor").is_dir()
        # the job ran exactly the resolved config of its run directory
        ran = yaml.safe_load((run_dir / "logs" / f"{job}.0" / "hydra" / "config.yaml").read_text())
        assert ran == config


@pytest.mark.timeout(120)
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


@pytest.mark.timeout(120)
def test_status_summarises_the_sweep_from_sacct(sweep, slurm_env):
    result = make("status", slurm_env, f"SWEEP={sweep.dir}")
    assert result.returncode == 0, result.stderr
    for job, run_dir, _ in sweep.jobs:
        line = next(line for line in result.stdout.splitlines() if line.startswith(job))
        assert "COMPLETED" in line and str(run_dir) in line and re.search(r"\s2\s", line)
    assert "2 COMPLETED" in result.stdout


REQUEUED_STEPS = 6  # checkpoints at 2, 3 (saved for the signal), 4, 6: requeues after step 2 and in step 3


def wait_for_step(job: str, run_dir: Path, step: int) -> None:
    """Until ``step`` is checkpointed and its metrics are logged (verl saves first, then logs)."""
    marker = run_dir / "latest_checkpointed_iteration.txt"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        done = marker.exists() and marker.read_text().strip() == str(step)
        if done and (run_dir / "metrics.jsonl").exists() and step in train_steps(run_dir):
            return
        assert time.monotonic() < deadline, _tail(run_dir, job)
        assert sacct_states([job]).get(job, {}).get("state") not in TERMINAL, _tail(run_dir, job)
        time.sleep(0.5)


@pytest.mark.timeout(900)
def test_requeued_job_resumes_with_its_config_and_continues_its_metrics_and_lr_schedule(slurm_env):
    """One run requeued twice: by ``scontrol requeue`` after step 2, then by the pre-walltime signal
    (what ``--signal=USR2@N`` sends to the job step) as step 3 starts: the trainer saves step 3 (not a
    ``save_freq`` step), the node requeues, and the third attempt resumes from step 3."""
    job, run_dir = submitted_job(
        make(
            "submit", slurm_env, "EXP=tiny_opd",
            "ARGS=cluster=ci verl.trainer.total_training_steps=6 verl.trainer.save_freq=2 "
            "verl.trainer.test_freq=-1 verl.actor_rollout_ref.actor.optim.lr_warmup_steps=6",
        )
    )  # fmt: skip
    wait_for_step(job, run_dir, 2)
    subprocess.run(["scontrol", "requeue", job], env=slurm_env, check=True)
    # the second attempt has resumed from step 2 and not yet finished step 3 (a step takes ~1 s here):
    # the walltime signal now makes it save step 3, which is no save_freq step
    resumed = run_dir / "logs" / f"{job}.1" / "driver.log"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while not (resumed.exists() and "Load from checkpoint folder" in resumed.read_text()):
        assert time.monotonic() < deadline, _tail(run_dir, job)
        time.sleep(0.2)
    subprocess.run(["scancel", "--signal=USR2", job], env=slurm_env, check=True)
    assert wait_terminal([job])[job]["state"] == "COMPLETED", _tail(run_dir, job)

    attempts = [run_dir / "logs" / f"{job}.{n}" for n in range(3)]
    assert "Training from scratch" in (attempts[0] / "driver.log").read_text()
    assert "saved step 3 for the stop request" in (attempts[1] / "driver.log").read_text()
    for attempt in attempts:  # every attempt ran the code snapshot taken at submission
        code = json.loads((attempt / "head.json").read_text())["code"]
        assert code == str(run_dir / "code" / "src" / "opd"), code
    for attempt, step in ((attempts[1], 2), (attempts[2], 3)):
        driver_log = (attempt / "driver.log").read_text()
        assert re.search(rf"Load from checkpoint folder: \S*global_step_{step}\b", driver_log), driver_log[
            -3000:
        ]
    # every attempt ran the run directory's one resolved config
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    for attempt in attempts:
        assert yaml.safe_load((attempt / "hydra" / "config.yaml").read_text()) == config, attempt
    # the metrics continue exactly where each attempt stopped: every step once, in order
    metrics = train_metrics(run_dir)
    assert train_steps(run_dir) == list(range(1, REQUEUED_STEPS + 1))
    # ... and so does the lr schedule: linear warm-up over 6 steps, logged before each step's update
    lr = config["actor_rollout_ref"]["actor"]["optim"]["lr"]
    for step, data in metrics.items():
        assert data["actor/lr"] == pytest.approx(lr * (step - 1) / 6, rel=1e-6), (step, data["actor/lr"])
    assert not list(Path("/tmp").glob(f"opd-{CLUSTER}-{job}.*"))  # every attempt's Ray temp dirs removed
    assert "requeueing job" in (run_dir / "logs" / f"slurm-{job}.out").read_text()


@pytest.mark.timeout(600)
def test_two_node_job_in_the_container_runs_one_ray_cluster_across_both_nodes_fake_apptainer(queued):
    job, run_dir = queued.two_node.job, queued.two_node.run_dir
    image, calls = queued.two_node.image, queued.two_node.calls
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
        assert {name: call["env"].get(name) for name in SECRETS} == SECRETS  # reached the job, in the image
    # ... and were written nowhere in the run directory (configs, scripts, logs, metrics, W&B's files)
    for path in (p for p in run_dir.rglob("*") if p.is_file()):
        data = path.read_bytes()
        assert not any(secret.encode() in data for secret in SECRETS.values()), path
    # the run logged to TensorBoard and to W&B (offline) in its run directory, besides metrics.jsonl
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))


@pytest.mark.timeout(300)
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


@pytest.mark.timeout(600)
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
    assert time.monotonic() - killed_at < 180  # fails fast, not at the walltime (60 min)
    slurm_log = (run_dir / "logs" / f"slurm-{job}.out").read_text()
    assert "node 1 (" in slurm_log and str(attempt / "node1.log") in slurm_log, slurm_log[-3000:]


@pytest.mark.timeout(300)
def test_a_sweep_whose_points_fail_shows_every_point_failed_in_sacct_and_status_with_its_error(
    queued, slurm_env
):
    jobs = queued.failing.jobs
    assert len(jobs) == 2
    states = wait_terminal([job for job, _ in jobs])
    assert [states[job]["state"] for job, _ in jobs] == ["FAILED", "FAILED"], states
    status = make("status", slurm_env, f"SWEEP={queued.failing.dir}")
    assert "2 FAILED" in status.stdout, status.stdout
    for job, run_dir in jobs:
        driver_log = run_dir / "logs" / f"{job}.0" / "driver.log"
        assert "no_such_e" in driver_log.read_text() and "Traceback" in driver_log.read_text()
        lines = status.stdout.splitlines()
        error = lines[next(i for i, text in enumerate(lines) if text.startswith(job)) + 1]
        assert "error: opd.main_grpo exited with code" in error and str(driver_log) in error, status.stdout


@pytest.mark.timeout(900)
def test_a_chain_runs_in_order_on_its_predecessors_outputs_and_a_failed_link_cancels_the_rest(
    queued, sweep, slurm_env
):
    (second, second_dir), (third, third_dir) = queued.chains.ok
    states = wait_terminal([second, third])
    assert states[second]["state"] == states[third]["state"] == "COMPLETED", _tail(third_dir, third)

    def span(job):
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "Start,End"], env=slurm_env,
                             capture_output=True, text=True).stdout  # fmt: skip
        return out.strip().split("|")

    assert max(span(job)[1] for job, _, _ in sweep.jobs) <= span(second)[0]  # after every point of the sweep
    assert span(second)[1] <= span(third)[0]
    # the third run trained from the model the second wrote, which did not exist when it was submitted
    config = yaml.safe_load((third_dir / "config.yaml").read_text())
    assert config["actor_rollout_ref"]["model"]["path"] == str(queued.chains.model)
    assert (queued.chains.model / "config.json").is_file() and train_steps(third_dir) == [1]
    assert "afterok:" in (third_dir / "rerun.sbatch").read_text()
    # behind the failing sweep: cancelled, never started, and make status says which link failed
    (blocked, blocked_dir), (blocked_2, blocked_2_dir) = queued.chains.blocked
    states = wait_terminal([blocked, blocked_2])
    assert states[blocked]["state"] == states[blocked_2]["state"] == "CANCELLED", states
    assert not list(blocked_dir.glob("logs/*/driver.log")) and not list(
        blocked_2_dir.glob("logs/*/driver.log")
    )
    first = make("status", slurm_env, f"SWEEP={blocked_dir}").stdout
    assert re.search(r"cancelled: job \S+ of \S+, which it runs after, ended FAILED", first), first
    second_status = make("status", slurm_env, f"SWEEP={blocked_2_dir}").stdout
    assert f"cancelled: job {blocked} of {blocked_dir}, which it runs after, ended CANCELLED" in second_status


@pytest.mark.timeout(300)
def test_a_sweep_over_two_resource_sets_is_two_arrays_requesting_what_each_rerun_sbatch_does_and_cancels(
    slurm_env,
):
    """Held at submission (``--hold``), so nothing runs: pending arrays, their requests, then make cancel."""
    result = make(
        "sweep-grpo", slurm_env, "EXP=tiny_grpo", "SWEEP=none",
        "ARGS=cluster=ci resources=cpu_tiny,cpu_tiny_2node verl.data.seed=1,2 ++cluster.additional_parameters.hold=true",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    directory = Path(re.search(r"^sweep: (\S+)", result.stdout, flags=re.M).group(1))
    jobs = [
        (job, Path(run_dir), point)
        for job, run_dir, point in re.findall(r"^  job (\S+)  (\S+)  (.*)$", result.stdout, flags=re.M)
    ]
    assert len(jobs) == 4
    arrays = {}
    for job, _, point in jobs:
        arrays.setdefault(re.search(r"resources=(\w+)", point).group(1), set()).add(job.split("_")[0])
    assert all(len(ids) == 1 for ids in arrays.values()) and len(set.union(*arrays.values())) == 2, arrays
    squeue = subprocess.run(
        ["squeue", "-h", "-r", "-j", ",".join(job for job, _, _ in jobs), "-o", "%i|%D|%l|%m|%T"],
        env=slurm_env, capture_output=True, text=True,
    ).stdout  # fmt: skip
    queued = {line.split("|")[0]: line.split("|")[1:] for line in squeue.splitlines()}
    for job, run_dir, _ in jobs:
        rerun = (run_dir / "rerun.sbatch").read_text()
        nodes = re.search(r"^#SBATCH --nodes=(\d+)$", rerun, flags=re.M).group(1)
        minutes = int(re.search(r"^#SBATCH --time=(\d+)$", rerun, flags=re.M).group(1))
        memory = re.search(r"^#SBATCH --mem=(\d+)G$", rerun, flags=re.M).group(1)
        assert queued[job][:3] == [nodes, f"{minutes // 60}:{minutes % 60:02d}:00", f"{memory}G"], (
            job,
            queued[job],
        )
        assert queued[job][3] == "PENDING"
    status = make("status", slurm_env, f"SWEEP={directory}")
    assert "4 PENDING" in status.stdout, status.stdout  # pending array tasks (123_[0-1]) resolved per task
    cancel = make("cancel", slurm_env, f"SWEEP={directory}")
    assert cancel.returncode == 0 and "cancelled 4 of 4" in cancel.stdout, cancel.stdout + cancel.stderr
    states = wait_terminal([job for job, _, _ in jobs], 120)
    assert {states[job]["state"] for job, _, _ in jobs} == {"CANCELLED"}
    assert not list(directory.glob("*/logs/*/driver.log"))  # nothing ran
    launcher = int((directory / "launcher.pid").read_text())
    deadline = time.monotonic() + 60
    while Path(f"/proc/{launcher}").exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not Path(f"/proc/{launcher}").exists(), "the sweep's launcher still waits for cancelled jobs"


@pytest.mark.timeout(120)
@pytest.mark.parametrize(  # the refusals at the level users hit them: make sweep-opd / make submit
    "target,variables,unset,expected",
    [
        (
            "sweep-opd",
            ["EXP=opd", "SWEEP=tiny_opd"],
            "TEACHER_MODEL_PATH",
            ["needs TEACHER_MODEL_PATH: export TEACHER_MODEL_PATH"],
        ),
        (
            "submit",
            ["EXP=tiny_opd"],
            "DATA_DIR",
            ["grpo_processed/train.parquet", "does not exist: prepare the data first (make data"],
        ),
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
    assert all(e in result.stderr for e in expected) and "nothing was submitted" in result.stderr, (
        result.stderr
    )
    assert all_job_ids(env) == before
    assert not list(tmp_path.glob("**/rerun.sbatch"))  # no half-written run directory left behind


@pytest.mark.timeout(1200)
def test_agent_sweep_runs_both_points_with_real_tool_calls(slurm_env, tiny_agent_assets):
    """``make sweep-agent`` on the tiny agent task: two points (teacher signals), one step each, COMPLETED, the
    tools called inside the jobs (their databases reached the nodes)."""
    result = make(
        "sweep-agent", slurm_env, "EXP=tiny_opd_agent", "SWEEP=tiny_agent",
        "ARGS=cluster=ci verl.trainer.total_training_steps=1 verl.trainer.val_before_train=false",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    jobs = re.findall(r"^  job (\S+)  (\S+)  (.*)$", result.stdout, flags=re.M)
    assert len(jobs) == 2, result.stdout
    states = wait_terminal([job for job, _, _ in jobs])
    for job, run_dir, _ in jobs:
        assert states[job]["state"] == "COMPLETED", (job, states[job], _tail(Path(run_dir), job))
        (step,) = train_metrics(Path(run_dir)).values()
        assert step["tool_mask/tool_tokens"] > 0 and step["opd/target_tokens"] == step["tool_mask/llm_tokens"]
        assert (Path(run_dir) / "tool_config.yaml").is_file()  # the run's own, in its directory
    # `make report` on the finished sweep: one row per point, its numbers those of the run's metrics file
    sweep_dir = Path(jobs[0][1]).parent
    result = make("report", slurm_env, f"SWEEP={sweep_dir}")
    assert result.returncode == 0, result.stdout + result.stderr
    with open(sweep_dir / "report" / "report.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["job"] for row in rows] == [job for job, _, _ in jobs]
    assert [row["overrides"] for row in rows] == [
        "verl.opd.teacher_signal=hidden",
        "verl.opd.teacher_signal=topk",
    ]
    for row, (_, run_dir, _) in zip(rows, jobs, strict=True):
        records = [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
        (validated,) = [r["data"] for r in records if "val-core/tiny_travel/acc/mean@1" in r["data"]]
        assert row["status"] == "done" and row["step"] == "1"
        assert (
            float(row["final val-core/tiny_travel/acc/mean@1"])
            == validated["val-core/tiny_travel/acc/mean@1"]
        )
        throughput = [r["data"]["perf/throughput"] for r in records if "perf/throughput" in r["data"]]
        assert float(row["tokens_per_s"]) == pytest.approx(sum(throughput) / len(throughput))
    assert {"val_curves.png", "train_curves.png", "final.png"} <= {
        p.name for p in (sweep_dir / "report").iterdir()
    }


@pytest.mark.timeout(180)
def test_agent_sweep_without_its_databases_is_refused_before_anything_is_queued(
    slurm_env, tiny_assets, tmp_path
):
    """make sweep-agent: DATABASE_DIR unset, then one that lacks the data's task directories."""
    from opd.agent.travel.world import write_world
    from opd.data.prepare_agent_data import prepare_agent_data

    world = tmp_path / "data" / "deepplanning"
    write_world(world, seed=0, n_tasks=2, languages=("en", "zh"))
    prepare_agent_data(data_dir=world, output_dir=tmp_path / "data" / "agent_processed", train_ratio=0.5,
                       database_dir=world / "database")  # fmt: skip
    env = dict(
        slurm_env,
        MODEL_PATH=str(tiny_assets / "student"),
        TEACHER_MODEL_PATH=str(tiny_assets / "teacher"),
        DATA_DIR=str(tmp_path / "data"),
        OUTPUT_ROOT=str(tmp_path / "out"),
    )
    env.pop("DATABASE_DIR", None)
    before = all_job_ids(env)
    args = "ARGS=cluster=ci resources=cpu_tiny"
    unset = make("sweep-agent", env, args)
    (tmp_path / "empty" / "database_en").mkdir(parents=True)
    elsewhere = make("sweep-agent", dict(env, DATABASE_DIR=str(tmp_path / "empty")), args)
    for result, expected in (
        (unset, "export DATABASE_DIR="),
        (elsewhere, f"DATABASE_DIR={tmp_path / 'empty'} has no directory for"),
    ):
        assert result.returncode != 0 and expected in result.stderr, result.stderr[-2000:]
        assert "database_en/id_" in result.stderr or result is unset
        assert "nothing was submitted" in result.stderr
    assert all_job_ids(env) == before
    assert not list(tmp_path.glob("out/**/rerun.sbatch"))


def _tail(run_dir: Path, job: str) -> str:
    logs = sorted((run_dir / "logs").glob(f"slurm-{job}.out")) + sorted(
        (run_dir / "logs").glob(f"{job}.*/driver.log")
    )
    return "\n".join(f"--- {p}\n{p.read_text()[-3000:]}" for p in logs if p.exists())


# --- pipelines ----------------------------------------------------------------------------------------------


@pytest.mark.timeout(1800)
def test_tiny_s2d_runs_as_a_chain_in_order_and_a_failed_stage_rerun_continues_it(
    slurm_env, tiny_math_data, tmp_path
):
    """``make pipeline PIPELINE=s2d`` (tiny): teacher GRPO (+ conversion), teacher rollouts, forward-KL warm-up
    on them, OPD, evaluation, one job each. The rollouts stage's prompts vanish after submission, so it fails
    and the stages after it are cancelled unstarted; ``make pipeline RESUME=dir`` reruns it and the rest."""
    from transformers import AutoTokenizer

    from opd.distill import stored

    prompts = tmp_path / "prompts.parquet"
    prompts.write_bytes((tiny_math_data / "grpo_processed" / "train.parquet").read_bytes())
    quick = ["verl.actor_rollout_ref.rollout.val_kwargs.n=2"]
    quick += [f"{stage}:verl.trainer.val_before_train=false" for stage in ("teacher_rl", "warmup", "opd")]
    args = ["size=tiny", "cluster=ci", *quick, f"teacher_rollouts:verl.data.val_files=[{prompts}]"]
    result = make("pipeline", slurm_env, "PIPELINE=s2d", f"ARGS={' '.join(args)}")
    assert result.returncode == 0, result.stdout + result.stderr
    prompts.rename(tmp_path / "away.parquet")  # before the rollouts stage starts: teacher_rl takes a minute
    root = Path(re.search(r"^directory: (\S+)", result.stdout, flags=re.M).group(1))
    first = {stage: job for job, stage in re.findall(r"^  job (\S+)  (\S+)", result.stdout, flags=re.M)}
    assert list(first) == ["teacher_rl", "teacher_rollouts", "warmup", "opd", "eval"]
    dirs = {stage: root / f"{i:02d}_{stage}" for i, stage in enumerate(first, 1)}
    states = wait_terminal(list(first.values()))
    assert states[first["teacher_rl"]]["state"] == "COMPLETED", _tail(dirs["teacher_rl"], first["teacher_rl"])
    assert states[first["teacher_rollouts"]]["state"] == "FAILED", states
    for stage in ("warmup", "opd", "eval"):
        assert states[first[stage]]["state"] == "CANCELLED", (stage, states)
        assert not list(dirs[stage].glob("logs/*/driver.log"))  # never started
    (tmp_path / "away.parquet").rename(prompts)

    result = make("pipeline", slurm_env, f"RESUME={root}")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "at stage teacher_rollouts" in result.stdout
    second = {stage: job for job, stage in re.findall(r"^  job (\S+)  (\S+)", result.stdout, flags=re.M)}
    assert list(second) == ["teacher_rollouts", "warmup", "opd", "eval"]  # the finished stage is not rerun
    states = wait_terminal(list(second.values()))
    for stage, job in second.items():
        assert states[job]["state"] == "COMPLETED", (stage, states[job], _tail(dirs[stage], job))

    def span(job):
        out = subprocess.run(["sacct", "-X", "-n", "-P", "-j", job, "-o", "Start,End"], env=slurm_env,
                             capture_output=True, text=True).stdout  # fmt: skip
        return out.strip().split("|")

    chain = [first["teacher_rl"], *second.values()]
    for before, after in zip(chain, chain[1:], strict=False):
        assert span(before)[1] <= span(after)[0], (before, after)  # each stage after the one it reads

    # the teacher's rollouts: exact token ids (they decode to the generations the stage scored), scores
    rollouts = pd_read(dirs["teacher_rollouts"] / stored.ROLLOUTS_FILE)
    generations = [json.loads(line) for line in (dirs["teacher_rollouts"] / "generations.jsonl").open()]
    assert len(rollouts) == len(generations) == 32 * 2  # val_max_samples prompts x val_kwargs.n
    tokenizer = AutoTokenizer.from_pretrained(dirs["teacher_rl"] / "model")
    for row, generation in zip(rollouts.to_dict("records"), generations, strict=True):
        assert tokenizer.decode(row[stored.RESPONSE_IDS], skip_special_tokens=True) == generation["output"]
        assert row[stored.SCORE] == generation["score"]
    # the warm-up trained on them without generating, validated by generating, and handed its model on
    warmup = train_metrics(dirs["warmup"])
    assert sorted(warmup) == [1, 2] and all("opd/divergence/forward_kl" in m for m in warmup.values())
    assert all(m["timing_s/gen"] < 0.5 for m in warmup.values())  # no rollout engine call for training rows
    validated = [json.loads(line)["data"] for line in (dirs["warmup"] / "metrics.jsonl").open()]
    assert any(key.startswith("val-core/") for data in validated for key in data)
    opd_config = yaml.safe_load((dirs["opd"] / "config.yaml").read_text())
    assert opd_config["actor_rollout_ref"]["model"]["path"] == str(dirs["warmup"] / "model")
    assert opd_config["opd"]["teacher_path"] == str(dirs["teacher_rl"] / "model")
    for stage in ("teacher_rl", "warmup", "opd"):
        marker = json.loads((dirs[stage] / "model" / "opd_conversion.json").read_text())
        assert marker["verified"] and marker["source"].startswith(str(dirs[stage]))
    results = json.loads((dirs["eval"] / "eval_results.json").read_text())
    assert results["settings"]["model"] == str(dirs["opd"] / "model")
    # make report on the pipeline: one row per stage, in order, every one done
    result = make("report", slurm_env, f"SWEEP={root}")
    assert result.returncode == 0, result.stdout + result.stderr
    with open(root / "report" / "report.csv", newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["overrides"].split() for row in rows] == [
        [f"experiment=tiny_{experiment}", f"stage={stage}"]
        for stage, experiment in zip(
            first, ["grpo", "teacher_rollouts", "opd_warmup", "opd", "eval"], strict=True
        )
    ]
    assert [row["status"] for row in rows] == ["done"] * 5
    assert [row["job"] for row in rows] == chain


def pd_read(path: Path):
    import pandas as pd

    return pd.read_parquet(path)
