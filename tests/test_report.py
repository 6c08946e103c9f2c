"""``python -m opd.report``: the table's numbers come from the runs' own files, runs still going are partial,
damaged files are named while the other runs are still reported, and the report imports no torch.

The run directories here are written in the exact formats the runs write (verl's file logger lines
``{"step": N, "data": {...}}``, ``jobs.tsv``, ``overrides.txt``, ``training_plan.json``, ``done.json``,
``eval_results.json``); a real finished sweep is reported in ``tests/test_slurm_launch.py``.
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest

from opd.report import ReportError, find_runs, main, report

ACC = "val-core/tiny_arith/acc/mean@1"


def write_run(
    path: Path,
    val: list[float],
    planned: int,
    done: int | None,
    *,
    overrides: list[str] = (),
    job: str = "",
    error: str | None = None,
    tail: str = "",
) -> dict:
    """A run that validated at steps 0, 2, 4, ... with accuracies ``val`` and trained to step ``done``."""
    path.mkdir(parents=True)
    lines, expected = [], {"step_s": [], "test_s": [], "throughput": [], "divergence": []}
    for i, accuracy in enumerate(val):
        step = 2 * i
        if step:
            for s in (step - 1, step):
                data = {"opd/divergence": 1.0 / s, "timing_s/step": 3.0 + s, "perf/throughput": 100.0 * s}
                lines.append({"step": s, "data": data})
                expected["step_s"].append(3.0 + s)
                expected["throughput"].append(100.0 * s)
        lines.append(
            {"step": step, "data": {ACC: accuracy, "timing_s/testing": 0.5}}
        )  # a second line, merged
        expected["test_s"].append(0.5)
    text = "".join(json.dumps(line) + "\n" for line in lines) + tail
    (path / "metrics.jsonl").write_text(text)
    (path / "training_plan.json").write_text(json.dumps({"total_training_steps": planned}))
    (path / "overrides.txt").write_text(
        "# login overrides\n" + "".join(f"{o}\n" for o in overrides) + "# verl overrides\nplatform=cpu"
    )
    if done is not None or error:
        attempt = path / "logs" / f"{job or '1'}.0"
        attempt.mkdir(parents=True)
        (attempt / "done.json").write_text(json.dumps({"code": 1 if error else 0, "error": error}))
    return expected


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture
def sweep(tmp_path) -> tuple[Path, dict]:
    """A two-point sweep (jobs.tsv): one finished run, one still going (its last line half-written)."""
    directory = tmp_path / "sweeps" / "tiny_opd" / "2026-12-04_07-00-00"
    directory.mkdir(parents=True)
    common = ["experiment=tiny_opd", "sweep=tiny_opd", "cluster=ci"]
    expected = {
        "0": write_run(
            directory / "0",
            [0.2, 0.5, 0.4],
            4,
            4,
            overrides=["++verl.opd.loss_type=forward_kl", *common],
            job="7_0",
        ),
        "1": write_run(
            directory / "1",
            [0.2, 0.3],
            4,
            None,
            overrides=["++verl.opd.loss_type=reverse_kl", *common],
            job="7_1",
            tail='{"step": 3, "data": {"opd/diverg',
        ),
    }
    (directory / "jobs.tsv").write_text(
        "".join(
            f"7_{i}\t{directory / str(i)}\t++verl.opd.loss_type={loss} {' '.join(common)}\n"
            for i, loss in ((0, "forward_kl"), (1, "reverse_kl"))
        )
    )
    return directory, expected


def test_a_sweeps_table_holds_its_runs_numbers_and_marks_the_running_one_partial(sweep):
    directory, expected = sweep
    result = report(directory)
    rows = read_csv(directory / "report" / "report.csv")
    assert [row["job"] for row in rows] == ["7_0", "7_1"]
    # only the swept key tells the runs apart
    assert [row["overrides"] for row in rows] == [
        "verl.opd.loss_type=forward_kl",
        "verl.opd.loss_type=reverse_kl",
    ]
    done, going = rows
    assert (done["status"], done["step"], done["planned_steps"]) == ("done", "4", "4")
    assert float(done[f"final {ACC}"]) == 0.4 and float(done[f"best {ACC}"]) == 0.5
    # the half-written last line of the running run is left out: its last complete step is 2
    assert (going["status"], going["step"]) == ("partial", "2")
    assert float(going[f"final {ACC}"]) == 0.3 and float(going[f"best {ACC}"]) == 0.3
    for row, key in ((done, "0"), (going, "1")):
        numbers = expected[key]
        assert float(row["wall_s"]) == pytest.approx(sum(numbers["step_s"]) + sum(numbers["test_s"]))
        assert float(row["tokens_per_s"]) == pytest.approx(
            sum(numbers["throughput"]) / len(numbers["throughput"])
        )
        assert row["peak_memory_gb"] == ""  # CPU runs record none
    text = (directory / "report" / "report.md").read_text()
    assert "1 done, 1 partial" in text and "| 1 | 7_1 | verl.opd.loss_type=reverse_kl | partial | 2 |" in text
    names = sorted(p.name for p in result["files"])
    assert names == ["final.png", "report.csv", "report.md", "train_curves.png", "val_curves.png"]
    assert all(p.stat().st_size > 1000 for p in result["files"] if p.suffix == ".png")


def test_a_damaged_metrics_file_is_named_and_the_other_runs_are_still_reported(sweep, capsys):
    directory, _ = sweep
    damaged = directory / "1" / "metrics.jsonl"
    lines = damaged.read_text().split("\n")
    damaged.write_text("\n".join([lines[0], "{not json", *lines[1:]]))
    assert main([str(directory)]) == 0
    captured = capsys.readouterr()
    assert f"warning: {directory / '1'}: {damaged}:2: not JSON" in captured.err
    rows = read_csv(directory / "report" / "report.csv")
    assert [row["status"] for row in rows] == ["done", "unreadable"]
    assert float(rows[0][f"final {ACC}"]) == 0.4
    assert f"{damaged}:2: not JSON" in (directory / "report" / "report.md").read_text()
    assert (directory / "report" / "val_curves.png").is_file()


def test_a_failed_job_is_marked_failed_with_its_error(tmp_path):
    write_run(tmp_path / "run", [0.1], 10, None, job="9", error="node 0: Ray exited with code 1")
    (row,) = report(tmp_path / "run")["rows"]
    assert (row["status"], row["problem"]) == ("failed", "node 0: Ray exited with code 1")


def test_a_folder_of_runs_is_searched_and_evaluations_are_reported(tmp_path):
    write_run(tmp_path / "stages" / "opd", [0.1, 0.6], 2, 2)
    (tmp_path / "stages" / "opd" / "checkpoints" / "global_step_2").mkdir(parents=True)  # not a run
    evaluation = tmp_path / "stages" / "eval"
    evaluation.mkdir(parents=True)
    results = {"math500": {"problems": 500, "mean@4": 0.61, "pass@4": 0.8}}
    (evaluation / "eval_results.json").write_text(json.dumps({"settings": {}, "results": results}))
    runs = find_runs(tmp_path)
    assert [run.path.name for run in runs] == ["eval", "opd"]
    rows = report(tmp_path)["rows"]
    assert rows[0]["eval/math500/mean@4"] == 0.61 and rows[0]["status"] == "done"
    assert rows[1][f"final {ACC}"] == 0.6 and rows[1]["eval/math500/mean@4"] is None


def test_a_directory_without_runs_is_refused_naming_what_was_looked_for(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ReportError, match="no runs under .*metrics.jsonl, eval_results.json, config.yaml"):
        find_runs(tmp_path / "empty")
    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_the_report_imports_no_torch(sweep):
    directory, _ = sweep
    code = (
        "import sys; from opd.report import main; main([sys.argv[1]]); "
        "assert 'torch' not in sys.modules and 'verl' not in sys.modules, 'imported'"
    )
    result = subprocess.run([sys.executable, "-c", code, str(directory)], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
