"""DeepPlanning travel-planning reward: the benchmark's commonsense and personalised scores, by rules.

verl custom reward (``custom_reward_function.path`` = this file, ``name`` = ``compute_score``)::

    compute_score(data_source, solution_str, ground_truth, extra_info=None, database_dir=None,
                  score_key="composite") -> dict

``solution_str`` is the policy's whole response; its final plan is the last JSON block, in DeepPlanning's
converted-plan schema (``opd.agent.travel.plan.parse_plan``: DeepPlanning has an LLM convert Markdown to
that JSON, a training reward cannot, so the policy writes the JSON itself). ``ground_truth`` is the task
record as a JSON string ``{"id", "language", "query", "meta_info"}``; ``extra_info["database"]`` is the
task's database relative to the root (``database_<lang>/id_<N>``; derived from the task's language and id
when absent). The root is ``database_dir`` (``reward_kwargs``), else the ``DATABASE_DIR`` environment
variable. Options (``custom_reward_function.reward_kwargs``):

- ``database_dir``: the directory holding ``database_<lang>/``; default ``$DATABASE_DIR``.
- ``score_key``: which score verl optimises, ``"composite"`` (default), ``"commonsense"``,
  ``"personalized"`` or ``"case_acc"``.

Scores, as DeepPlanning's ``evaluation/eval_converted.py`` defines them:

- commonsense: 8 dimensions of weight 1/8; a dimension scores 1 only when all of its checks pass.
- personalized: 1 only when every hard constraint of the task (``meta_info.hard_constraints``) passes;
  constraints of an unknown type are skipped, and a task with no known constraint scores 0 (as there).
- composite = (commonsense + personalized) / 2; case_acc = 1 only when both are 1.

The returned dict always has the same keys (verl stacks them into metrics): ``score``, ``commonsense``,
``personalized``, ``composite``, ``case_acc``, ``format_ok``, one ``cs_<dimension>`` per commonsense
dimension and one ``hard_<family>`` per hard-constraint family (flight, train, hotel, restaurant,
attraction, budget: 1 when every constraint of that family in the task passes, also when the task has
none of that family). A reply without a valid plan scores 0 everywhere with ``format_ok`` 0 and never
raises; a missing database or a malformed ground truth raises (a setup error, not a model error).
``evaluate_plan`` returns every check with its message, for analysis.

Implemented: all 21 commonsense checks and all hard-constraint families DeepPlanning scores, each
following its evaluation code rule for rule, thresholds included (Check name: rule):

- Route Consistency: ``valid_trip_duration`` (day count = meta days), ``closed_loop_route_structure``
  (day 1 "from X" and the last day's "to Y" are the origin), ``seamless_intercity_transfers`` (tracks the
  current city from the origin; every "from A to B" day has an intercity leg whose stations map to A and
  B, stations mapped to cities by the flights/trains tables, else by their first two Chinese characters).
- Sandbox Compliance: hotels (accommodation names and prices, hotel-activity names but the last day's),
  attractions (name, ticket price), restaurants (name, price per person), flight/train numbers (exist,
  price equal to one of that number's records); prices compared after rounding to integers.
- Itinerary Structure: ``traceable_accommodation`` (every day but the last has an accommodation and a
  hotel activity; the last day has none, or name "-"), ``ends_with_accommodation`` (every day but the last
  ends with a hotel activity), ``essential_meal_coverage`` and ``essential_attraction_coverage`` (the
  arrival/departure-time rules of the evaluation code, whose thresholds differ from its prompt's: no meal
  when leaving a destination before 09:00, at most one before 15:00, at least one after; two meals when
  arriving before 10:00, at least one before 15:00, at most one after; two meals at least 120 minutes
  apart; an attraction when arriving before 12:00 or leaving after 16:00; on a full day 2 attractions or
  4 hours of attraction time counting the city trips to and from them).
- Time Feasibility: ``no_time_overlaps``; ``reasonable_transfer_time`` (the gap between consecutive
  anchor activities, hotel/attraction/meal/intercity, less the buffers between them, is within the taxi
  time of ``distance_matrix.csv`` +-5 minutes widened to the enclosing multiples of 10; pairs whose
  coordinates or matrix entry are unknown are skipped, as there).
- Business Hours: attraction slots within opening hours ("Open 24 Hours"/"全天开放" always), meal slots
  within restaurant hours (midnight-crossing hours handled), no attraction on its weekly closing day
  (weekday from ``meta_info.depart_weekday``).
- Duration Rationality: attraction visit within [min_visit_hours, max_visit_hours]; meal 30-150 minutes.
- Cost Calculation Accuracy: ``budget_summary.total_estimated_budget`` within 10% of the plan's cost
  (first intercity leg of each day x people, hotel price x rooms for every night, meals and tickets x
  people, city trips x taxis of 4 people).
- Activity Diversity: no restaurant and no attraction twice.
- Hard constraints: flight/train numbers (``outbound_*_no``/``inbound_*_no``) among the plan's legs of
  that mode, the hotel among the accommodations, the restaurant among the meals, all named attractions
  visited, the plan's cost (as above) within ``budget_constraint.max_budget``.

Where we differ from DeepPlanning, and why:

- The plan is the policy's own JSON, validated by ``parse_plan`` before any check; a reply that fails
  validation (no JSON, bad JSON, a missing or mistyped field) scores 0 with ``format_ok`` 0, where
  DeepPlanning's converter would have produced some JSON and partial credit. Training needs the plan
  to be machine-readable, so malformed output earns nothing.
- Accommodation prices are read from ``price_per_night`` only (DeepPlanning also accepts ``price`` and
  ``cost`` keys, which the schema does not have).
- Durations are computed in integer minutes (DeepPlanning goes through float hours, which can truncate a
  4-hour span to 239 minutes).
- A database table that is missing or lacks a column the checks read raises ``FileNotFoundError`` /
  ``ValueError``; DeepPlanning treats it as empty and fails the checks that need it.

Databases are read read-only with pandas (every column as text, so coordinates keep the exact spelling
``distance_matrix.csv`` is keyed by) and cached per path in a bounded LRU cache.
"""

