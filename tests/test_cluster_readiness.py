"""What a real GPU cluster needs from the launch layer, checked without one: the GPU-environment check
(against a FAKE CUDA interpreter), the finished-run guard from the steps verl computed, the walltime
signal's requeue budget, and ``make status`` / ``make cancel`` reading sacct's array syntax."""

from __future__ import annotations

import json
import signal
import sys
from pathlib import Path

import pytest
import yaml

from conftest import REPO
from opd import preemption
from opd.launch import SubmissionError
from opd.launch.rundir import check_gpu_environment
from opd.launch.status import array_task_ids, failure, parse_sacct

FAKE_CUDA_PYTHON = REPO / "tests" / "fake_cuda_python" / "python"


def test_gpu_request_refuses_a_cpu_torch_and_accepts_a_cuda_build_fake_interpreter():
    with pytest.raises(
        SubmissionError, match=r"asks for GPUs, but the job's Python .* CPU-only build.*make setup ENV=gpu"
    ):
        check_gpu_environment([sys.executable], "sglang", "resources (gpus_per_node=8)")
    info = check_gpu_environment([str(FAKE_CUDA_PYTHON)], "sglang", "resources (gpus_per_node=8)")
    assert info["cuda"] == "12.8"
    with pytest.raises(
        SubmissionError, match=r"rolls out with vllm, which the job's Python .* cannot import"
    ):
        check_gpu_environment([str(FAKE_CUDA_PYTHON)], "vllm", "resources (gpus_per_node=8)")


def test_a_gpu_run_from_the_cpu_venv_is_refused_at_submission(
    tiny_assets, tiny_math_data, tmp_path, monkeypatch
):
    from opd.launch.rundir import prepare
    from test_launch_config import login

    monkeypatch.setenv("DATA_DIR", str(tiny_math_data))
    overrides = ["experiment=tiny_grpo", "resources=gpu_1x1"]
    with pytest.raises(SubmissionError, match=r"CPU-only build"):
        prepare(login(*overrides), tmp_path / "run", overrides)
    assert not (tmp_path / "run" / "rerun.sbatch").exists()


def _run_dir(tmp_path: Path, trainer: dict, cluster: dict | None = None) -> Path:
    run_dir = tmp_path / "run"
    (run_dir / "logs").mkdir(parents=True)
    (run_dir / "config.yaml").write_text(
        yaml.safe_dump({"trainer": {"nnodes": 1, "device": "cpu", **trainer}})
    )
    launch = {"experiment": {"entry": "opd.main_grpo"}, "cluster": {"max_requeues": 2, **(cluster or {})}}
    (run_dir / "launch.yaml").write_text(yaml.safe_dump(launch))
    return run_dir


def test_finished_guard_reads_the_total_steps_verl_computed_when_the_config_sets_epochs(
    tmp_path, monkeypatch
):
    from opd.launch.node import Node

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    run_dir = _run_dir(tmp_path, {"total_training_steps": None, "total_epochs": 2})
    (run_dir / "latest_checkpointed_iteration.txt").write_text("12")
    assert Node(run_dir).finished_step() is None  # no plan recorded yet: nothing says it is finished
    (run_dir / preemption.PLAN).write_text(json.dumps({"total_training_steps": 12}))
    assert Node(run_dir).finished_step() == 12
    (run_dir / preemption.PLAN).write_text(json.dumps({"total_training_steps": 20}))
    assert Node(run_dir).finished_step() is None


def test_walltime_signal_requests_a_save_once_and_past_the_budget_fails_naming_the_rerun(
    tmp_path, monkeypatch
):
    from opd.launch.node import JobFailed, Node

    monkeypatch.setenv("SLURM_JOB_ID", "77")
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    run_dir = _run_dir(tmp_path, {"total_training_steps": 5}, {"signal_delay_s": 100})
    node = Node(run_dir)
    node.on_stop_signal(signal.SIGUSR2, None)
    first = node.stop_signal_at
    node.on_stop_signal(signal.SIGUSR2, None)  # the signal may come twice (job step and wrapper)
    assert node.stop_signal_at == first and (run_dir / preemption.STOP_REQUEST).exists()
    assert node.stop_deadline() - first == pytest.approx(70)  # signal_delay_s minus the requeue margin (30 s)
    with pytest.raises(JobFailed, match=r"step 3 is saved.*past cluster.max_requeues=2.*rerun.sbatch"):
        node.requeue(3)


