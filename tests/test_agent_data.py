"""Agent data preparation: DeepPlanning's travel layout -> verl parquet rows for the ``tool_agent`` loop,
every bad input refused before anything is written, and the submission-time database check."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from opd.agent.travel.plan import format_instructions
from opd.agent.travel.world import write_world
from opd.data import prepare_agent_data as cli
from opd.data.checks import InputError, check_agent_database
from opd.data.prepare_agent_data import TOOL_NAMES, prepare_agent_data

N_TASKS = 10


def write_layout(root: Path, n_tasks: int = N_TASKS, languages=("en", "zh")) -> Path:
    """DeepPlanning's published layout (query files, one database of seven CSV tables per task), synthetic."""
    write_world(root, seed=0, n_tasks=n_tasks, languages=languages)
    return root


@pytest.fixture
def layout(tmp_path, monkeypatch) -> Path:
    monkeypatch.delenv("DATABASE_DIR", raising=False)
    return write_layout(tmp_path / "deepplanning")


def rows(path: Path) -> list[dict]:
    return pq.read_table(path).to_pylist()


def test_rows_follow_the_shared_interface(layout, tmp_path):
    out = tmp_path / "out"
    counts = prepare_agent_data(layout, out, train_ratio=0.8, languages="en,zh", seed=0)
    assert counts == {"train.parquet": 16, "val_travel_en.parquet": 2, "val_travel_zh.parquet": 2}
    queries = {
        lang: {
            t["id"]: t
            for t in json.loads((layout / "data" / f"travelplanning_query_{lang}.json").read_text())
        }
        for lang in ("en", "zh")
    }
    every = [(r, "train") for r in rows(out / "train.parquet")]
    every += [(r, "val") for lang in ("en", "zh") for r in rows(out / f"val_travel_{lang}.parquet")]
    assert len(every) == 2 * N_TASKS
    for row, split in every:
        info = row["extra_info"]
        lang, task_id = info["language"], info["task_id"]
        task = queries[lang][task_id]
        database = f"database_{lang}/id_{task_id}"
        assert row["data_source"] == f"travel_{lang}"
        assert row["ability"] == "travel_planning"
        assert row["agent_name"] == "tool_agent"
        system, user = row["prompt"]
        assert system["role"] == "system" and user["role"] == "user"
        assert "tool" in system["content"] or "工具" in system["content"]
        assert user["content"].startswith(task["query"])
        assert user["content"].endswith(format_instructions(lang))
        assert row["reward_model"]["style"] == "rule"
        assert json.loads(row["reward_model"]["ground_truth"]) == {
            "id": task_id,
            "language": lang,
            "query": task["query"],
            "meta_info": task["meta_info"],
        }
        assert info["split"] == split
        assert info["index"] == int(task_id)  # position in the query file
        assert info["database"] == database
        assert (layout / "database" / database).is_dir()
        assert list(info["tools_kwargs"]) == list(TOOL_NAMES) and len(TOOL_NAMES) == 9
        for name in TOOL_NAMES:
            assert info["tools_kwargs"][name] == {"create_kwargs": {"database": database, "language": lang}}
    # the system prompt speaks the task's language
    assert rows(out / "val_travel_zh.parquet")[0]["prompt"][0]["content"].startswith("你")


def test_split_is_by_task_deterministic_and_seeded(layout, tmp_path):
    prepare_agent_data(layout, tmp_path / "a", train_ratio=0.8, seed=0)
    prepare_agent_data(layout, tmp_path / "b", train_ratio=0.8, seed=0)
    prepare_agent_data(layout, tmp_path / "c", train_ratio=0.8, seed=1)
    for name in ("train.parquet", "val_travel_en.parquet", "val_travel_zh.parquet"):
        assert pq.read_table(tmp_path / "a" / name).equals(pq.read_table(tmp_path / "b" / name))

    def split_ids(out: Path) -> dict[str, set[str]]:
        train = rows(out / "train.parquet")
        ids = {
            f"train_{lang}": {
                r["extra_info"]["task_id"] for r in train if r["extra_info"]["language"] == lang
            }
            for lang in ("en", "zh")
        }
        for lang in ("en", "zh"):
            ids[f"val_{lang}"] = {
                r["extra_info"]["task_id"] for r in rows(out / f"val_travel_{lang}.parquet")
            }
        return ids

    a, c = split_ids(tmp_path / "a"), split_ids(tmp_path / "c")
    # one trip, two languages: both translations land in the same split
    assert a["train_en"] == a["train_zh"] and a["val_en"] == a["val_zh"]
    assert len(a["train_en"]) == 8 and a["train_en"] | a["val_en"] == {str(i) for i in range(N_TASKS)}
    assert a["val_en"] != c["val_en"]  # the seed picks the split