from __future__ import annotations

import functools
import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

from opd.agent.travel.plan import PlanError, parse_plan

SCORE_KEYS = ("composite", "commonsense", "personalized", "case_acc")

# DeepPlanning's eight commonsense dimensions (its names in the comments) and their checks, weight 1/8 each.
COMMONSENSE_DIMENSIONS: dict[str, tuple[str, ...]] = {
    "route_consistency": (  # Route Consistency
        "valid_trip_duration",
        "closed_loop_route_structure",
        "seamless_intercity_transfers",
    ),
    "sandbox_compliance": (  # Sandbox Compliance
        "validated_accommodation",
        "validated_attractions",
        "validated_meals",
        "validated_transportation",
    ),
    "itinerary_structure": (  # Itinerary Structure
        "traceable_accommodation",
        "ends_with_accommodation",
        "essential_meal_coverage",
        "essential_attraction_coverage",
    ),
    "time_feasibility": ("no_time_overlaps", "reasonable_transfer_time"),  # Time Feasibility
    "business_hours": (  # Business Hours
        "attraction_visit_within_opening_hours",
        "dining_within_service_hours",
        "avoidance_of_closure_days",
    ),
    "duration_rationality": ("reasonable_duration_at_attractions", "reasonable_meal_duration"),
    "cost_calculation_accuracy": ("cost_calculation_correctness",),
    "activity_diversity": ("diverse_meal_options", "diverse_attraction_options"),
}
DIMENSION_WEIGHT = 1.0 / len(COMMONSENSE_DIMENSIONS)
HARD_FAMILIES = ("flight", "train", "hotel", "restaurant", "attraction", "budget")

_DATABASE_CACHE_SIZE = 32  # tasks' databases held at once (a few MB each); a run cycles through 240 at most

_FLIGHT_MODES = ("flight", "飞机", "airplane", "plane")
_TRAIN_MODES = ("train", "火车", "railway", "高铁", "gaotie")
_ALL_DAY = ("全天开放", "Open 24 Hours")
_WEEKDAYS = {
    "monday": 1,
    "tuesday": 2,
    "wednesday": 3,
    "thursday": 4,
    "friday": 5,
    "saturday": 6,
    "sunday": 7,
    "周一": 1,
    "周二": 2,
    "周三": 3,
    "周四": 4,
    "周五": 5,
    "周六": 6,
    "周日": 7,
}
_FROM_TO = re.compile(r"from\s+(.+?)\s+to\s+([^,]+)(?=[,\s]|$)")
_PARENS = re.compile(r"[（(].*?[)）]")
_TWO_HAN = re.compile(r"^([\u4e00-\u9fa5]{2})")
_LATLON = re.compile(r"\s*([\-0-9\.]+)\s*,\s*([\-0-9\.]+)\s*$")
_CLOCK = re.compile(r"\s*(\d{1,2}):(\d{2})\s*")
_SLOT = re.compile(r"\s*(\d{1,2}:\d{2})\s*-\s*(\d{1,2}:\d{2})\s*")

Check = tuple[bool, "str | None"]

# --------------------------------------------------------------------------- database

# Columns the checks read, per table; the tables hold more (the tools read those).
_TABLES: dict[str, tuple[str, tuple[str, ...]]] = {
    "hotels": ("hotels/hotels.csv", ("name", "price")),
    "attractions": (
        "attractions/attractions.csv",
        (
            "attraction_name",
            "opening_time",
            "closing_time",
            "min_visit_hours",
            "max_visit_hours",
            "ticket_price",
            "closing_dates",
        ),
    ),
    "restaurants": (
        "restaurants/restaurants.csv",
        ("restaurant_name", "price_per_person", "opening_time", "closing_time"),
    ),
    "flights": (
        "flights/flights.csv",
        ("flight_no", "origin_city", "destination_city", "dep_station_name", "arr_station_name", "price"),
    ),
    "trains": (
        "trains/trains.csv",
        ("train_no", "origin_city", "destination_city", "dep_station_name", "arr_station_name", "price"),
    ),
    "locations": ("locations/locations_coords.csv", ("poi_name", "latitude", "longitude")),
    "distances": ("transportation/distance_matrix.csv", ("origin", "destination", "duration_minutes")),
}


@dataclass(frozen=True)
class TravelDatabase:
    """The facts of one task's database the checks need, indexed by name (cell values kept as text)."""

    path: Path
    hotels: dict[str, dict[str, str]]  # name -> row
    attractions: dict[str, dict[str, str]]  # attraction_name -> row
    restaurants: dict[str, dict[str, str]]  # restaurant_name -> row
    flights: dict[str, list[dict[str, str]]]  # flight_no -> rows (one per date / segment)
    trains: dict[str, list[dict[str, str]]]  # train_no -> rows
    coords: dict[str, tuple[str, str]]  # poi_name -> (latitude, longitude) as spelled in the CSV
    taxi_minutes: dict[tuple[str, str], str]  # ("lat,lon", "lat,lon") -> duration_minutes
    station_city: dict[str, str] = field(default_factory=dict)  # station / airport -> city


