"""The tiny agent task: find trains with DeepPlanning's ``query_train_info`` tool, on CPU.

Each task asks for the train of one trip (``Which train goes from Avon to Ely on 2025-11-14?``) or of a trip
and its return; the answer is the train number(s) in ``\\boxed{}``. The number is nowhere in the prompt: it
lives in the task's database, so a model succeeds only by calling the tool with the right arguments
(copied from the question) and reading the number out of the tool's JSON answer. One trip needs one call,
a round trip two calls in sequence. The databases are in DeepPlanning's layout
(``database_en/id_<k>/trains/trains.csv``, the columns its tools read) and the real travel tool answers,
through verl's tool agent loop, exactly as it does for DeepPlanning's data.

Sizes are chosen for a 2-core CPU: 8 cities x 10 dates give 560 trips per database; four databases (rows
name theirs in ``extra_info.database``, as DeepPlanning's rows do) give 2,240 distinct trips. Each
(origin, destination, date) has exactly one direct train, so the tool's answer is one short route.

The reward (``compute_score``) is 1 when the last boxed answer lists exactly the task's train numbers in
order. Everything is derived from ``random.Random(seed)``: the same seed writes the same files.
"""

from __future__ import annotations

import csv
import datetime as dt
import json
import random
from pathlib import Path

from opd.rewards.boxed import last_boxed

DATA_SOURCE = "tiny_travel"
LANGUAGE = "en"
TOOL = "query_train_info"
CITIES = ["Avon", "Brill", "Corby", "Derry", "Ely", "Frome", "Goole", "Hythe"]
DATES = [(dt.date(2025, 11, 10) + dt.timedelta(days=d)).isoformat() for d in range(10)]
N_DATABASES = 4
ROUND_TRIP_SHARE = 0.3  # tasks that need two tool calls
TRAIN_PREFIXES = ["G", "D", "K", "T", "Z"]
TRAIN_NUMBERS = [f"{p}{n}" for p in TRAIN_PREFIXES for n in range(11, 23)]  # 60: a guess is right 1 in 60
SEAT_CLASS = "Second Class Seat"
TRAIN_TYPES = {"G": "High-speed Rail", "D": "EMU", "K": "Fast", "T": "Express", "Z": "Direct Express"}

ONE_WAY = [
    "Which train goes from {a} to {b} on {d}?",
    "I travel from {a} to {b} on {d}. Which train can I take?",
    "Find the train from {a} to {b} on {d}.",
]
ROUND_TRIP = [
    "Which trains go from {a} to {b} on {d} and back on {r}?",
    "I go from {a} to {b} on {d} and return on {r}. Which trains can I take?",
]
INSTRUCTION = "Put the train numbers in \\boxed{}, in travel order."


def database_name(index: int) -> str:
    """A row's database, relative to DATABASE_DIR (DeepPlanning's ``database_<lang>/id_<N>``)."""
    return f"database_{LANGUAGE}/id_{index}"


def _trains(rng: random.Random) -> dict[tuple[str, str, str], dict]:
    """One direct train per (origin, destination, date) of one database, its number drawn from
    ``TRAIN_NUMBERS`` (so trips share numbers, as a daily train does). Each number is one token of the task's
    tokenizer (``ENTITY_PATTERN``), so reading it out of the tool's answer is a single copy: written as a
    letter and two digit tokens, the digits had to be picked out of an answer full of other digits (times,
    prices, durations), and a 2-layer model took ~2,500 steps to learn that instead of ~800."""
    trains = {}
    for a in CITIES:
        for b in CITIES:
            if a == b:
                continue
            for date in DATES:
                trains[(a, b, date)] = {
                    "no": rng.choice(TRAIN_NUMBERS),
                    "dep": rng.randrange(6 * 60, 21 * 60, 5),
                    "dur": rng.randrange(40, 240, 5),
                    "seats": str(rng.randrange(1, 30)) if rng.random() < 0.8 else "",
                    "price": f"{rng.randrange(60, 600)}.0",
                }
    return trains


def write_databases(database_dir: Path, seed: int) -> list[dict]:
    """Write every database (``database_en/id_<k>/``) and return each one's trains. The task only needs
    ``trains/trains.csv``; the other six tables are written with their header alone, so each database
    is complete in DeepPlanning's layout (which the submission check requires of every task)."""
    from opd.agent.travel.world import COLUMNS, TABLES

    rng = random.Random(seed)
    databases = []
    for index in range(N_DATABASES):
        trains = _trains(rng)
        for table, relative in TABLES.items():
            if table != "trains":
                empty = database_dir / database_name(index) / relative
                empty.parent.mkdir(parents=True, exist_ok=True)
                empty.write_text(",".join(COLUMNS[table]) + "\n", encoding="utf-8")
        path = database_dir / database_name(index) / "trains" / "trains.csv"
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=COLUMNS["trains"])
            writer.writeheader()
            for route, ((a, b, date), train) in enumerate(sorted(trains.items()), 1):
                departure = dt.datetime.fromisoformat(date) + dt.timedelta(minutes=train["dep"])
                arrival = departure + dt.timedelta(minutes=train["dur"])
                writer.writerow(
                    {
                        "origin_city": a,
                        "destination_city": b,
                        "dep_date": date,
                        "route_index": str(route),
                        "segment_index": "1",
                        "train_no": train["no"],
                        "train_type": TRAIN_TYPES[train["no"][0]],
                        "dep_station_code": a[:2].upper() + "S",
                        "dep_station_name": f"{a} South Station",
                        "arr_station_code": b[:2].upper() + "S",
                        "arr_station_name": f"{b} South Station",
                        "dep_datetime": departure.strftime("%Y-%m-%d %H:%M"),
                        "arr_datetime": arrival.strftime("%Y-%m-%d %H:%M"),
                        "duration": str(train["dur"]),
                        "seat_class": SEAT_CLASS,
                        "seat_status": train["seats"],
                        "price": train["price"],
                    }
                )
        databases.append(trains)
    return databases


