"""metrics.jsonl across the attempts of a requeued job: the driver trims it to the step the run resumes
from (``opd.runtime.resume_step`` / ``trim_metrics_file``), and verl's file logger appends to it
(``keep_metrics_across_attempts``). The whole path, on SLURM: test_slurm_launch.py's requeue test."""

from __future__ import annotations

import json

from omegaconf import OmegaConf

from opd.runtime import keep_metrics_across_attempts, resume_step, trim_metrics_file


def write_records(path, steps, torn_tail: bool = False) -> None:
    lines = [json.dumps({"step": s, "data": {"x": float(s)}}) + "\n" for s in steps]
    path.write_text("".join(lines) + ('{"step": 9, "da' if torn_tail else ""))


def steps_in(path) -> list[int]:
    return [json.loads(line)["step"] for line in path.read_text().splitlines()]


def test_trim_keeps_the_steps_up_to_the_resumed_checkpoint_and_drops_a_torn_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_records(path, [0, 1, 2, 2, 3], torn_tail=True)  # step 2: training and validation records
    trim_metrics_file(str(path), 2)
    assert steps_in(path) == [0, 1, 2, 2]


def test_trim_from_scratch_keeps_nothing_and_a_missing_file_stays_missing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_records(path, [0, 1, 2])
    trim_metrics_file(str(path), 0)
    assert path.read_text() == ""
    trim_metrics_file(str(tmp_path / "none.jsonl"), 3)
    assert not (tmp_path / "none.jsonl").exists()


def test_resume_step_reads_what_verl_will_resume_from(tmp_path):
    def config(**trainer):
        return OmegaConf.create({"trainer": {"default_local_dir": str(tmp_path), **trainer}})

    assert resume_step(config(resume_mode="auto")) == 0  # no checkpoint yet
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("4")
    assert resume_step(config(resume_mode="auto")) == 4
    assert resume_step(config(resume_mode="disable")) == 0
    path = str(tmp_path / "global_step_2")
    assert resume_step(config(resume_mode="resume_path", resume_from_path=path)) == 2


def test_verls_file_logger_appends_after_the_patch(tmp_path, monkeypatch):
    from verl.utils.tracking import FileLogger

    path = tmp_path / "metrics.jsonl"
    write_records(path, [1, 2])  # the first attempt's records, trimmed to the resumed step 2
    monkeypatch.setenv("VERL_FILE_LOGGER_PATH", str(path))
    monkeypatch.setattr(FileLogger, "__init__", FileLogger.__init__)  # restored after the test
    keep_metrics_across_attempts()
    keep_metrics_across_attempts()  # idempotent: every Ray worker's setup hook calls it
    logger = FileLogger("opd", "run")
    logger.log({"x": 3.0}, step=3)
    logger.finish()
    assert steps_in(path) == [1, 2, 3]