def _read_table(root: Path, table: str) -> list[dict[str, str]]:
    import pandas as pd  # only here: the module must import cheaply on the login node

    relative, columns = _TABLES[table]
    path = root / relative
    if not path.is_file():
        raise FileNotFoundError(
            f"travel database table {path} is missing; a DeepPlanning database has {relative} under "
            f"database_<lang>/id_<N>/ (check DATABASE_DIR and the row's extra_info.database)"
        )
    frame = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise ValueError(
            f"{path} lacks column(s) {missing} that the travel reward reads; "
            f"it has {list(frame.columns)}: write the table in DeepPlanning's column layout"
        )
    return frame[list(columns)].to_dict("records")


def _by_name(rows: Iterable[dict[str, str]], key: str) -> dict[str, dict[str, str]]:
    index: dict[str, dict[str, str]] = {}
    for row in rows:
        name = row[key].strip()
        if name:
            index[name] = row  # a later row of the same name wins, as in DeepPlanning's indexes
    return index


def _by_number(rows: Iterable[dict[str, str]], key: str) -> dict[str, list[dict[str, str]]]:
    index: dict[str, list[dict[str, str]]] = {}
    for row in rows:
        number = row[key].strip()
        if number:
            index.setdefault(number, []).append(row)
    return index


@functools.lru_cache(maxsize=_DATABASE_CACHE_SIZE)
def _load_database(path: str) -> TravelDatabase:
    root = Path(path)
    flights = _read_table(root, "flights")
    trains = _read_table(root, "trains")
    station_city: dict[str, str] = {}
    for row in [*flights, *trains]:
        for station, city in (
            (row["dep_station_name"], row["origin_city"]),
            (row["arr_station_name"], row["destination_city"]),
        ):
            if station.strip() and city.strip():
                station_city[station.strip()] = normalize_city(city.strip())
    coords: dict[str, tuple[str, str]] = {}
    for row in _read_table(root, "locations"):
        name, lat, lon = row["poi_name"].strip(), row["latitude"].strip(), row["longitude"].strip()
        if name and _is_float(lat) and _is_float(lon):
            coords[name] = (lat, lon)
    taxi_minutes: dict[tuple[str, str], str] = {}
    for row in _read_table(root, "distances"):
        taxi_minutes.setdefault(
            (row["origin"], row["destination"]), row["duration_minutes"]
        )  # first row wins
    return TravelDatabase(
        path=root,
        hotels=_by_name(_read_table(root, "hotels"), "name"),
        attractions=_by_name(_read_table(root, "attractions"), "attraction_name"),
        restaurants=_by_name(_read_table(root, "restaurants"), "restaurant_name"),
        flights=_by_number(flights, "flight_no"),
        trains=_by_number(trains, "train_no"),
        coords=coords,
        taxi_minutes=taxi_minutes,
        station_city=station_city,
    )


def load_database(path: str | os.PathLike) -> TravelDatabase:
    """One task's database directory (``.../database_<lang>/id_<N>``), read once and cached."""
    root = Path(path).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"travel database directory {root} does not exist")
    return _load_database(str(root))


def resolve_database_path(
    task: dict, extra_info: dict | None, database_dir: str | os.PathLike | None
) -> Path:
    """``<database_dir or $DATABASE_DIR>/<extra_info.database>``; a clear error when it is not there."""
    root = database_dir if database_dir not in (None, "") else os.environ.get("DATABASE_DIR")
    if not root:
        raise ValueError(
            "the travel reward needs the database root: set DATABASE_DIR (the directory holding "
            "database_<lang>/) or pass reward_kwargs.database_dir"
        )
    relative = (extra_info or {}).get("database")
    if not relative:
        relative = f"database_{task.get('language', 'en')}/id_{task['id']}"
    path = Path(root) / relative
    if not path.is_dir():
        raise FileNotFoundError(
            f"travel database {path} does not exist (DATABASE_DIR / database_dir = {root!s}, "
            f"row database = {relative!s}); unpack DeepPlanning's database_<lang>.zip or generate a "
            f"synthetic world under that root"
        )
    return path


# --------------------------------------------------------------------------- small parsers


def _is_float(text: Any) -> bool:
    try:
        float(text)
    except (TypeError, ValueError):
        return False
    return True


def _to_float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


def normalize_city(text: str | None) -> str | None:
    """A city name without any parenthesised part ("Beijing (Capital)" -> "Beijing")."""
    return None if text is None else _PARENS.sub("", text).strip()


def from_to(current_city: str) -> tuple[str | None, str | None]:
    """The two cities of a travel day's ``current_city`` ("from A to B"), else (None, None)."""
    match = _FROM_TO.search(current_city) if isinstance(current_city, str) else None
    return (match.group(1).strip(), match.group(2).strip()) if match else (None, None)


def _clock(text: str | None) -> int | None:
    """Minutes since midnight of "HH:MM"; "24:00" is the end of the day, 23:59."""
    match = _CLOCK.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        return None
    hour, minute = int(match.group(1)), int(match.group(2))
    if (hour, minute) == (24, 0):
        return 23 * 60 + 59
    if hour > 23 or minute > 59:
        return None
    return hour * 60 + minute


def _slot_clock(slot: str) -> tuple[int | None, int | None]:
    """The two clock times of a slot, as written (no day crossing)."""
    match = _SLOT.fullmatch(slot) if isinstance(slot, str) else None
    return (_clock(match.group(1)), _clock(match.group(2))) if match else (None, None)


def _slot_span(slot: str) -> tuple[int | None, int | None]:
    """A slot as minutes, the end moved to the next day when it is before the start."""
    start, end = _slot_clock(slot)
    if start is None or end is None:
        return None, None
    return start, end + 24 * 60 if end < start else end