def all_trips() -> list[tuple]:
    """Every question the task can ask: (database, origin, destination, date, return date or None)."""
    trips = []
    for index in range(N_DATABASES):
        for a in CITIES:
            for b in CITIES:
                if a == b:
                    continue
                for i, date in enumerate(DATES):
                    trips.append((index, a, b, date, None))
                    if i + 2 < len(DATES):
                        trips.append((index, a, b, date, DATES[i + 2]))
    return trips


def make_row(trip: tuple, databases: list[dict], split: str, row_index: int, rng: random.Random) -> dict:
    """One verl RL row of the tool agent loop (the layout of ``opd.data.prepare_agent_data``'s rows)."""
    index, a, b, date, back = trip
    trains = databases[index]
    if back is None:
        question = rng.choice(ONE_WAY).format(a=a, b=b, d=date)
        answer = [trains[(a, b, date)]["no"]]
    else:
        question = rng.choice(ROUND_TRIP).format(a=a, b=b, d=date, r=back)
        answer = [trains[(a, b, date)]["no"], trains[(b, a, back)]["no"]]
    database = database_name(index)
    legs = [(a, b, date)] + ([(b, a, back)] if back else [])
    return {
        "data_source": DATA_SOURCE,
        "agent_name": "tool_agent",
        "prompt": [{"role": "user", "content": f"{question} {INSTRUCTION}"}],
        "ability": "travel_planning",
        "reward_model": {"style": "rule", "ground_truth": ", ".join(answer)},
        "extra_info": {
            "split": split,
            "index": row_index,
            "task_id": f"{index}-{a}-{b}-{date}-{back or ''}",
            "language": LANGUAGE,
            "database": database,
            "legs": json.dumps(legs),
            "tools_kwargs": {TOOL: {"create_kwargs": {"database": database, "language": LANGUAGE}}},
        },
    }


def make_splits(seed: int, database_dir: Path, n_train: int, n_val: int) -> dict:
    """Databases under ``database_dir`` and train/val frames of distinct trips (val never in train); a
    ``ROUND_TRIP_SHARE`` of each split needs two tool calls."""
    import pandas as pd

    databases = write_databases(database_dir, seed)
    rng = random.Random(seed + 1)
    trips = all_trips()
    rng.shuffle(trips)
    one_way = [t for t in trips if t[4] is None]
    round_trip = [t for t in trips if t[4] is not None]
    frames = {}
    for split, size in (("val", n_val), ("train", n_train)):
        n_round = round(size * ROUND_TRIP_SHARE)
        if n_round > len(round_trip) or size - n_round > len(one_way):
            raise ValueError(f"only {len(trips)} distinct trips; asked for {n_train} + {n_val}")
        chosen = [round_trip.pop() for _ in range(n_round)] + [one_way.pop() for _ in range(size - n_round)]
        rng.shuffle(chosen)
        frames[split] = pd.DataFrame(
            [make_row(trip, databases, split, i, rng) for i, trip in enumerate(chosen)]
        )
    return frames


def tool_call_text(origin: str, destination: str, date: str) -> str:
    """The teacher's tool call, in the hermes format verl's parser reads (``<tool_call>{json}</tool_call>``)."""
    call = {"name": TOOL, "arguments": {"origin": origin, "destination": destination, "depDate": date}}
    return f"<tool_call>\n{json.dumps(call)}\n</tool_call>"


def answer_text(ground_truth: str) -> str:
    return f"\\boxed{{{ground_truth}}}"


def assistant_turns(row: dict) -> list[str]:
    """The teacher trace's assistant turns for a row: one tool call per leg, then the boxed answer."""
    legs = json.loads(row["extra_info"]["legs"])
    return [tool_call_text(*leg) for leg in legs] + [answer_text(row["reward_model"]["ground_truth"])]


def _answers(text: str | None) -> list[str] | None:
    return None if text is None else [part.strip() for part in text.split(",") if part.strip()]


def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict:
    """``acc`` (and ``score``) 1.0 when the last ``\\boxed{}`` of the reply lists exactly the task's train
    numbers, in order; ``boxed`` 1.0 when there is a boxed answer at all."""
    found = last_boxed(solution_str)
    correct = float(_answers(found) == _answers(ground_truth))
    return {"score": correct, "acc": correct, "boxed": float(found is not None)}