def test_one_language(layout, tmp_path):
    counts = prepare_agent_data(layout, tmp_path / "out", train_ratio=0.5, languages=("zh",))
    assert counts == {"train.parquet": 5, "val_travel_zh.parquet": 5}
    assert {r["data_source"] for r in rows(tmp_path / "out" / "train.parquet")} == {"travel_zh"}


def test_ratio_one_writes_train_only_and_removes_a_stale_validation_file(layout, tmp_path):
    out = tmp_path / "out"
    prepare_agent_data(layout, out, train_ratio=0.8)
    assert prepare_agent_data(layout, out, train_ratio=1.0) == {"train.parquet": 2 * N_TASKS}
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet"]


def test_ratio_zero_writes_validation_only(layout, tmp_path):
    out = tmp_path / "out"
    prepare_agent_data(layout, out, train_ratio=0.8)
    counts = prepare_agent_data(layout, out, train_ratio=0.0)
    assert counts == {"val_travel_en.parquet": N_TASKS, "val_travel_zh.parquet": N_TASKS}
    assert sorted(p.name for p in out.iterdir()) == ["val_travel_en.parquet", "val_travel_zh.parquet"]
    assert {r["extra_info"]["split"] for r in rows(out / "val_travel_en.parquet")} == {"val"}


@pytest.mark.parametrize("ratio", [-0.1, 1.5])
def test_ratio_outside_zero_one_is_refused(layout, tmp_path, ratio):
    with pytest.raises(InputError, match="--train-ratio .*between 0 and 1"):
        prepare_agent_data(layout, tmp_path / "out", train_ratio=ratio)


def test_ratio_that_empties_a_split_is_refused(layout, tmp_path):
    # 10 ids * 0.05 -> 0 train ids; 0.99 -> 9 train, 1 val: fine
    with pytest.raises(InputError, match=r"leaves a split empty: en \(10 tasks, 0 train\): the train split"):
        prepare_agent_data(layout, tmp_path / "out", train_ratio=0.05)
    assert prepare_agent_data(layout, tmp_path / "out", train_ratio=0.99)["val_travel_en.parquet"] == 1


def test_unknown_language_is_refused(layout, tmp_path):
    with pytest.raises(InputError, match="--languages 'en,fr'.*from en, zh"):
        prepare_agent_data(layout, tmp_path / "out", languages="en,fr")


# Each bad input: (what to break, the words the error must contain). The output dir then stays empty.
def _missing_query_file(root: Path) -> None:
    (root / "data" / "travelplanning_query_zh.json").unlink()


def _malformed_json(root: Path) -> None:
    path = root / "data" / "travelplanning_query_en.json"
    path.write_text(path.read_text()[:-20])


def _task_without_meta_info(root: Path) -> None:
    path = root / "data" / "travelplanning_query_en.json"
    tasks = json.loads(path.read_text())
    del tasks[3]["meta_info"]
    tasks[5]["query"] = ""
    path.write_text(json.dumps(tasks))


def _duplicate_id(root: Path) -> None:
    path = root / "data" / "travelplanning_query_zh.json"
    tasks = json.loads(path.read_text())
    tasks[7]["id"] = "2"
    path.write_text(json.dumps(tasks))


def _missing_task_databases(root: Path) -> None:
    shutil.rmtree(root / "database" / "database_en" / "id_3")
    shutil.rmtree(root / "database" / "database_zh" / "id_8")


def _missing_table(root: Path) -> None:
    (root / "database" / "database_en" / "id_2" / "hotels" / "hotels.csv").unlink()
    (root / "database" / "database_zh" / "id_4" / "transportation" / "distance_matrix.csv").unlink()


def _no_database_at_all(root: Path) -> None:
    shutil.rmtree(root / "database")


BAD_INPUTS = {
    "missing query file": (
        _missing_query_file,
        ["missing query file", "travelplanning_query_zh.json", "--data-dir", "--languages"],
    ),
    "malformed json": (_malformed_json, ["travelplanning_query_en.json is not valid JSON", "line"]),
    "task lacks a field": (
        _task_without_meta_info,
        [
            "2 bad task(s)",
            "task 3 (id '3'): lacks meta_info",
            "task 5 (id '5'): query is empty",
            '"meta_info" object',
        ],
    ),
    "duplicate id": (_duplicate_id, ["travelplanning_query_zh.json: duplicate task id(s) 2", "unique"]),
    "missing task database": (
        _missing_task_databases,
        [
            "task en 3: no directory",
            "database_en/id_3/",
            "task zh 8: no directory",
            "database_zh/id_8/",
            "unzip them into",
            "database_en.zip and database_zh.zip",
        ],
    ),
    "missing table": (
        _missing_table,
        [
            "task en 2:",
            "database_en/id_2/ lacks hotels/hotels.csv",
            "task zh 4:",
            "database_zh/id_4/ lacks transportation/distance_matrix.csv",
        ],
    ),
    "no database at all": (
        _no_database_at_all,
        ["database_en/ does not exist", "database_zh/ does not exist"],
    ),
}