@pytest.mark.parametrize(
    "job_id,expected",
    [
        ("123_[3-5%256]", ["123_3", "123_4", "123_5"]),
        ("123_[0,2-3]", ["123_0", "123_2", "123_3"]),
        ("123_7", ["123_7"]),
        ("456", ["456"]),
    ],
)
def test_status_expands_sacct_array_syntax(job_id, expected):
    assert array_task_ids(job_id) == expected


def test_pending_array_tasks_and_failed_points_are_reported_with_their_error(tmp_path):
    states = parse_sacct(
        "123_0|RUNNING|0:0|00:01:00|node1\n123_[1-2%256]|PENDING|0:0|00:00:00|None assigned\n"
    )
    assert {k: v["state"] for k, v in states.items()} == {
        "123_0": "RUNNING",
        "123_1": "PENDING",
        "123_2": "PENDING",
    }
    attempt = tmp_path / "logs" / "123_1.0"
    attempt.mkdir(parents=True)
    (attempt / "done.json").write_text(
        json.dumps({"code": 1, "error": "opd.main_grpo exited with code 1: see x"})
    )
    assert failure(tmp_path, "123_1") == "opd.main_grpo exited with code 1: see x"
    assert "see " in failure(tmp_path, "999")


def test_a_chained_run_waits_for_every_upstream_job_and_its_future_inputs_are_checked_in_the_job(
    tiny_assets, tiny_math_data, tmp_path, monkeypatch
):
    from opd.launch.rundir import prepare
    from test_launch_config import login

    monkeypatch.setenv("DATA_DIR", str(tiny_math_data))
    upstream = tmp_path / "sweep"
    upstream.mkdir()
    (upstream / "jobs.tsv").write_text(f"41_0\t{upstream}/0\tx\n41_1\t{upstream}/1\ty\n")
    model = upstream / "0" / "global_step_1" / "actor" / "huggingface"  # not written yet
    monkeypatch.chdir(tmp_path)  # given relative to where the user stands: made absolute all the same
    relative = model.relative_to(tmp_path)
    overrides = [
        "experiment=tiny_grpo",
        f"after=[{upstream}]",
        f"++verl.actor_rollout_ref.model.path={relative}",
    ]
    run_dir = prepare(login(*overrides), tmp_path / "run", overrides)
    script = (run_dir / "rerun.sbatch").read_text()
    assert (
        "#SBATCH --dependency=afterok:41_0:41_1\n" in script
        and "#SBATCH --kill-on-invalid-dep=yes\n" in script
    )
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["actor_rollout_ref"]["model"]["path"] == str(
        model
    )
    # the same missing model outside a chain's upstream directories is refused at submission
    lone = ["experiment=tiny_grpo", f"++verl.actor_rollout_ref.model.path={model}"]
    with pytest.raises(SubmissionError, match=r"does not exist"):
        prepare(login(*lone), tmp_path / "lone", lone)
    # an upstream directory that is not a submitted run or sweep
    bad = ["experiment=tiny_grpo", f"after=[{tmp_path}]"]
    with pytest.raises(SubmissionError, match=r"after=.*no jobs.tsv there"):
        prepare(login(*bad), tmp_path / "bad", bad)


def test_array_tasks_cancelled_before_they_started_take_the_arrays_record(monkeypatch):
    import subprocess as sp

    from opd.launch import status

    def fake_run(command, **kwargs):  # a FAKE sacct: what it prints for an array cancelled while pending
        assert command[0] == "sacct"
        return sp.CompletedProcess(command, 0, "64|CANCELLED by 0|0:0|00:00:00|None assigned\n", "")

    monkeypatch.setattr(status.subprocess, "run", fake_run)
    states = status.sacct_states(["64_0", "64_1"])
    assert states["64_0"]["state"] == states["64_1"]["state"] == "CANCELLED"
