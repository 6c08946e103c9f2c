"""python -m opd.data.prepare_agent_data --data-dir data/deepplanning --output-dir data/agent_processed --train-ratio 0.8 [--languages en,zh] [--seed 0] [--database-dir DIR]

Multi-turn agent data for DeepPlanning travel planning: each task becomes one row of verl's RL parquet format,
run by verl's ``tool_agent`` loop with the nine travel tools reading that task's own database.

Input: DeepPlanning's travel layout as published (the synthetic world of ``opd.agent.travel.world`` writes
the same one)::

    <data-dir>/data/travelplanning_query_<lang>.json      a JSON list of tasks {"id", "query", "meta_info", ...}
    <data-dir>/database/database_<lang>/id_<id>/          the task's seven tables (CHECKED_TABLES)

Output, in <output-dir>:

- ``train.parquet``: the train split of every language;
- ``val_travel_<lang>.parquet``: the validation split of one language (data_source ``travel_<lang>``).

The split is by task: the ids of all languages are pooled and permuted with ``--seed``, and the first
``int(n_ids * train_ratio)`` ids train. DeepPlanning's English and Chinese task with the same id are one
trip in two languages, so a trip never sits in train in one language and in validation in the other.
``--train-ratio 1`` writes ``train.parquet`` only and ``--train-ratio 0`` only the validation files (all
tasks for evaluation); any other ratio must leave both splits of every language non-empty. A file of the
split that was not written, left over from an earlier run, is removed: it would overlap the new split.

Row format (agreed with the tools and the reward): ``prompt`` = system message + user message (the task's
query followed by ``opd.agent.travel.plan.format_instructions``, which asks for the final plan as JSON);
``reward_model.ground_truth`` = the JSON of ``{"id", "language", "query", "meta_info"}``;
``extra_info.database`` = ``database_<lang>/id_<id>`` relative to DATABASE_DIR (``--database-dir``, default
$DATABASE_DIR, else <data-dir>/database),
and ``extra_info.tools_kwargs`` hands that directory and the language to each of the nine tools.
``extra_info.index`` is the task's position in its query file.

Everything is validated before anything is written (query files, task fields, duplicate ids, every
task's seven tables, empty splits); files are written under temporary names and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections import Counter
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pyarrow as pa

from opd.agent.travel.plan import format_instructions
from opd.data.checks import AGENT_DATABASE_TABLES, InputError
from opd.data.math_sources import default_data_dir, write_tables
from opd.runtime import exit_on_input_error

LANGUAGES = ("en", "zh")
DEFAULT_LANGUAGES = ("en", "zh")
# DeepPlanning's nine travel tools, by the names of tools/tool_schema_<lang>.json (the policy calls them so)
TOOL_NAMES = (
    "query_train_info",
    "query_flight_info",
    "query_hotel_info",
    "query_attraction_details",
    "recommend_attractions",
    "search_location",
    "query_road_route_info",
    "recommend_restaurants",
    "query_restaurant_details",
)
CHECKED_TABLES = AGENT_DATABASE_TABLES
ABILITY = "travel_planning"
AGENT_NAME = "tool_agent"
TRAIN_FILE = "train.parquet"
# how many problem lines an error message shows before summing up the rest
MAX_LISTED = 20
# a task id becomes a directory name: nothing that could leave database_<lang>/
_SAFE_ID = re.compile(r"[A-Za-z0-9_.-]+")

_CREATE_KWARGS = pa.struct([("database", pa.string()), ("language", pa.string())])
AGENT_SCHEMA = pa.schema(
    [
        ("data_source", pa.string()),
        ("prompt", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string())]))),
        ("ability", pa.string()),
        ("agent_name", pa.string()),
        ("reward_model", pa.struct([("style", pa.string()), ("ground_truth", pa.string())])),
        (
            "extra_info",
            pa.struct(
                [
                    ("index", pa.int64()),
                    ("split", pa.string()),
                    ("task_id", pa.string()),
                    ("language", pa.string()),
                    ("database", pa.string()),
                    (
                        "tools_kwargs",
                        pa.struct(
                            [(name, pa.struct([("create_kwargs", _CREATE_KWARGS)])) for name in TOOL_NAMES]
                        ),
                    ),
                ]
            ),
        ),
    ]
)

# Paraphrases the job DeepPlanning's agent is given (gather facts with tools, then plan; never ask the
# user; every fact from a tool answer, names verbatim) and the rules its commonsense checks score. The
# answer format itself comes from opd.agent.travel.plan, appended to the user message.
SYSTEM_PROMPTS = {
    "en": """You are an expert travel planner. Plan the trip the user asks for, using the tools you are given.