@pytest.mark.parametrize("name", list(BAD_INPUTS))
def test_bad_input_is_refused_and_nothing_is_written(layout, tmp_path, name):
    out, fresh = tmp_path / "out", tmp_path / "fresh"
    prepare_agent_data(layout, out, train_ratio=0.5, seed=3)  # an earlier run's output stays untouched
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    breaks, words = BAD_INPUTS[name]
    breaks(layout)
    with pytest.raises(InputError) as error:
        prepare_agent_data(layout, out, train_ratio=0.8)
    for word in words:
        assert word in str(error.value), f"{word!r} not in: {error.value}"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    with pytest.raises(InputError):
        prepare_agent_data(layout, fresh, train_ratio=0.8)
    assert not fresh.exists()


def test_many_missing_databases_are_listed_up_to_a_cap(tmp_path, monkeypatch):
    monkeypatch.delenv("DATABASE_DIR", raising=False)
    root = write_layout(tmp_path / "big", n_tasks=cli.MAX_LISTED + 5, languages=("en",))
    for folder in (root / "database" / "database_en").iterdir():
        shutil.rmtree(folder)
    with pytest.raises(InputError) as error:
        prepare_agent_data(root, tmp_path / "out", languages="en")
    assert str(error.value).count(": no directory") == cli.MAX_LISTED
    assert "... and 5 more" in str(error.value)


def test_database_dir_defaults_to_the_environment(layout, tmp_path, monkeypatch):
    moved = tmp_path / "elsewhere"
    shutil.move(layout / "database", moved)
    with pytest.raises(InputError, match="missing task databases"):
        prepare_agent_data(layout, tmp_path / "out")
    monkeypatch.setenv("DATABASE_DIR", str(moved))
    assert prepare_agent_data(layout, tmp_path / "out")["train.parquet"] == 16
    monkeypatch.delenv("DATABASE_DIR")
    assert prepare_agent_data(layout, tmp_path / "out", database_dir=moved)["train.parquet"] == 16


def test_command_line(layout, tmp_path):
    out = tmp_path / "agent_processed"
    argv = [
        "--data-dir",
        str(layout),
        "--output-dir",
        str(out),
        "--train-ratio",
        "0.8",
        "--languages",
        "en,zh",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "opd.data.prepare_agent_data", *argv],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if k != "DATABASE_DIR"},
    )
    assert result.returncode == 0, result.stderr
    for line in (
        "en: 10 tasks from",
        "checked 20 task databases",
        "en: 8 train, 2 validation tasks",
        f"16 rows  {out / 'train.parquet'}",
        "wrote 3 files to",
    ):
        assert line in result.stdout
    (layout / "data" / "travelplanning_query_en.json").write_text("{")
    result = subprocess.run(
        [sys.executable, "-m", "opd.data.prepare_agent_data", *argv], capture_output=True, text=True
    )
    assert result.returncode == 2 and "error: " in result.stderr and "is not valid JSON" in result.stderr


def test_default_output_is_beside_the_data_dir(layout, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["--data-dir", str(layout), "--languages", "en"]) == 0
    assert (layout.parent / "agent_processed" / "val_travel_en.parquet").is_file()


# --------------------------------------------------------------------------- check_agent_database


@pytest.fixture
def prepared(layout, tmp_path) -> list[str]:
    out = tmp_path / "out"
    prepare_agent_data(layout, out, train_ratio=0.8)
    return [
        str(out / "train.parquet"),
        str(out / "val_travel_en.parquet"),
        str(out / "val_travel_zh.parquet"),
    ]


def test_check_agent_database_accepts_complete_databases(layout, prepared):
    check_agent_database(prepared, str(layout / "database"))
    check_agent_database(prepared[0], str(layout / "database"))  # one file as a plain string


@pytest.mark.parametrize("unset", [None, ""])
def test_check_agent_database_refuses_an_unset_database_dir(prepared, unset):
    with pytest.raises(InputError, match="DATABASE_DIR is not set.*export DATABASE_DIR="):
        check_agent_database(prepared, unset)


def test_check_agent_database_refuses_a_missing_database_dir(prepared, tmp_path):
    with pytest.raises(InputError, match=r"DATABASE_DIR=.*/nowhere is not a directory.*unzip"):
        check_agent_database(prepared, str(tmp_path / "nowhere"))


