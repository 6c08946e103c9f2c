"""The DeepPlanning plan schema (opd.agent.travel.plan) and the rule reward (opd.rewards.travel).

One hand-written two-day plan (Hefei -> Nanjing -> Hefei by train, two people, one room) passes every
commonsense check and every hard constraint against a small database written here in DeepPlanning's CSV
layout; each rule then has one mutation of the plan, the task or the database that fails exactly it.
"""

from __future__ import annotations

import copy
import csv
import json
from pathlib import Path

import pytest

from opd.agent.travel.plan import PlanError, format_instructions, parse_plan
from opd.rewards import travel
from opd.rewards.travel import compute_score, evaluate_plan, load_database

# --------------------------------------------------------------------------- the database

STATIONS = {"Hefei South Railway Station": (31.80, 117.29), "Nanjing South Railway Station": (31.97, 118.80)}
HOTEL = ("Orange Hotel", 32.04, 118.78)
ATTRACTIONS = {  # name: (lat, lon, opening, closing, min h, max h, ticket, closing_dates)
    "City Wall": (32.06, 118.79, "08:00", "18:00", "1", "3", "50", ""),
    "Confucius Temple": (32.02, 118.79, "Open 24 Hours", "Open 24 Hours", "1", "4", "0", "Monday"),
    "Xuanwu Lake": (32.07, 118.80, "06:00", "22:00", "1", "5", "0", ""),
    "Presidential Palace": (32.05, 118.80, "08:30", "17:30", "2", "4", "40", "周一"),
}
RESTAURANTS = {  # name: (lat, lon, opening, closing, price per person)
    "Duck House": (32.03, 118.78, "10:00", "22:00", "80"),
    "Noodle Bar": (32.02, 118.78, "10:00", "21:00", "40"),
    "Tea House": (32.07, 118.79, "11:00", "14:00", "60"),
    "Spice Kitchen": (32.05, 118.79, "16:00", "22:00", "70"),
}
TAXI_MINUTES = {  # consecutive anchors of the plan (and of its mutations) -> minutes by taxi
    ("Nanjing South Railway Station", "Orange Hotel"): 30,
    ("Orange Hotel", "City Wall"): 20,
    ("City Wall", "Duck House"): 10,
    ("Duck House", "Confucius Temple"): 20,
    ("Confucius Temple", "Noodle Bar"): 10,
    ("Noodle Bar", "Orange Hotel"): 20,
    ("Confucius Temple", "Orange Hotel"): 20,
    ("Orange Hotel", "Xuanwu Lake"): 20,
    ("Xuanwu Lake", "Tea House"): 10,
    ("City Wall", "Tea House"): 10,
    ("Tea House", "Presidential Palace"): 20,
    ("Presidential Palace", "Spice Kitchen"): 10,
    ("Presidential Palace", "Duck House"): 10,
    ("Spice Kitchen", "Nanjing South Railway Station"): 30,
    ("Duck House", "Nanjing South Railway Station"): 30,
}