def _raw_minutes(hhmm: str) -> int:
    """ "HH:MM" as H*60+M without the 24:00 mapping (the meal and attraction coverage rules read it so)."""
    hour, minute = hhmm.split(":")
    return int(hour) * 60 + int(minute)


def _slot_raw(slot: str) -> tuple[int, int]:
    start, end = slot.split("-")
    return _raw_minutes(start), _raw_minutes(end)


def _within_hours(start: int, end: int, opens: int, closes: int) -> bool:
    """Whether [start, end] (clock minutes) lies within opening hours that may cross midnight."""
    slot_crosses = end < start
    if opens <= closes:
        return not slot_crosses and start >= opens and end <= closes
    if slot_crosses:
        return start >= opens and end <= closes
    return (start >= opens and end >= opens) or (start <= closes and end <= closes)


def _round_equal(plan_value: Any, db_value: str) -> bool:
    return int(round(float(plan_value))) == int(round(float(db_value)))


def _acts(days: list[dict], kind: str) -> list[dict]:
    return [act for day in days for act in day["activities"] if act["type"] == kind]


def _name(act: dict) -> str:
    return (act["details"].get("name") or "").strip()


def _first_intercity_hour(day: dict, end: bool) -> float | None:
    for act in day["activities"]:
        if act["type"] == "travel_intercity_public":
            minutes = _raw_minutes(act["time_slot"].split("-")[1 if end else 0])
            return minutes / 60.0
    return None


# --------------------------------------------------------------------------- commonsense checks


def check_valid_trip_duration(days: list[dict], meta: dict) -> Check:
    expected = int(meta.get("days") or 0)
    ok = expected > 0 and len(days) == expected
    return ok, None if ok else f"plan has {len(days)} days, expected {expected}"


def check_closed_loop(days: list[dict], meta: dict) -> Check:
    org = normalize_city(meta.get("org"))
    start_from, _ = from_to(days[0]["current_city"])
    _, end_to = from_to(days[-1]["current_city"])
    if start_from and normalize_city(start_from) != org:
        return False, f"day 1 should depart from {org}"
    if end_to and normalize_city(end_to) != org:
        return False, f"the last day should return to {org}"
    return True, None


def _station_city(station: str, db: TravelDatabase) -> str | None:
    if station in db.station_city:
        return db.station_city[station]
    match = _TWO_HAN.match(station)
    return match.group(1) if match else None


def check_seamless_transfers(days: list[dict], meta: dict, db: TravelDatabase) -> Check:
    location = normalize_city(meta.get("org"))
    if not location:
        return False, "meta_info has no org: cannot track the traveller's city"
    problems = []
    for number, day in enumerate(days, start=1):
        city_a, city_b = from_to(day["current_city"])
        if city_a and city_b:
            a, b = normalize_city(city_a), normalize_city(city_b)
            if a != location:
                problems.append(f"D{number}: leaves {a} but the traveller is in {location}")
            legs = _acts([day], "travel_intercity_public")
            if not legs:
                problems.append(f"D{number}: {a}->{b} without a travel_intercity_public activity")
            elif not any(
                _station_city(leg["details"]["from"].strip(), db) == a
                and _station_city(leg["details"]["to"].strip(), db) == b
                for leg in legs
                if leg["details"]["from"].strip() and leg["details"]["to"].strip()
            ):
                problems.append(f"D{number}: no intercity leg goes from {a} to {b}")
            location = b
        else:
            city = normalize_city(day["current_city"])
            if not city:
                problems.append(f"D{number}: current_city is empty")
            elif city != location:
                problems.append(f"D{number}: in {city} but the traveller is in {location} (no intercity leg)")
    return (False, "; ".join(problems)) if problems else (True, None)


def check_validated_accommodation(days: list[dict], db: TravelDatabase) -> Check:
    if not db.hotels:
        return False, "the hotel table is empty"
    unknown, mismatched = [], []
    for index, day in enumerate(days):
        accommodation = day.get("accommodation")
        if not isinstance(accommodation, dict):
            continue
        name = accommodation["name"].strip()
        if not name or (index == len(days) - 1 and name == "-"):
            continue
        if name not in db.hotels:
            unknown.append(name)
            continue
        price = db.hotels[name]["price"]
        if _is_float(price) and not _round_equal(accommodation["price_per_night"], price):
            mismatched.append(f"{name}: {accommodation['price_per_night']} != {price}")
    for day in days[:-1]:
        for act in _acts([day], "hotel"):
            if _name(act) and _name(act) not in db.hotels:
                unknown.append(_name(act))
    if unknown:
        return False, f"hotels not in the database: {sorted(set(unknown))}"
    return (False, f"hotel price mismatch: {mismatched}") if mismatched else (True, None)


def _check_priced_names(acts: list[dict], index: dict, price_column: str, what: str) -> Check:
    if not index:
        return False, f"the {what} table is empty"
    unknown, mismatched = [], []
    for act in acts:
        name = _name(act)
        if not name or name not in index:
            unknown.append(name or "<empty>")
            continue
        price = index[name][price_column]
        if _is_float(price) and not _round_equal(act["details"]["cost"], price):
            mismatched.append(f"{name}: {act['details']['cost']} != {price}")
    if unknown:
        return False, f"{what}s not in the database: {sorted(set(unknown))}"
    return (False, f"{what} price mismatch: {mismatched}") if mismatched else (True, None)