def test_check_agent_database_names_missing_task_directories(layout, prepared):
    for i in range(7):
        shutil.rmtree(layout / "database" / "database_zh" / f"id_{i}")
    with pytest.raises(InputError) as error:
        check_agent_database(prepared, str(layout / "database"))
    message = str(error.value)
    assert "has no directory for 7 of the 20 task databases" in message
    assert message.count("database_zh/id_") == 5 and "and 2 more" in message
    assert "export DATABASE_DIR=" in message


def test_check_agent_database_names_missing_tables(layout, prepared):
    (layout / "database" / "database_en" / "id_6" / "flights" / "flights.csv").unlink()
    with pytest.raises(
        InputError, match=r"incomplete .* 1 of the 20 .*database_en/id_6/ lacks flights/flights.csv"
    ):
        check_agent_database(prepared, str(layout / "database"))


def test_check_agent_database_refuses_files_that_are_not_agent_data(layout, prepared, tmp_path):
    math = tmp_path / "math.parquet"
    pq.write_table(pq.read_table(prepared[0]).drop_columns(["extra_info"]), math)
    with pytest.raises(InputError, match="no extra_info.database column"):
        check_agent_database([*prepared, str(math)], str(layout / "database"))
    with pytest.raises(InputError, match="missing.parquet does not exist"):
        check_agent_database([str(tmp_path / "missing.parquet")], str(layout / "database"))


def test_check_agent_database_reads_only_the_database_column(prepared, layout, monkeypatch):
    read_columns = []
    original = pq.ParquetFile.read

    def recording_read(self, columns=None, **kwargs):
        read_columns.append(columns)
        return original(self, columns=columns, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "read", recording_read)
    check_agent_database(prepared, str(layout / "database"))
    assert read_columns == [["extra_info.database"]] * 3


def test_verl_reads_the_rows_for_the_tool_agent_loop(layout, tmp_path, tiny_assets):
    """verl's own dataset class hands each row's tools_kwargs and agent_name to the agent loop."""
    from omegaconf import OmegaConf
    from transformers import AutoTokenizer
    from verl.utils.dataset.rl_dataset import RLHFDataset

    out = tmp_path / "out"
    prepare_agent_data(layout, out, train_ratio=0.8)
    config = OmegaConf.create(
        {"prompt_key": "prompt", "return_raw_chat": True, "filter_overlong_prompts": False}
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_assets / "student")
    dataset = RLHFDataset([str(out / "train.parquet"), str(out / "val_travel_zh.parquet")], tokenizer, config)
    assert len(dataset) == 16 + 2
    last = dataset[len(dataset) - 1]
    assert last["agent_name"] == "tool_agent" and last["data_source"] == "travel_zh"
    assert [m["role"] for m in last["raw_prompt"]] == ["system", "user"]
    database = last["extra_info"]["database"]
    assert database.startswith("database_zh/id_")
    assert last["tools_kwargs"] == {
        name: {"create_kwargs": {"database": database, "language": "zh"}} for name in TOOL_NAMES
    }


def test_a_row_points_the_travel_tools_at_its_own_task_database(layout, tmp_path):
    """verl builds the tools from their config YAML and creates them with the row's create_kwargs: the
    hotel query of a row answers from that row's task database."""
    import asyncio
    import csv

    import yaml
    from verl.tools.utils.tool_registry import initialize_tools_from_config

    from opd.agent.travel.tools import tool_config

    out = tmp_path / "out"
    prepare_agent_data(layout, out, train_ratio=0.8)
    config_path = tmp_path / "tool_config.yaml"
    config_path.write_text(yaml.safe_dump(tool_config(str(layout / "database"), language="en")))
    tools = {tool.name: tool for tool in initialize_tools_from_config(str(config_path))}
    assert sorted(tools) == sorted(TOOL_NAMES)

    row = rows(out / "val_travel_zh.parquet")[-1]
    meta = json.loads(row["reward_model"]["ground_truth"])["meta_info"]
    hotels_csv = layout / "database" / row["extra_info"]["database"] / "hotels" / "hotels.csv"
    with open(hotels_csv, encoding="utf-8") as f:
        names = [hotel["name"] for hotel in csv.DictReader(f)]
    query = {
        "destination": meta["dest"][0],
        "checkinDate": meta["depart_date"],
        "checkoutDate": meta["return_date"],
    }

    async def ask_hotels():
        tool = tools["query_hotel_info"]
        instance, _ = await tool.create(
            create_kwargs=row["extra_info"]["tools_kwargs"][tool.name]["create_kwargs"]
        )
        try:
            return await tool.execute(instance, query)
        finally:
            await tool.release(instance)

    response, _, metrics = asyncio.run(ask_hotels())
    assert metrics["ok"] == 1, response.text
    assert any(name in response.text for name in names)