The user's request is complete: it states every preference. Never ask questions and never ask for confirmation.

Work in two stages.
1. Gather facts with the tools: trains and flights between cities, hotels, attractions, restaurants, the coordinates of places and the routes between them. Every fact in your plan (names, times, prices, distances) must come from a tool answer in this conversation: never invent or guess one, and write every name exactly as the tools spell it.
2. When you know enough, write the plan and stop calling tools.

A sound plan:
- covers exactly the requested days, leaves from the user's origin on the first day and returns there on the last;
- takes trains and flights with the times and prices the tools gave, with buffer time before departures and after arrivals;
- lists each day's activities in time order, without gaps or overlaps, and travels between any two different places with a city route (walking up to 2 km, taxi beyond);
- visits attractions when they are open, for their recommended time, without repeating one on another day;
- has lunch and dinner (1 to 2 hours each, at least 2 hours apart) on full days at restaurants open then, without repeating one;
- ends every day but the last at the hotel, with the requested number of rooms;
- meets every requirement of the request, and states a budget that adds up exactly: per-person prices times travellers, rooms times nights, taxis per car of up to 4 people.""",
    "zh": """你是一位旅行规划专家。请使用提供给你的工具，为用户规划其所要求的行程。

用户的请求已经完整，包含其全部偏好：不要提问，也不要请用户确认。

分两个阶段工作。
1. 用工具收集事实：城市间的火车和航班、酒店、景点、餐厅、地点坐标及地点之间的路线。计划中的每一项事实（名称、时间、价格、距离）都必须来自本次对话中的工具返回结果：不得编造或猜测，所有名称必须与工具返回的写法完全一致。
2. 信息足够后，写出计划，不再调用工具。

合理的计划应当：
- 恰好覆盖所要求的天数，第一天从用户的出发地出发，最后一天返回出发地；
- 火车和航班的时间与价格与工具结果一致，出发前和到达后留出缓冲时间；
- 每天的活动按时间顺序排列，不留空档、不重叠；两个不同地点之间用市内路线衔接（2 公里以内步行，超过则打车）；
- 在景点开放时间内按建议时长游览，不同日期不重复同一景点；
- 完整游玩日安排午餐和晚餐（各 1 到 2 小时，两餐间隔至少 2 小时），餐厅在用餐时段营业，不重复同一餐厅；
- 除最后一天外，每天以回到酒店结束，房间数与要求一致；
- 满足请求中的全部要求，并给出精确相加的预算：人均价格乘以人数，房价乘以房间数和晚数，出租车按每车最多 4 人计算。""",
}


class Task(NamedTuple):
    language: str
    index: int  # position in the query file
    id: str
    query: str
    meta_info: dict


def query_file(data_dir: Path, language: str) -> Path:
    return data_dir / "data" / f"travelplanning_query_{language}.json"


def database_name(language: str, task_id: str) -> str:
    """A task's database directory relative to DATABASE_DIR (``extra_info.database``)."""
    return f"database_{language}/id_{task_id}"


def default_output_dir(data_dir: Path) -> Path:
    return data_dir.parent / "agent_processed"


def default_database_dir(data_dir: Path) -> Path:
    """$DATABASE_DIR when set (the folder the run's tools will read), else <data-dir>/database."""
    return Path(os.environ.get("DATABASE_DIR") or data_dir / "database")