def check_validated_transportation(days: list[dict], db: TravelDatabase) -> Check:
    unknown, mismatched = [], []
    for act in _acts(days, "travel_intercity_public"):
        details = act["details"]
        number = details["number"].strip()
        records = db.flights.get(number) or db.trains.get(number)
        if not records:
            unknown.append(number)
            continue
        prices = [float(r["price"]) for r in records if _is_float(r["price"])]
        if prices and not any(int(round(details["cost"])) == int(round(p)) for p in prices):
            mismatched.append(f"{number}: {details['cost']} not in {prices}")
    if unknown:
        return False, f"flight/train numbers not in the database: {sorted(set(unknown))}"
    return (False, f"intercity price mismatch: {mismatched}") if mismatched else (True, None)


def check_traceable_accommodation(days: list[dict]) -> Check:
    missing = [
        number
        for number, day in enumerate(days[:-1], start=1)
        if not (_acts([day], "hotel") and day.get("accommodation"))
    ]
    last = days[-1].get("accommodation")
    if last and last["name"].strip() not in ("", "-"):
        return False, f"the last day has accommodation {last['name']!r}; leave it out (no night is spent)"
    return (False, f"no accommodation and hotel activity on days {missing}") if missing else (True, None)


def check_ends_with_accommodation(days: list[dict]) -> Check:
    bad = [
        number
        for number, day in enumerate(days[:-1], start=1)
        if not day["activities"] or day["activities"][-1]["type"] != "hotel"
    ]
    return (False, f"days {bad} do not end at the hotel") if bad else (True, None)


def check_meal_coverage(days: list[dict], meta: dict) -> Check:
    org = normalize_city(meta.get("org"))
    if not org:
        return False, "meta_info has no org: cannot tell arrival and departure days"
    location, problems = org, []

    def gap_ok(meals: list[tuple[int, int]], number: int) -> None:
        first, second = sorted(meals)[:2]
        if second[0] - first[1] < 120:
            problems.append(f"D{number}: less than 2 hours between the two meals")

    for number, day in enumerate(days, start=1):
        city_a, city_b = from_to(day["current_city"])
        meals = [_slot_raw(act["time_slot"]) for act in _acts([day], "meal")]
        if city_a and city_b:
            a, b = normalize_city(city_a), normalize_city(city_b)
            if a == location and a != org:  # leaving a destination
                leaves = _first_intercity_hour(day, end=False)
                if leaves is not None:
                    if leaves < 9:
                        if meals:
                            problems.append(f"D{number}: leaves before 09:00, so no meal there")
                    elif leaves < 15:
                        if len(meals) > 1:
                            problems.append(f"D{number}: leaves before 15:00, so at most one meal")
                    else:
                        if not meals:
                            problems.append(f"D{number}: leaves after 15:00, so at least one meal")
                        if len(meals) > 1:
                            gap_ok(meals, number)
            if b != org:  # arriving at a destination
                arrives = _first_intercity_hour(day, end=True)
                if arrives is not None:
                    if arrives < 10:
                        if len(meals) < 2:
                            problems.append(f"D{number}: arrives before 10:00, so lunch and dinner")
                        else:
                            gap_ok(meals, number)
                    elif arrives < 15:
                        if not meals:
                            problems.append(f"D{number}: arrives before 15:00, so at least one meal")
                        if len(meals) >= 2:
                            gap_ok(meals, number)
                    elif len(meals) > 1:
                        problems.append(f"D{number}: arrives after 15:00, so at most one meal")
            location = b
        elif len(meals) < 2:
            problems.append(f"D{number}: a full day needs lunch and dinner")
        else:
            gap_ok(meals, number)
    return (False, "; ".join(problems)) if problems else (True, None)


def check_attraction_coverage(days: list[dict], meta: dict) -> Check:
    org = normalize_city(meta.get("org"))
    if not org:
        return False, "meta_info has no org: cannot tell arrival and departure days"
    location, problems = org, []
    for number, day in enumerate(days, start=1):
        city_a, city_b = from_to(day["current_city"])
        sights = _acts([day], "attraction")
        names = {_name(act) for act in sights if _name(act)}
        minutes = 0
        for act in day["activities"]:
            is_trip = act["type"] == "travel_city" and (
                act["details"]["from"].strip() in names or act["details"]["to"].strip() in names
            )
            if act["type"] == "attraction" or is_trip:
                start, end = _slot_raw(act["time_slot"])
                minutes += end - start if end >= start else end - start + 24 * 60
        if city_a and city_b:
            a, b = normalize_city(city_a), normalize_city(city_b)
            if a == location and a != org:
                leaves = _first_intercity_hour(day, end=False)
                if leaves is not None and leaves > 16.0 and not sights:
                    problems.append(f"D{number}: leaves after 16:00, so at least one attraction first")
            if b != org:
                arrives = _first_intercity_hour(day, end=True)
                if arrives is not None and arrives < 12.0 and not sights:
                    problems.append(f"D{number}: arrives before 12:00, so at least one attraction")
            location = b
        elif minutes < 240 and len(sights) < 2:
            problems.append(f"D{number}: a full day needs 2 attractions or 4 hours of sightseeing")
    return (False, "; ".join(problems)) if problems else (True, None)


def check_no_time_overlaps(days: list[dict]) -> Check:
    clashes = []
    for number, day in enumerate(days, start=1):
        spans = sorted(
            (span[0], span[1], act["type"])
            for act in day["activities"]
            if None not in (span := _slot_span(act["time_slot"]))
        )
        clashes += [
            f"D{number}: {prev[2]} and {cur[2]} overlap" for prev, cur in pairwise(spans) if cur[0] < prev[1]
        ]
    return (False, "; ".join(clashes)) if clashes else (True, None)


