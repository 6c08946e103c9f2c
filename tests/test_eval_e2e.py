"""``python -m opd.main_eval`` (through ``bash jobs/eval_math.sh``): validation-only generation on the
processed eval sets, mean@n / pass@k / maj@k per data source, generations dumped; and its input checks."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from conftest import run_launcher, tiny_launcher_env
from opd.demo import read_metrics
from opd.evaluation import GENERATIONS_FILE, RESULTS_FILE, summarize
from opd.rewards.math_reward import compute_score

SOURCES = ["aime24", "aime25", "math"]


@pytest.fixture(scope="module")
def eval_run(tiny_assets, tiny_raw_data, tmp_path_factory):
    output_root = tmp_path_factory.mktemp("eval_outputs")
    env = tiny_launcher_env(tiny_assets, tiny_raw_data, output_root, VAL_N="2", INSTRUCTION_VARIANT="none")
    log = output_root / "launcher.log"
    assert run_launcher("eval_math.sh", env, log) == 0, log.read_text()[-4000:]
    run_dir = output_root / "eval" / "student-eval-none-math_reward-local"
    return run_dir, log.read_text()


@pytest.mark.e2e
@pytest.mark.timeout(600)  # includes the eval_math.sh run (~1-2 min on 2 busy cores)
def test_eval_prints_the_table_and_writes_results_that_match_the_generations(eval_run):
    run_dir, log = eval_run
    assert "data source  problems  mean@2  pass@1  pass@2  maj@1  maj@2" in log
    results = json.loads((run_dir / RESULTS_FILE).read_text())
    settings, scores = results["settings"], results["results"]
    assert settings["instruction_variant"] == "none" and settings["reward_function"] == "math_reward"
    assert settings["sampling"] == {"n": 2, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "do_sample": True}
    assert sorted(scores) == SOURCES
    records = [json.loads(line) for line in (run_dir / GENERATIONS_FILE).read_text().splitlines()]
    assert len(records) == 3 * 8 * 2
    for record in records:  # every dumped sample re-scores to what the run recorded
        rescored = compute_score(solution_str=record["output"], ground_truth=record["ground_truth"])
        assert rescored["acc"] == record["acc"] and rescored["pred"] == record["pred"], record
    assert summarize(records) == scores
    for source in SOURCES:
        row = scores[source]
        assert row["problems"] == 8 and row["n"] == 2
        assert row["pass@1"] == pytest.approx(row["mean@2"])
        assert row["mean@2"] <= row["pass@2"] <= 1.0
        in_line = f"\n{source} "
        assert in_line in log
    # verl's own validation metric, computed independently, agrees on mean@2
    (step0,) = [r["data"] for r in read_metrics(run_dir)]
    for source in SOURCES:
        assert step0[f"val-core/{source}/acc/mean@2"] == pytest.approx(scores[source]["mean@2"])
    # evaluation only: the student's tiny accuracy is neither 0 nor 1 here, and nothing was trained or saved
    assert 0.0 < sum(r["acc"] for r in records) < len(records)
    assert not list(run_dir.glob("global_step_*"))


def _main_eval(env_updates: dict, *overrides: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("VAL_", "INSTRUCTION_", "REWARD_"))}
    env.update(env_updates)
    return subprocess.run(
        [sys.executable, "-m", "opd.main_eval", "platform=cpu", *overrides],
        env=env,
        capture_output=True,
        text=True,
    )


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"INSTRUCTION_VARIANT": "fancy"}, "INSTRUCTION_VARIANT=fancy: choose one of boxed, dapo, none"),
        ({"REWARD_FUNCTION": "exact"}, "REWARD_FUNCTION=exact: choose one of math_reward, math_dapo, boxed"),
        ({"VAL_N": "0"}, "VAL_N must be >= 1"),
    ],
)
def test_bad_eval_settings_are_refused_before_anything_runs(env, message, tiny_assets, tmp_path):
    result = _main_eval(
        dict(env, DATA_DIR=str(tmp_path), OUTPUT_ROOT=str(tmp_path / "out")),
        f"actor_rollout_ref.model.path={tiny_assets / 'student'}",
    )
    assert result.returncode == 2 and message in result.stderr, result.stderr[-2000:]


def test_missing_eval_files_name_the_command_that_makes_them(tiny_assets, tmp_path):
    result = _main_eval(
        {"DATA_DIR": str(tmp_path), "OUTPUT_ROOT": str(tmp_path / "out"), "INSTRUCTION_VARIANT": "dapo"},
        f"actor_rollout_ref.model.path={tiny_assets / 'student'}",
    )
    assert result.returncode == 2
    assert "eval_processed/dapo/val_math500.parquet" in result.stderr
    assert (
        f"python -m opd.data.process_eval_data --data-dir {tmp_path} --instruction-variant dapo"
        in result.stderr
    )
    # dapo prompts ask for an "Answer:" line, math_reward reads a boxed answer: said before the error
    assert "warning: INSTRUCTION_VARIANT=dapo with REWARD_FUNCTION=math_reward" in result.stderr