def _write(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def write_database(root: Path, attractions=None, restaurants=None, skip=()) -> Path:
    """A task database in DeepPlanning's layout under ``root/database_en/id_0``."""
    attractions = attractions or ATTRACTIONS
    restaurants = restaurants or RESTAURANTS
    db = root / "database_en" / "id_0"
    leg = ["dep_date", "dep_datetime", "arr_datetime", "duration", "seat_class", "seat_status"]
    stations = ["Hefei", "Nanjing", "Hefei South Railway Station", "Nanjing South Railway Station"]
    tables = {
        "trains/trains.csv": (
            [
                "train_no",
                "origin_city",
                "destination_city",
                "dep_station_name",
                "arr_station_name",
                "price",
                *leg,
            ],
            [
                [
                    "G1",
                    *stations,
                    "100",
                    "2025-11-12",
                    "2025-11-12 08:00",
                    "2025-11-12 09:00",
                    "60",
                    "2nd",
                    "9",
                ],
                ["G2", *[stations[i] for i in (1, 0, 3, 2)], "100", "2025-11-13", "", "", "60", "2nd", "9"],
            ],
        ),
        "flights/flights.csv": (
            [
                "flight_no",
                "origin_city",
                "destination_city",
                "dep_station_name",
                "arr_station_name",
                "price",
                *leg,
            ],
            [["MU1", "Hefei", "Nanjing", "Hefei Xinqiao Airport", "Nanjing Lukou Airport", "500", *[""] * 6]],
        ),
        "hotels/hotels.csv": (
            ["name", "address", "latitude", "longitude", "hotel_star", "price", "score", "brand", "city"],
            [[HOTEL[0], "1 Road", HOTEL[1], HOTEL[2], "3", "400", "4.5", "Orange", "Nanjing"]],
        ),
        "attractions/attractions.csv": (
            [
                "attraction_name",
                "latitude",
                "longitude",
                "opening_time",
                "closing_time",
                "min_visit_hours",
                "max_visit_hours",
                "ticket_price",
                "closing_dates",
                "city",
            ],
            [[name, *values, "Nanjing"] for name, values in attractions.items()],
        ),
        "restaurants/restaurants.csv": (
            ["restaurant_name", "latitude", "longitude", "opening_time", "closing_time", "price_per_person"],
            [[name, *values] for name, values in restaurants.items()],
        ),
        "locations/locations_coords.csv": (
            ["poi_name", "latitude", "longitude", "poi_type"],
            [[name, f"{lat:.6f}", f"{lon:.6f}", "poi"] for name, (lat, lon) in _places().items()],
        ),
        "transportation/distance_matrix.csv": (
            ["origin", "destination", "distance_meters", "duration_minutes", "cost"],
            [[_key(a), _key(b), "1000", str(minutes), "10"] for (a, b), minutes in TAXI_MINUTES.items()],
        ),
    }
    for relative, (header, rows) in tables.items():
        if relative.split("/")[0] not in skip:
            _write(db / relative, header, rows)
    return db


def _places() -> dict[str, tuple[float, float]]:
    places = dict(STATIONS)
    places[HOTEL[0]] = HOTEL[1:]
    places.update({name: values[:2] for name, values in ATTRACTIONS.items()})
    places.update({name: values[:2] for name, values in RESTAURANTS.items()})
    return places


def _key(name: str) -> str:
    lat, lon = _places()[name]
    return f"{lat:.6f},{lon:.6f}"


# --------------------------------------------------------------------------- the plan


def act(slot: str, kind: str, **details) -> dict:
    return {"time_slot": slot, "type": kind, "details": details}


def trip(slot: str, origin: str, destination: str, minutes: int, cost: int) -> dict:
    return act(
        slot,
        "travel_city",
        **{"from": origin, "to": destination},
        distance="3km",
        duration=f"{minutes}min",
        cost=cost,
    )


def train(slot: str, number: str, origin: str, destination: str, cost: int) -> dict:
    return act(
        slot,
        "travel_intercity_public",
        mode="train",
        number=number,
        cost=cost,
        **{"from": origin, "to": destination},
    )


HEFEI, NANJING = "Hefei South Railway Station", "Nanjing South Railway Station"


def good_plan() -> dict:
    day1 = [
        train("08:00-09:00", "G1", HEFEI, NANJING, 100),
        act("09:00-09:20", "buffer", description="Leave the station"),
        trip("09:20-09:50", NANJING, "Orange Hotel", 30, 40),
        act("09:50-10:10", "hotel", activity="Check-in", name="Orange Hotel"),
        trip("10:10-10:30", "Orange Hotel", "City Wall", 20, 20),
        act("10:30-12:30", "attraction", name="City Wall", city="Nanjing", cost=50),
        trip("12:30-12:40", "City Wall", "Duck House", 10, 0),
        act("12:40-13:40", "meal", meal_type="lunch", name="Duck House", cost=80),
        trip("13:40-14:00", "Duck House", "Confucius Temple", 20, 20),
        act("14:00-17:00", "attraction", name="Confucius Temple", city="Nanjing", cost=0),
        trip("17:00-17:10", "Confucius Temple", "Noodle Bar", 10, 0),
        act("17:10-18:10", "meal", meal_type="dinner", name="Noodle Bar", cost=40),
        trip("18:10-18:30", "Noodle Bar", "Orange Hotel", 20, 20),
        act("18:30-24:00", "hotel", activity="Rest", name="Orange Hotel"),
    ]
    day2 = [
        act("08:00-08:30", "hotel", activity="Check-out", name="Orange Hotel"),
        trip("08:30-08:50", "Orange Hotel", "Xuanwu Lake", 20, 20),
        act("08:50-11:50", "attraction", name="Xuanwu Lake", city="Nanjing", cost=0),
        trip("11:50-12:00", "Xuanwu Lake", "Tea House", 10, 0),
        act("12:00-13:00", "meal", meal_type="lunch", name="Tea House", cost=60),
        trip("13:00-13:20", "Tea House", "Presidential Palace", 20, 20),
        act("13:20-16:20", "attraction", name="Presidential Palace", city="Nanjing", cost=40),
        trip("16:20-16:30", "Presidential Palace", "Spice Kitchen", 10, 0),
        act("16:30-17:30", "meal", meal_type="dinner", name="Spice Kitchen", cost=70),
        trip("17:30-18:00", "Spice Kitchen", NANJING, 30, 40),
        act("18:00-19:00", "buffer", description="Security check"),
        train("19:00-20:00", "G2", NANJING, HEFEI, 100),
    ]
    # 2 people, 1 room, taxis of 4: trains 2*2*100 + hotel 400 + meals 2*250 + tickets 2*90 + taxis 180
    return {
        "budget_summary": {
            "transportation": 580,
            "accommodation": 400,
            "meals": 500,
            "attractions_and_tickets": 180,
            "other": 0,
            "total_estimated_budget": 1660,
            "currency": "CNY",
        },
        "daily_plans": [
            {
                "day_number": 1,
                "current_city": "from Hefei to Nanjing",
                "accommodation": {"name": "Orange Hotel", "price_per_night": 400},
                "activities": day1,
            },
            {"day_number": 2, "current_city": "from Nanjing to Hefei", "activities": day2},
        ],
    }


def good_meta() -> dict:
    return {
        "org": "Hefei",
        "dest": ["Nanjing"],
        "days": 2,
        "depart_date": "2025-11-12",
        "return_date": "2025-11-13",
        "people_number": 2,
        "room_number": 1,
        "depart_weekday": 3,
        "hard_constraints": {
            "train_seat_status": {"outbound_train_no": "G1", "inbound_train_no": "G2", "people_number": 2},
            "hotel_star_service_required": {"hotel_name": "Orange Hotel", "hotel_star": 3},
            "restaurant_specific_tag_nearby": {
                "restaurant_name": "Duck House",
                "attraction_name": "City Wall",
            },
            "attraction_must_visit_named": {"attraction_names": ["Presidential Palace"]},
            "budget_constraint": {"max_budget": 2000},
        },
    }


def reply(plan: dict) -> str:
    return f"<think>done</think>Here is the plan.\n```json\n{json.dumps(plan, ensure_ascii=False)}\n```"


def ground_truth(meta: dict) -> str:
    return json.dumps({"id": "0", "language": "en", "query": "Hefei to Nanjing", "meta_info": meta})


EXTRA = {"database": "database_en/id_0"}


@pytest.fixture(scope="module")
def db_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("travel_db")
    write_database(root)
    return root


def failing(plan: dict, meta: dict, root: Path) -> set[str]:
    evaluation = evaluate_plan(parse_plan(reply(plan)), meta, load_database(root / "database_en" / "id_0"))
    return {
        name
        for name, (ok, _) in {**evaluation.commonsense_checks, **evaluation.hard_checks}.items()
        if not ok
    }


# --------------------------------------------------------------------------- the passing plan


def test_good_plan_passes_every_check_and_scores_one(db_root):
    assert failing(good_plan(), good_meta(), db_root) == set()
    result = compute_score(
        "travel_en", reply(good_plan()), ground_truth(good_meta()), EXTRA, database_dir=db_root
    )
    assert result["score"] == result["composite"] == result["commonsense"] == result["personalized"] == 1.0
    assert result["case_acc"] == 1.0 and result["format_ok"] == 1.0
    assert all(result[f"cs_{dim}"] == 1.0 for dim in travel.COMMONSENSE_DIMENSIONS)
    assert all(result[f"hard_{family}"] == 1.0 for family in travel.HARD_FAMILIES)


# --------------------------------------------------------------------------- one failing mutation per rule


def _days(plan):
    return plan["daily_plans"]


def _replace(plan, day, index, new):
    _days(plan)[day]["activities"][index] = new


def m_days(plan, meta):
    meta["days"] = 3


def m_closed_loop(plan, meta):
    _days(plan)[0]["current_city"] = "from Shanghai to Nanjing"


def m_seamless(plan, meta):
    _days(plan)[0]["activities"][0]["details"]["from"] = "Shanghai Station"


def m_hotel_price(plan, meta):
    _days(plan)[0]["accommodation"]["price_per_night"] = 450


def m_ticket_price(plan, meta):
    _days(plan)[0]["activities"][5]["details"]["cost"] = 55


def m_meal_price(plan, meta):
    _days(plan)[0]["activities"][7]["details"]["cost"] = 85


def m_train_price(plan, meta):
    _days(plan)[0]["activities"][0]["details"]["cost"] = 120


def m_last_day_hotel(plan, meta):
    _days(plan)[1]["accommodation"] = {"name": "Orange Hotel", "price_per_night": 400}


def m_day_not_ending_at_hotel(plan, meta):
    _days(plan)[0]["activities"].pop()


def m_no_dinner_on_arrival_day(plan, meta):
    activities = _days(plan)[0]["activities"]
    activities[10:] = [
        trip("17:00-17:20", "Confucius Temple", "Orange Hotel", 20, 20),
        act("17:20-24:00", "hotel", activity="Rest", name="Orange Hotel"),
    ]


def m_no_sight_on_arrival_day(plan, meta):
    for index in (5, 9):  # the visits become idle time of the same length
        slot = _days(plan)[0]["activities"][index]["time_slot"]
        _replace(plan, 0, index, act(slot, "buffer", description="Walk around"))


def m_overlap(plan, meta):
    _days(plan)[0]["activities"][2]["time_slot"] = "09:15-09:50"


def m_slow_transfer(plan, meta):
    _days(plan)[0]["activities"][6]["time_slot"] = "12:30-12:50"
    _days(plan)[0]["activities"][7]["time_slot"] = "12:50-13:40"


def m_closure_day(plan, meta):
    meta["depart_weekday"] = 1  # day 1 becomes a Monday, when Confucius Temple closes


def m_short_meal(plan, meta):
    activities = _days(plan)[0]["activities"]
    activities[7]["time_slot"] = "12:40-13:05"
    activities.insert(8, act("13:05-13:40", "buffer", description="Rest"))


def m_budget_summary(plan, meta):
    plan["budget_summary"]["total_estimated_budget"] = 2500


def m_same_restaurant(plan, meta):
    _replace(plan, 1, 7, trip("16:20-16:30", "Presidential Palace", "Duck House", 10, 0))
    _replace(plan, 1, 8, act("16:30-17:30", "meal", meal_type="dinner", name="Duck House", cost=80))
    _replace(plan, 1, 9, trip("17:30-18:00", "Duck House", NANJING, 30, 40))


def m_same_attraction(plan, meta):
    _replace(plan, 1, 1, trip("08:30-08:50", "Orange Hotel", "City Wall", 20, 20))
    _replace(plan, 1, 2, act("08:50-11:50", "attraction", name="City Wall", city="Nanjing", cost=50))
    _replace(plan, 1, 3, trip("11:50-12:00", "City Wall", "Tea House", 10, 0))


def m_hard_train(plan, meta):
    meta["hard_constraints"]["train_seat_status"]["inbound_train_no"] = "G7"


def m_hard_flight(plan, meta):
    meta["hard_constraints"]["flight_cheapest_direct"] = {"outbound_flight_no": "MU1"}


def m_hard_hotel(plan, meta):
    meta["hard_constraints"]["hotel_star_service_required"]["hotel_name"] = "Grand Hotel"


def m_hard_restaurant(plan, meta):
    meta["hard_constraints"]["restaurant_specific_tag_nearby"]["restaurant_name"] = "Tea Garden"


def m_hard_attraction(plan, meta):
    meta["hard_constraints"]["attraction_must_visit_named"]["attraction_names"] = [
        "Presidential Palace",
        "Zoo",
    ]


def m_hard_budget(plan, meta):
    meta["hard_constraints"]["budget_constraint"]["max_budget"] = 1500


PLAN_MUTATIONS = {
    "valid_trip_duration": (m_days, {"valid_trip_duration"}),
    # a wrong first departure city also breaks the city tracking, which starts at the origin
    "closed_loop_route_structure": (
        m_closed_loop,
        {"closed_loop_route_structure", "seamless_intercity_transfers"},
    ),
    "seamless_intercity_transfers": (m_seamless, {"seamless_intercity_transfers"}),
    "validated_accommodation": (m_hotel_price, {"validated_accommodation"}),
    "validated_attractions": (m_ticket_price, {"validated_attractions"}),
    "validated_meals": (m_meal_price, {"validated_meals"}),
    "validated_transportation": (m_train_price, {"validated_transportation"}),
    "traceable_accommodation": (m_last_day_hotel, {"traceable_accommodation"}),
    "ends_with_accommodation": (m_day_not_ending_at_hotel, {"ends_with_accommodation"}),
    "essential_meal_coverage": (m_no_dinner_on_arrival_day, {"essential_meal_coverage"}),
    "essential_attraction_coverage": (m_no_sight_on_arrival_day, {"essential_attraction_coverage"}),
    "no_time_overlaps": (m_overlap, {"no_time_overlaps"}),
    "reasonable_transfer_time": (m_slow_transfer, {"reasonable_transfer_time"}),
    "avoidance_of_closure_days": (m_closure_day, {"avoidance_of_closure_days"}),
    "reasonable_meal_duration": (m_short_meal, {"reasonable_meal_duration"}),
    "cost_calculation_correctness": (m_budget_summary, {"cost_calculation_correctness"}),
    "diverse_meal_options": (m_same_restaurant, {"diverse_meal_options"}),
    "diverse_attraction_options": (m_same_attraction, {"diverse_attraction_options"}),
    "train_seat_status": (m_hard_train, {"train_seat_status"}),
    "flight_cheapest_direct": (m_hard_flight, {"flight_cheapest_direct"}),
    "hotel_star_service_required": (m_hard_hotel, {"hotel_star_service_required"}),
    "restaurant_specific_tag_nearby": (m_hard_restaurant, {"restaurant_specific_tag_nearby"}),
    "attraction_must_visit_named": (m_hard_attraction, {"attraction_must_visit_named"}),
    "budget_constraint": (m_hard_budget, {"budget_constraint"}),
}


@pytest.mark.parametrize("rule", sorted(PLAN_MUTATIONS))
def test_each_rule_fails_on_its_mutation(rule, db_root):
    mutate, expected = PLAN_MUTATIONS[rule]
    plan, meta = good_plan(), good_meta()
    mutate(plan, meta)
    assert failing(plan, meta, db_root) == expected


DATABASE_MUTATIONS = {  # rule: (attraction or restaurant, column index, value)
    "attraction_visit_within_opening_hours": ("City Wall", 3, "12:00"),  # closes during the 10:30-12:30 visit
    "dining_within_service_hours": ("Duck House", 2, "13:00"),  # opens after the 12:40 lunch
    "reasonable_duration_at_attractions": ("City Wall", 5, "1.5"),  # the visit lasts 2 hours
}


@pytest.mark.parametrize("rule", sorted(DATABASE_MUTATIONS))
def test_each_database_rule_fails_on_its_database(rule, tmp_path):
    name, column, value = DATABASE_MUTATIONS[rule]
    attractions, restaurants = dict(ATTRACTIONS), dict(RESTAURANTS)
    table = attractions if name in attractions else restaurants
    row = list(table[name])
    row[column] = value
    table[name] = tuple(row)
    write_database(tmp_path, attractions=attractions, restaurants=restaurants)
    assert failing(good_plan(), good_meta(), tmp_path) == {rule}


def test_flight_constraint_passes_when_the_plan_takes_that_flight(db_root):
    plan, meta = good_plan(), good_meta()
    m_hard_flight(plan, meta)
    leg = _days(plan)[0]["activities"][0]["details"]
    leg.update(mode="flight", number="MU1", cost=100)
    result = compute_score("travel_en", reply(plan), ground_truth(meta), EXTRA, database_dir=db_root)
    assert result["hard_flight"] == 1.0
    assert result["hard_train"] == 0.0  # the outbound train G1 is gone


def test_unknown_constraint_types_are_skipped_and_no_constraint_scores_zero(db_root):
    meta = good_meta()
    meta["hard_constraints"]["weather_sunny"] = {"anything": 1}
    result = compute_score("travel_en", reply(good_plan()), ground_truth(meta), EXTRA, database_dir=db_root)
    assert result["personalized"] == 1.0
    meta["hard_constraints"] = {}
    result = compute_score("travel_en", reply(good_plan()), ground_truth(meta), EXTRA, database_dir=db_root)
    assert result["personalized"] == 0.0 and result["commonsense"] == 1.0


# --------------------------------------------------------------------------- score combination


def test_a_failed_check_zeroes_its_dimension_and_scores_combine(db_root):
    plan, meta = good_plan(), good_meta()
    m_budget_summary(plan, meta)
    result = compute_score("travel_en", reply(plan), ground_truth(meta), EXTRA, database_dir=db_root)
    assert result["cs_cost_calculation_accuracy"] == 0.0
    assert result["commonsense"] == pytest.approx(7 / 8)
    assert result["personalized"] == 1.0
    assert result["composite"] == pytest.approx((7 / 8 + 1) / 2) == result["score"]
    assert result["case_acc"] == 0.0
    picked = compute_score(
        "travel_en", reply(plan), ground_truth(meta), EXTRA, database_dir=db_root, score_key="commonsense"
    )
    assert picked["score"] == pytest.approx(7 / 8)


def test_the_key_set_is_the_same_for_every_outcome(db_root):
    bad_plan, meta = good_plan(), good_meta()
    m_hard_budget(bad_plan, meta)
    outcomes = [
        compute_score(
            "travel_en", reply(good_plan()), ground_truth(good_meta()), EXTRA, database_dir=db_root
        ),
        compute_score("travel_en", reply(bad_plan), ground_truth(meta), EXTRA, database_dir=db_root),
        compute_score("travel_en", "no plan at all", ground_truth(meta), EXTRA, database_dir=db_root),
    ]
    assert outcomes[0].keys() == outcomes[1].keys() == outcomes[2].keys()
    assert outcomes[1]["hard_budget"] == 0.0 and outcomes[1]["hard_hotel"] == 1.0
    assert all(isinstance(value, float) for outcome in outcomes for value in outcome.values())


def test_unknown_score_key_is_refused(db_root):
    with pytest.raises(ValueError, match="score_key"):
        compute_score(
            "travel_en", "x", ground_truth(good_meta()), EXTRA, database_dir=db_root, score_key="acc"
        )


# --------------------------------------------------------------------------- format failures


FORMAT_FAILURES = {
    "no JSON": "I could not finish the plan.",
    "bad JSON": '```json\n{"budget_summary": {"total_estimated_budget": 1660},\n```',
    "missing daily_plans": '```json\n{"budget_summary": {"total_estimated_budget": 1660}}\n```',
    "missing detail field": reply(
        {
            **good_plan(),
            "daily_plans": [{**_days(good_plan())[0], "activities": [act("08:00-09:00", "meal", name="X")]}],
        }
    ),
    "price as text": reply(
        {
            **good_plan(),
            "budget_summary": {**good_plan()["budget_summary"], "total_estimated_budget": "¥1660"},
        }
    ),
    "unknown activity type": reply(
        {**good_plan(), "daily_plans": [{**_days(good_plan())[0], "activities": [act("08:00-09:00", "nap")]}]}
    ),
    "bad time slot": reply(
        {
            **good_plan(),
            "daily_plans": [{**_days(good_plan())[0], "activities": [act("8am", "buffer", description="x")]}],
        }
    ),
}


@pytest.mark.parametrize("case", sorted(FORMAT_FAILURES))
def test_format_failures_score_zero_without_raising(case, db_root):
    with pytest.raises(PlanError):
        parse_plan(FORMAT_FAILURES[case])
    result = compute_score(
        "travel_en", FORMAT_FAILURES[case], ground_truth(good_meta()), EXTRA, database_dir=db_root
    )
    assert result["format_ok"] == 0.0
    assert set(result.values()) == {0.0}


def test_parse_plan_reads_the_last_plan_of_the_reply():
    plan = good_plan()
    tool_answer = '<tool_response>{"name": "Orange Hotel", "price": "400"}</tool_response>'
    draft = reply({**plan, "budget_summary": {"total_estimated_budget": 1}})
    assert parse_plan(tool_answer + draft + reply(plan))["budget_summary"]["total_estimated_budget"] == 1660
    # without a fence, the last top-level object that decodes
    assert parse_plan(tool_answer + "Final plan: " + json.dumps(plan)) == plan
    # a broken final block is a format error even though an earlier object parses
    with pytest.raises(PlanError, match="does not parse"):
        parse_plan(reply(plan) + "\n```json\n{broken\n```")


@pytest.mark.parametrize("language", ["en", "zh"])
def test_format_instructions_example_is_a_valid_plan(language):
    text = format_instructions(language)
    example = parse_plan(text)
    assert example["daily_plans"][0]["activities"]
    assert "```json" in text and ("JSON" in text)


def test_format_instructions_refuse_unknown_language():
    with pytest.raises(ValueError, match="'en' or 'zh'"):
        format_instructions("fr")


# --------------------------------------------------------------------------- setup errors


def test_database_root_comes_from_the_environment(db_root, monkeypatch):
    monkeypatch.setenv("DATABASE_DIR", str(db_root))
    assert compute_score("travel_en", reply(good_plan()), ground_truth(good_meta()), EXTRA)["score"] == 1.0
    # without extra_info.database the path follows from the task's language and id
    assert compute_score("travel_en", reply(good_plan()), ground_truth(good_meta()), {})["score"] == 1.0


def test_missing_database_raises_naming_database_dir_and_path(tmp_path, monkeypatch):
    monkeypatch.delenv("DATABASE_DIR", raising=False)
    with pytest.raises(ValueError, match="DATABASE_DIR"):
        compute_score("travel_en", reply(good_plan()), ground_truth(good_meta()), EXTRA)
    with pytest.raises(FileNotFoundError, match="DATABASE_DIR") as error:
        compute_score("travel_en", "no plan", ground_truth(good_meta()), EXTRA, database_dir=tmp_path)
    assert str(tmp_path / "database_en" / "id_0") in str(error.value)


def test_missing_table_raises_naming_the_file(tmp_path):
    write_database(tmp_path, skip=("restaurants",))
    with pytest.raises(FileNotFoundError, match="restaurants.csv"):
        compute_score(
            "travel_en", reply(good_plan()), ground_truth(good_meta()), EXTRA, database_dir=tmp_path
        )


def test_malformed_ground_truth_raises(db_root):
    with pytest.raises(ValueError, match="ground_truth"):
        compute_score("travel_en", reply(good_plan()), "not json", EXTRA, database_dir=db_root)


def test_database_is_read_once_per_path(db_root):
    path = db_root / "database_en" / "id_0"
    assert load_database(path) is load_database(path)
    plan = copy.deepcopy(good_plan())
    assert failing(plan, good_meta(), db_root) == set()


# --------------------------------------------------------------------------- day-type rules


def _full_day(sights: list[tuple[str, str]], meals: list[str]) -> dict:
    activities = [act(slot, "attraction", name=name, city="Nanjing", cost=0) for name, slot in sights]
    activities += [act(slot, "meal", meal_type="meal", name=f"R{slot}", cost=10) for slot in meals]
    activities.append(act("21:00-24:00", "hotel", activity="Rest", name="Orange Hotel"))
    return {"day_number": 2, "current_city": "Nanjing", "activities": activities}


FULL_DAYS = {  # (sights, meals): (attraction coverage ok, meal coverage ok)
    "two sights, two meals": (
        [("A", "09:00-11:00"), ("B", "14:00-16:00")],
        ["12:00-13:00", "17:00-18:00"],
        True,
        True,
    ),
    "one 4-hour sight": ([("A", "09:00-13:00")], ["13:00-14:00", "17:00-18:00"], True, True),
    "one 3-hour sight": ([("A", "09:00-12:00")], ["12:00-13:00", "17:00-18:00"], False, True),
    "one meal": ([("A", "09:00-11:00"), ("B", "14:00-16:00")], ["12:00-13:00"], True, False),
    "meals 1 hour apart": (
        [("A", "09:00-11:00"), ("B", "14:00-16:00")],
        ["12:00-13:00", "14:00-15:00"],
        True,
        False,
    ),
}


@pytest.mark.parametrize("case", sorted(FULL_DAYS))
def test_full_day_needs_two_sights_or_four_hours_and_two_spaced_meals(case):
    sights, meals, sights_ok, meals_ok = FULL_DAYS[case]
    plan = good_plan()
    plan["daily_plans"].insert(1, _full_day(sights, meals))
    meta = {**good_meta(), "days": 3}
    assert travel.check_attraction_coverage(plan["daily_plans"], meta)[0] is sights_ok
    assert travel.check_meal_coverage(plan["daily_plans"], meta)[0] is meals_ok


DEPARTURES = {  # departure slot, meals that day: whether the meal rule holds
    ("08:30-09:30", 1): False,  # leaving before 09:00: no meal in the city
    ("12:00-13:00", 1): True,
    ("12:00-13:00", 2): False,  # leaving before 15:00: at most one meal
    ("19:00-20:00", 2): True,
}


@pytest.mark.parametrize(("departure", "meals"), sorted(DEPARTURES))
def test_meals_on_departure_day_follow_the_departure_time(departure, meals):
    plan = good_plan()
    activities = _days(plan)[1]["activities"]
    activities[-1]["time_slot"] = departure
    if meals == 1:
        activities[8] = act("16:30-17:30", "buffer", description="Coffee")
    assert travel.check_meal_coverage(plan["daily_plans"], good_meta())[0] is DEPARTURES[(departure, meals)]


@pytest.mark.parametrize(("arrival", "meals_ok"), [("08:00-09:00", True), ("15:00-16:00", False)])
def test_meals_on_arrival_day_follow_the_arrival_time(arrival, meals_ok):
    plan = good_plan()  # two meals on the arrival day: right before 10:00, too many after 15:00
    _days(plan)[0]["activities"][0]["time_slot"] = arrival
    assert travel.check_meal_coverage(plan["daily_plans"], good_meta())[0] is meals_ok