def _coords(name: str, db: TravelDatabase) -> tuple[str, str] | None:
    if name in db.coords:
        return db.coords[name]
    match = _LATLON.match(name)
    if match and _is_float(match.group(1)) and _is_float(match.group(2)):
        return str(float(match.group(1))), str(float(match.group(2)))
    return None


def check_transfer_time(days: list[dict], db: TravelDatabase) -> Check:
    anchors_kinds = ("hotel", "attraction", "meal", "travel_intercity_public")
    problems = []
    for number, day in enumerate(days, start=1):
        anchors = [
            (span[0], span[1], act)
            for act in day["activities"]
            if act["type"] in anchors_kinds and None not in (span := _slot_span(act["time_slot"]))
        ]
        buffers = [
            span for act in _acts([day], "buffer") if None not in (span := _slot_span(act["time_slot"]))
        ]
        for (_, prev_end, prev), (cur_start, _, cur) in pairwise(anchors):
            gap = cur_start - prev_end
            if prev_end > cur_start:
                if prev_end - cur_start <= 12 * 60:
                    continue  # an overlap: no_time_overlaps reports it
                gap += 24 * 60  # the next anchor is after midnight
            bound = cur_start + 24 * 60 if cur_start < prev_end else cur_start
            buffered = 0
            for buf_start, buf_end in buffers:
                if buf_start < prev_end:
                    buf_start, buf_end = buf_start + 24 * 60, buf_end + 24 * 60
                elif buf_end < prev_end:
                    buf_end += 24 * 60
                if prev_end <= buf_start and buf_end <= bound:
                    buffered += buf_end - buf_start
            travel = gap - buffered
            prev_name = (
                prev["details"]["to"] if prev["type"] == "travel_intercity_public" else _name(prev)
            ).strip()
            cur_name = (
                cur["details"]["from"] if cur["type"] == "travel_intercity_public" else _name(cur)
            ).strip()
            if not prev_name or not cur_name or prev_name == cur_name:
                continue
            origin, destination = _coords(prev_name, db), _coords(cur_name, db)
            if origin is None or destination is None:
                continue  # unknown place: not evaluable, as in DeepPlanning
            taxi = _to_float(db.taxi_minutes.get((",".join(origin), ",".join(destination))))
            if taxi is None:
                continue
            low = min(max(0.0, taxi - 5), (taxi // 10) * 10)
            high = max(taxi + 5, math.ceil(taxi / 10) * 10)
            if not low <= travel <= high:
                problems.append(
                    f"D{number}: {prev_name} -> {cur_name} takes {taxi:.0f} min by taxi, the plan allows "
                    f"{travel} min (buffers excluded), outside [{low:.0f}, {high:.0f}]"
                )
    return (False, "; ".join(problems)) if problems else (True, None)


def check_attraction_hours(days: list[dict], db: TravelDatabase) -> Check:
    if not db.attractions:
        return False, "the attraction table is empty"
    outside, unknown = [], []
    for act in _acts(days, "attraction"):
        row = db.attractions.get(_name(act))
        if row is None:
            continue  # validated_attractions reports it
        opens, closes = row["opening_time"].strip(), row["closing_time"].strip()
        if opens in _ALL_DAY and closes in _ALL_DAY:
            continue
        start, end = _slot_clock(act["time_slot"])
        open_at, close_at = _clock(opens), _clock(closes)
        if None in (start, end, open_at, close_at):
            unknown.append(_name(act))
        elif not _within_hours(start, end, open_at, close_at):
            outside.append(f"{_name(act)} {act['time_slot']} not within {opens}-{closes}")
    if outside:
        return False, f"attractions outside opening hours: {outside}"
    return (False, f"no opening hours for {sorted(set(unknown))}") if unknown else (True, None)


def check_meal_hours(days: list[dict], db: TravelDatabase) -> Check:
    if not db.restaurants:
        return False, "the restaurant table is empty"
    outside = []
    for act in _acts(days, "meal"):
        row = db.restaurants.get(_name(act))
        if row is None:
            continue  # validated_meals reports it
        start, end = _slot_clock(act["time_slot"])
        open_at, close_at = _clock(row["opening_time"].strip()), _clock(row["closing_time"].strip())
        if None in (open_at, close_at) or None in (start, end):
            continue  # slots are validated by parse_plan; unknown hours are skipped, as in DeepPlanning
        if not _within_hours(start, end, open_at, close_at):
            outside.append(
                f"{_name(act)} {act['time_slot']} not within {row['opening_time']}-{row['closing_time']}"
            )
    return (False, f"meals outside opening hours: {outside}") if outside else (True, None)


def check_closure_days(days: list[dict], db: TravelDatabase, meta: dict) -> Check:
    if not db.attractions:
        return False, "the attraction table is empty"
    weekday = meta.get("depart_weekday")
    if not weekday:
        return True, None
    try:
        weekday = int(weekday)
    except (TypeError, ValueError):
        return False, f"meta_info.depart_weekday {weekday!r} is not a weekday number"
    closed = []
    for index, day in enumerate(days):
        today = (weekday + index - 1) % 7 + 1
        for act in _acts([day], "attraction"):
            row = db.attractions.get(_name(act))
            if row is None:
                continue
            closing_days = {
                _WEEKDAYS.get(part.strip().lower(), _WEEKDAYS.get(part.strip()))
                for part in row["closing_dates"].split(",")
            }
            if today in closing_days:
                closed.append(f"{_name(act)} on day {index + 1} (closed {row['closing_dates']})")
    return (False, f"attractions visited on a closing day: {closed}") if closed else (True, None)


def check_attraction_durations(days: list[dict], db: TravelDatabase) -> Check:
    if not db.attractions:
        return False, "the attraction table is empty"
    bad = []
    for act in _acts(days, "attraction"):
        row = db.attractions.get(_name(act))
        if row is None:
            continue
        start, end = _slot_span(act["time_slot"])
        low, high = _to_float(row["min_visit_hours"]), _to_float(row["max_visit_hours"])
        if None in (start, end, low, high):
            bad.append(f"{_name(act)}: no duration")
        elif not low <= (end - start) / 60.0 <= high:
            bad.append(f"{_name(act)}: {(end - start) / 60.0:.2f} h not in [{low}, {high}] h")
    return (False, f"attraction visit durations: {bad}") if bad else (True, None)


def check_meal_durations(days: list[dict]) -> Check:
    bad = []
    for act in _acts(days, "meal"):
        if not _name(act):
            continue
        start, end = _slot_span(act["time_slot"])
        if start is None:
            bad.append(f"{_name(act)}: invalid time_slot")
        elif not 30 <= end - start <= 150:
            bad.append(f"{_name(act)}: {end - start} min not in [30, 150]")
    return (False, f"meal durations: {bad}") if bad else (True, None)


def plan_cost(days: list[dict], meta: dict) -> float:
    """The plan's total cost by DeepPlanning's pricing rules (see the module docstring)."""
    people = int(meta.get("people_number", 1))
    rooms = int(meta.get("room_number", 1))
    taxis = max(1, (people + 3) // 4)
    total = 0.0
    for day in days:
        legs = _acts([day], "travel_intercity_public")
        if legs and legs[0]["details"]["cost"] > 0:  # connections list the whole fare on the first leg
            total += legs[0]["details"]["cost"] * people
        for act in day["activities"]:
            cost = act["details"].get("cost") or 0
            if act["type"] in ("meal", "attraction"):
                total += cost * people
            elif act["type"] == "travel_city":
                total += cost * taxis
    for day in days[:-1]:
        accommodation = day.get("accommodation")
        if isinstance(accommodation, dict):
            total += (accommodation["price_per_night"] or 0) * rooms
    return total


def check_budget_accuracy(plan: dict, meta: dict) -> Check:
    stated = float(plan["budget_summary"]["total_estimated_budget"])
    actual = plan_cost(plan["daily_plans"], meta)
    if stated == 0:
        return (True, None) if actual == 0 else (False, f"the budget says 0, the plan costs {actual:.2f}")
    error = abs(actual - stated) / stated
    if error <= 0.10:
        return True, None
    return (
        False,
        f"the budget says {stated:.2f}, the plan costs {actual:.2f} ({error:.1%} off, more than 10%)",
    )


def _check_unique(acts: list[dict], what: str) -> Check:
    seen: set[str] = set()
    for act in acts:
        name = act["details"].get("name")
        if name and name in seen:
            return False, f"{what} {name!r} appears twice"
        if name:
            seen.add(name)
    return True, None


def commonsense_checks(plan: dict, meta: dict, db: TravelDatabase) -> dict[str, Check]:
    """Every commonsense check of a parsed plan, by DeepPlanning's check name."""
    days = plan["daily_plans"]
    return {
        "valid_trip_duration": check_valid_trip_duration(days, meta),
        "closed_loop_route_structure": check_closed_loop(days, meta),
        "seamless_intercity_transfers": check_seamless_transfers(days, meta, db),
        "validated_accommodation": check_validated_accommodation(days, db),
        "validated_attractions": _check_priced_names(
            _acts(days, "attraction"), db.attractions, "ticket_price", "attraction"
        ),
        "validated_meals": _check_priced_names(
            _acts(days, "meal"), db.restaurants, "price_per_person", "restaurant"
        ),
        "validated_transportation": check_validated_transportation(days, db),
        "traceable_accommodation": check_traceable_accommodation(days),
        "ends_with_accommodation": check_ends_with_accommodation(days),
        "essential_meal_coverage": check_meal_coverage(days, meta),
        "essential_attraction_coverage": check_attraction_coverage(days, meta),
        "no_time_overlaps": check_no_time_overlaps(days),
        "reasonable_transfer_time": check_transfer_time(days, db),
        "attraction_visit_within_opening_hours": check_attraction_hours(days, db),
        "dining_within_service_hours": check_meal_hours(days, db),
        "avoidance_of_closure_days": check_closure_days(days, db, meta),
        "reasonable_duration_at_attractions": check_attraction_durations(days, db),
        "reasonable_meal_duration": check_meal_durations(days),
        "cost_calculation_correctness": check_budget_accuracy(plan, meta),
        "diverse_meal_options": _check_unique(_acts(days, "meal"), "restaurant"),
        "diverse_attraction_options": _check_unique(_acts(days, "attraction"), "attraction"),
    }


# --------------------------------------------------------------------------- hard constraints


def hard_family(key: str) -> str | None:
    """The family of a ``meta_info.hard_constraints`` key, or None for a type DeepPlanning does not score."""
    if key == "budget_constraint":
        return "budget"
    named = ("flight", "train", "hotel", "restaurant", "attraction")
    return next((family for family in named if key.startswith(f"{family}_")), None)


def _hard_check(key: str, data: dict, plan: dict, meta: dict) -> Check:
    days = plan["daily_plans"]
    family = hard_family(key)
    if family in ("flight", "train"):
        modes = _FLIGHT_MODES if family == "flight" else _TRAIN_MODES
        numbers = {
            act["details"]["number"]
            for act in _acts(days, "travel_intercity_public")
            if act["details"]["mode"].lower() in modes
        }
        for direction in ("outbound", "inbound"):
            required_key = f"{direction}_{family}_no"
            if required_key in data and data[required_key] not in numbers:
                required = data[required_key]
                return False, f"{key}: the {direction} {family} {required} is not in the plan"
        return True, None
    if family == "hotel":
        required = data.get("hotel_name")
        if not required:
            return False, f"{key}: the constraint names no hotel"
        names = {day["accommodation"]["name"] for day in days if day.get("accommodation")}
        return (True, None) if required in names else (False, f"{key}: hotel {required!r} is not in the plan")
    if family == "restaurant":
        required = data.get("restaurant_name")
        if not required:
            return False, f"{key}: the constraint names no restaurant"
        names = {act["details"]["name"] for act in _acts(days, "meal")}
        return (
            (True, None)
            if required in names
            else (False, f"{key}: restaurant {required!r} is not in the plan")
        )
    if family == "attraction":
        required = data.get("attraction_names") or []
        if not required:
            return False, f"{key}: the constraint names no attraction"
        visited = {act["details"]["name"] for act in _acts(days, "attraction")}
        missing = [name for name in required if name not in visited]
        return (False, f"{key}: attractions {missing} are not in the plan") if missing else (True, None)
    # budget
    limit = _to_float(data.get("max_budget"))
    if limit is None:
        return False, f"{key}: max_budget {data.get('max_budget')!r} is not a number"
    cost = plan_cost(days, meta)
    return (
        (True, None) if cost <= limit else (False, f"the plan costs {cost:.2f}, over the budget {limit:.2f}")
    )


def hard_checks(plan: dict, meta: dict) -> dict[str, Check]:
    """Every scored hard constraint of the task (unknown types left out, as DeepPlanning skips them)."""
    results = {}
    for key, data in (meta.get("hard_constraints") or {}).items():
        if hard_family(key) is None:
            continue
        if not isinstance(data, dict):
            results[key] = (False, f"{key}: constraint data is not an object")
            continue
        results[key] = _hard_check(key, data, plan, meta)
    return results


# --------------------------------------------------------------------------- scores


@dataclass
class PlanEvaluation:
    """All checks of one plan with their messages, and the scores derived from them."""

    commonsense_checks: dict[str, Check]
    hard_checks: dict[str, Check]
    dimension_scores: dict[str, float]
    commonsense: float
    personalized: float

    @property
    def composite(self) -> float:
        return (self.commonsense + self.personalized) / 2

    @property
    def case_acc(self) -> float:
        return float(self.commonsense == 1.0 and self.personalized == 1.0)

    def metrics(self, score_key: str = "composite") -> dict[str, float]:
        """The reward dict: the fixed key set of ``compute_score``."""
        families = {family: 1.0 for family in HARD_FAMILIES}
        for key, (ok, _) in self.hard_checks.items():
            if not ok:
                families[hard_family(key)] = 0.0
        scores = {
            "commonsense": self.commonsense,
            "personalized": self.personalized,
            "composite": self.composite,
            "case_acc": self.case_acc,
        }
        return {
            "score": scores[score_key],
            **scores,
            "format_ok": 1.0,
            **{f"cs_{dim}": value for dim, value in self.dimension_scores.items()},
            **{f"hard_{family}": value for family, value in families.items()},
        }


def evaluate_plan(plan: dict, meta: dict, db: TravelDatabase) -> PlanEvaluation:
    """Score a plan that ``parse_plan`` accepted against its task's ``meta_info`` and database."""
    checks = commonsense_checks(plan, meta, db)
    dimensions = {
        dim: float(all(checks[name][0] for name in names)) for dim, names in COMMONSENSE_DIMENSIONS.items()
    }
    hard = hard_checks(plan, meta)
    personalized = float(bool(hard) and all(ok for ok, _ in hard.values()))
    return PlanEvaluation(
        commonsense_checks=checks,
        hard_checks=hard,
        dimension_scores=dimensions,
        commonsense=sum(dimensions.values()) * DIMENSION_WEIGHT,
        personalized=personalized,
    )


def zero_metrics() -> dict[str, float]:
    """The reward dict of a reply without a valid plan."""
    keys = ["score", *SCORE_KEYS, "format_ok"]
    keys += [f"cs_{dim}" for dim in COMMONSENSE_DIMENSIONS] + [f"hard_{family}" for family in HARD_FAMILIES]
    return dict.fromkeys(keys, 0.0)


def _task_record(ground_truth: Any) -> dict:
    task = ground_truth
    if isinstance(ground_truth, (str, bytes)):
        try:
            task = json.loads(ground_truth)
        except json.JSONDecodeError as e:
            raise ValueError(
                f"travel reward: reward_model.ground_truth is not JSON ({e}); prepare the data with "
                f"opd.data.prepare_agent_data, which stores the task record as a JSON string"
            ) from None
    if not isinstance(task, dict) or not isinstance(task.get("meta_info"), dict) or "id" not in task:
        raise ValueError(
            "travel reward: ground_truth must be the task record {'id', 'language', 'query', 'meta_info'}"
        )
    return task


def compute_score(
    data_source: str,
    solution_str: str,
    ground_truth: Any,
    extra_info: dict | None = None,
    database_dir: str | os.PathLike | None = None,
    score_key: str = "composite",
    **kwargs: Any,
) -> dict[str, float]:
    """verl reward for one DeepPlanning rollout; see the module docstring for keys and options."""
    if score_key not in SCORE_KEYS:
        raise ValueError(f"travel reward: score_key {score_key!r} is not one of {SCORE_KEYS}")
    task = _task_record(ground_truth)
    db = load_database(resolve_database_path(task, extra_info, database_dir))
    try:
        plan = parse_plan(solution_str)
    except PlanError:
        return zero_metrics()
    return evaluate_plan(plan, task["meta_info"], db).metrics(score_key)
