"""CPU end-to-end agent OPD through Ray, verl's tool agent loop and the real travel tool.

The tiny agent student (``make tiny-agent``) plans train trips by calling DeepPlanning's ``query_train_info``
over the generated databases; nothing is scripted. One run of two steps (rollouts and validation dumped)
serves every assertion: the calls are parsed and answered from the task's database, the answers are masked
out of the loss, and the multi-turn diagnostics are logged. Whether agent OPD improves the student is
measured by ``make demo-agent`` (README), not here.
"""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import pytest

from opd.demo import AGENT_VAL_ACCURACY, read_metrics, run_entry, tiny_agent_overrides

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(900)]

TRAIN = re.compile(
    r'"arrCityName": "(?P<arr>[^"]+)".*?"depCityName": "(?P<dep>[^"]+)".*?'
    r'"depDateTime": "(?P<date>\d{4}-\d\d-\d\d) .*?"marketingTransportNo": "(?P<no>[^"]+)"',
    re.S,
)


@pytest.fixture(scope="module")
def agent_run(tiny_agent_assets, tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("agent_opd")
    overrides = [
        *tiny_agent_overrides(tiny_agent_assets, run_dir, steps=2, test_freq=2),
        "data.train_batch_size=16",
        "actor_rollout_ref.actor.ppo_mini_batch_size=16",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=16",
        f"trainer.rollout_data_dir={run_dir / 'rollouts'}",
        f"trainer.validation_data_dir={run_dir / 'validation'}",
    ]
    code = run_entry("opd.main_opd", overrides, run_dir / "train.log")
    assert code == 0, (run_dir / "train.log").read_text()[-4000:]
    return run_dir


def database_trains(assets: Path) -> set[tuple[str, str, str, str]]:
    """(origin, destination, date, train number) of every train in the generated databases."""
    rows = set()
    for path in (assets / "database").glob("database_*/id_*/trains/trains.csv"):
        with open(path, encoding="utf-8") as handle:
            rows |= {
                (r["origin_city"], r["destination_city"], r["dep_date"], r["train_no"])
                for r in csv.DictReader(handle)
            }
    return rows


def test_the_student_calls_the_tool_and_its_answers_come_from_the_task_database(agent_run, tiny_agent_assets):
    known = database_trains(tiny_agent_assets)
    records = [
        json.loads(line) for path in sorted((agent_run / "rollouts").glob("*.jsonl")) for line in path.open()
    ]
    assert len(records) == 2 * 16
    answered = [list(TRAIN.finditer(r["output"])) for r in records]
    with_answers = [found for found in answered if found]
    # the student calls the tool in most rollouts (it was taught to; sampling at temperature 1 varies it)
    assert len(with_answers) >= len(records) // 2, [r["output"][:300] for r in records[:3]]
    for found in with_answers:
        for match in found:
            assert (match["dep"], match["arr"], match["date"], match["no"]) in known, match.group(0)[:400]


def test_tool_answers_are_masked_out_of_the_loss_and_turns_are_logged(agent_run):
    steps = [r["data"] for r in read_metrics(agent_run) if "opd/divergence" in r["data"]]
    assert len(steps) == 2
    for data in steps:
        assert data["tool_mask/has_agent_mask"] == 1.0 and data["tool_mask/tool_tokens"] > 0
        # exactly the model's own tokens enter the divergence: the tool's answers are left out
        assert data["opd/target_tokens"] == data["tool_mask/llm_tokens"]
        assert data["tool_mask/tool_ratio"] == pytest.approx(
            data["tool_mask/tool_tokens"] / (data["tool_mask/tool_tokens"] + data["tool_mask/llm_tokens"])
        )
        # prompt + call + tool answer + answer: at least four turns in the longest rollout
        assert data["num_turns/max"] >= 4 and data["num_turns/min"] >= 2
        assert data["opd/divergence"] > 0
    validated = [r["data"] for r in read_metrics(agent_run) if AGENT_VAL_ACCURACY in r["data"]]
    assert [d["val-aux/num_turns/max"] >= 4 for d in validated] == [
        True,
        True,
    ]  # before training and at step 2