def parse_languages(value: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """``"en,zh"`` (or a sequence) -> ``("en", "zh")``, checked and without repeats."""
    items = value.split(",") if isinstance(value, str) else list(value)
    languages = tuple(dict.fromkeys(item.strip() for item in items if item.strip()))
    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if not languages or unknown:
        raise InputError(
            f"--languages {value!r}: give a comma-separated list from {', '.join(LANGUAGES)} (e.g. en,zh)"
        )
    return languages


def load_tasks(data_dir: Path, language: str) -> list[Task]:
    """Every task of one language's query file, validated; raise InputError naming each bad task."""
    path = query_file(data_dir, language)
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise InputError(
            f"{path} is not valid JSON ({error.msg}, line {error.lineno} column {error.colno}): restore the "
            "file from DeepPlanning's data/ folder or regenerate it"
        ) from error
    except UnicodeDecodeError as error:
        raise InputError(
            f"{path} is not UTF-8 text ({error}): restore it from DeepPlanning's data/ folder"
        ) from error
    if not isinstance(records, list) or not records:
        raise InputError(
            f"{path} must hold a non-empty JSON list of tasks "
            '[{"id": "0", "query": "...", "meta_info": {...}}, ...]; found '
            + ("an empty list" if isinstance(records, list) else type(records).__name__)
        )
    tasks, problems = [], []
    for index, record in enumerate(records):
        where = f"task {index}"
        if not isinstance(record, dict):
            problems.append(f"{where}: not a JSON object")
            continue
        missing = [key for key in ("id", "query", "meta_info") if key not in record]
        if missing:
            problems.append(f"{where} (id {record.get('id')!r}): lacks {', '.join(missing)}")
            continue
        raw_id, query, meta_info = record["id"], record["query"], record["meta_info"]
        task_id = str(raw_id) if isinstance(raw_id, (str, int)) and not isinstance(raw_id, bool) else ""
        if not _SAFE_ID.fullmatch(task_id) or task_id in (".", ".."):
            problems.append(f"{where}: id {raw_id!r} is not a plain name (letters, digits, _ . -)")
        elif not isinstance(query, str) or not query.strip():
            problems.append(f"{where} (id {raw_id!r}): query is empty or not a string")
        elif not isinstance(meta_info, dict):
            problems.append(
                f"{where} (id {raw_id!r}): meta_info is {type(meta_info).__name__}, not an object"
            )
        else:
            tasks.append(Task(language, index, task_id, query, meta_info))
    if problems:
        raise InputError(
            f"{path}: {len(problems)} bad task(s):\n{_listing(problems)}\n"
            'every task needs "id" (e.g. "0"), a non-empty "query" string and a "meta_info" object: fix '
            "these entries or restore the file from DeepPlanning's data/ folder"
        )
    duplicates = sorted(task_id for task_id, n in Counter(t.id for t in tasks).items() if n > 1)
    if duplicates:
        raise InputError(
            f"{path}: duplicate task id(s) {', '.join(duplicates)}: each id names one database directory "
            "(id_<id>), so ids must be unique; renumber or drop the duplicates"
        )
    return tasks


def check_databases(database_dir: Path, tasks: list[Task]) -> None:
    """Every task's database directory holds the seven tables; list all that do not, in one error."""
    problems = []
    for language in dict.fromkeys(t.language for t in tasks):
        root = database_dir / f"database_{language}"
        if not root.is_dir():
            problems.append(f"{root}/ does not exist (the whole {language} database)")
            continue
        for task in (t for t in tasks if t.language == language):
            folder = database_dir / database_name(language, task.id)
            if not folder.is_dir():
                problems.append(f"task {language} {task.id}: no directory {folder}/")
                continue
            missing = [table for table in CHECKED_TABLES if not (folder / table).is_file()]
            if missing:
                problems.append(f"task {language} {task.id}: {folder}/ lacks {', '.join(missing)}")
    if problems:
        zips = " and ".join(f"database_{lang}.zip" for lang in dict.fromkeys(t.language for t in tasks))
        raise InputError(
            f"missing task databases under {database_dir}:\n{_listing(problems)}\n"
            f"each task needs {database_dir}/database_<lang>/id_<id>/ with {', '.join(CHECKED_TABLES)}. "
            f"Download DeepPlanning's {zips} and unzip them into {database_dir}/, or point --database-dir "
            "(default $DATABASE_DIR, else <data-dir>/database) at the folder that holds database_<lang>/"
        )


def split_ids(tasks: list[Task], train_ratio: float, seed: int) -> set[str]:
    """The ids that train: a seeded permutation of the ids of all languages, pooled."""
    ids = sorted({t.id for t in tasks}, key=lambda i: (not i.isdigit(), int(i) if i.isdigit() else 0, i))
    order = np.random.default_rng(seed).permutation(len(ids))
    n_train = int(len(ids) * train_ratio)
    return {ids[i] for i in order[:n_train]}


def check_ratio(train_ratio: float) -> None:
    if not 0 <= train_ratio <= 1:
        raise InputError(
            f"--train-ratio {train_ratio}: use a share between 0 and 1 (1: all tasks train, no validation "
            "files; 0: all tasks for validation, no train.parquet)"
        )


def check_splits(tasks_by_language: dict[str, list[Task]], train_ids: set[str], train_ratio: float) -> None:
    """With a ratio strictly between 0 and 1 every language needs tasks in both splits."""
    if train_ratio in (0, 1):
        return
    empty = []
    for language, tasks in tasks_by_language.items():
        n_train = sum(t.id in train_ids for t in tasks)
        if n_train in (0, len(tasks)):
            split = "train" if n_train == 0 else "validation"
            empty.append(f"{language} ({len(tasks)} tasks, {n_train} train): the {split} split is empty")
    if empty:
        raise InputError(
            f"--train-ratio {train_ratio} leaves a split empty: {'; '.join(empty)}. Choose a ratio that "
            "keeps both splits non-empty, add tasks, or use --train-ratio 1 (train only) or 0 (validation only)"
        )


def system_prompt(language: str) -> str:
    return SYSTEM_PROMPTS[language]


def user_message(task: Task) -> str:
    """The task's query followed by the final-answer format the reward parses."""
    return f"{task.query.rstrip()}\n\n{format_instructions(task.language)}"


def agent_row(task: Task, split: str) -> dict:
    """One task as a row of verl's RL parquet format for the ``tool_agent`` loop."""
    database = database_name(task.language, task.id)
    ground_truth = {
        "id": task.id,
        "language": task.language,
        "query": task.query,
        "meta_info": task.meta_info,
    }
    create_kwargs = {"database": database, "language": task.language}
    return {
        "data_source": f"travel_{task.language}",
        "prompt": [
            {"role": "system", "content": system_prompt(task.language)},
            {"role": "user", "content": user_message(task)},
        ],
        "ability": ABILITY,
        "agent_name": AGENT_NAME,
        "reward_model": {"style": "rule", "ground_truth": json.dumps(ground_truth, ensure_ascii=False)},
        "extra_info": {
            "index": task.index,
            "split": split,
            "task_id": task.id,
            "language": task.language,
            "database": database,
            "tools_kwargs": {name: {"create_kwargs": dict(create_kwargs)} for name in TOOL_NAMES},
        },
    }


def agent_table(tasks: list[Task], split: str) -> pa.Table:
    return pa.Table.from_pylist([agent_row(t, split) for t in tasks], schema=AGENT_SCHEMA)


def val_file(language: str) -> str:
    return f"val_travel_{language}.parquet"


def prepare_agent_data(
    data_dir: str | Path | None = None,
    output_dir: str | Path | None = None,
    train_ratio: float = 0.8,
    languages: str | tuple[str, ...] = DEFAULT_LANGUAGES,
    seed: int = 0,
    database_dir: str | Path | None = None,
) -> dict[str, int]:
    """Write the agent parquet files; return ``{file name: row count}``. Raises InputError on bad input,
    before anything is written.

    data_dir: DeepPlanning's travel folder (default $DATA_DIR/deepplanning, else ./data/deepplanning).
    output_dir: where the parquet files go (default: ``agent_processed`` beside data_dir).
    train_ratio: share of task ids that train, in [0, 1].
    languages: which query files to read (``en``, ``zh``).
    seed: seed of the task permutation; the same seed and tasks give the same split.
    database_dir: the folder holding ``database_<lang>/``, i.e. the run's DATABASE_DIR (default
        $DATABASE_DIR, else <data-dir>/database); only checked here, the rows name databases relative to it.
    """
    data_dir = Path(data_dir) if data_dir is not None else default_data_dir() / "deepplanning"
    output_dir = Path(output_dir) if output_dir is not None else default_output_dir(data_dir)
    database_dir = Path(database_dir) if database_dir is not None else default_database_dir(data_dir)
    languages = parse_languages(languages)
    check_ratio(train_ratio)

    missing = [
        str(query_file(data_dir, lang)) for lang in languages if not query_file(data_dir, lang).is_file()
    ]
    if missing:
        raise InputError(
            f"missing query file(s): {', '.join(missing)}. Expected DeepPlanning's travel layout under "
            f"{data_dir}: data/travelplanning_query_<lang>.json and database/database_<lang>/id_<id>/. Copy "
            "DeepPlanning's travelplanning/data/ folder there, point --data-dir at it, or drop the language "
            "from --languages"
        )
    tasks_by_language = {lang: load_tasks(data_dir, lang) for lang in languages}
    for lang, tasks in tasks_by_language.items():
        print(f"{lang}: {len(tasks)} tasks from {query_file(data_dir, lang)}")
    every_task = [t for tasks in tasks_by_language.values() for t in tasks]
    check_databases(database_dir, every_task)
    print(f"checked {len(every_task)} task databases under {database_dir}")

    train_ids = split_ids(every_task, train_ratio, seed)
    check_splits(tasks_by_language, train_ids, train_ratio)
    tables: dict[str, pa.Table] = {}
    if train_ratio > 0:
        tables[TRAIN_FILE] = agent_table([t for t in every_task if t.id in train_ids], "train")
    if train_ratio < 1:
        for lang, tasks in tasks_by_language.items():
            tables[val_file(lang)] = agent_table([t for t in tasks if t.id not in train_ids], "val")

    for lang, tasks in tasks_by_language.items():
        n_train = sum(t.id in train_ids for t in tasks)
        print(f"{lang}: {n_train} train, {len(tasks) - n_train} validation tasks (seed {seed})")
    write_tables({output_dir / name: table for name, table in tables.items()})
    skipped = [name for name in [TRAIN_FILE, *map(val_file, languages)] if name not in tables]
    for name in skipped:
        stale = output_dir / name
        if stale.exists():
            stale.unlink()  # an earlier run's split would overlap this one
            print(f"removed {stale}, left by an earlier run: --train-ratio {train_ratio} writes no such file")
    return {name: table.num_rows for name, table in tables.items()}


def _listing(lines: list[str]) -> str:
    shown = [f"  {line}" for line in lines[:MAX_LISTED]]
    if len(lines) > MAX_LISTED:
        shown.append(f"  ... and {len(lines) - MAX_LISTED} more")
    return "\n".join(shown)


def report(counts: dict[str, int], output_dir: Path) -> None:
    for name, rows in counts.items():
        print(f"{rows:>7} rows  {output_dir / name}")
    print(f"wrote {len(counts)} files to {output_dir}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opd.data.prepare_agent_data",
        description="DeepPlanning travel tasks -> verl parquet for multi-turn agent training.",
    )
    parser.add_argument(
        "--data-dir",
        "--data_dir",
        dest="data_dir",
        type=Path,
        help="DeepPlanning's travel folder, holding data/ and database/ (default: $DATA_DIR/deepplanning)",
    )
    parser.add_argument(
        "--output-dir",
        "--output_dir",
        dest="output_dir",
        type=Path,
        help="where to write (default: agent_processed beside --data-dir)",
    )
    parser.add_argument(
        "--database-dir",
        "--database_dir",
        dest="database_dir",
        type=Path,
        help="the folder holding database_<lang>/, the run's DATABASE_DIR (default: $DATABASE_DIR, else "
        "<data-dir>/database)",
    )
    parser.add_argument(
        "--train-ratio",
        "--train_ratio",
        dest="train_ratio",
        type=float,
        default=0.8,
        help="share of tasks that train; 1: train.parquet only, 0: validation files only (default 0.8)",
    )
    parser.add_argument(
        "--languages", default=",".join(DEFAULT_LANGUAGES), help="comma-separated, from en,zh (default en,zh)"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the task permutation (default 0)")
    args = parser.parse_args(argv)
    data_dir = args.data_dir or default_data_dir() / "deepplanning"
    output_dir = args.output_dir or default_output_dir(data_dir)
    try:
        counts = prepare_agent_data(
            data_dir, output_dir, args.train_ratio, args.languages, args.seed, args.database_dir
        )
    except InputError as error:
        exit_on_input_error(error)
    report(counts, output_dir)
    return 0


if __name__ == "__main__":
    sys.exit(main())
