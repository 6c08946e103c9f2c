"""python -m opd.agent.travel.parity --deepplanning DIR --out tests/data/travel_parity_en.json [--language en]

Records DeepPlanning's own tool answers on a generated world, as committed test data for
``tests/test_travel_tools.py`` (which asserts that ``opd.agent.travel.queries`` answers every case the same).

``DIR`` is DeepPlanning's ``benchmark/deepplanning/travelplanning`` directory, e.g.::

    mkdir -p /tmp/dp && git -C /work/.mirror/QwenLM+Qwen-Agent/repo archive HEAD \\
        benchmark/deepplanning/travelplanning | tar -x -C /tmp/dp
    python -m opd.agent.travel.parity --deepplanning /tmp/dp/benchmark/deepplanning/travelplanning \\
        --out tests/data/travel_parity_en.json

Steps: write the world (``world.write_world`` with ``--seed``/``--n-tasks`` into a temporary directory);
import DeepPlanning's tool classes from ``DIR/tools``; for each task database and each argument set of
``cases()`` (every tool and table: hits, misses, filters, route-index ordering past 9, transfer routes,
missing seat status, missing brand/closing date/ticket price, duplicate restaurant listings, an unknown
coordinate, a coordinate pair without a route), construct DeepPlanning's tool with that table
(``{"database_path", "language"}``, as its agent does) and record ``{tool, arguments, database, answer}``.
Where DeepPlanning's tool raises (its flight tool does on every miss: its not-found message takes a fourth
argument it is never given), the case records ``raises`` (the exception) instead of ``answer``. The file
also records the world parameters and the pandas version the answers were made with.

DeepPlanning's tools import ``qwen_agent.tools.base`` (``BaseTool``, ``register_tool``, ``TOOL_REGISTRY``).
When ``qwen_agent`` is not installed, a minimal stand-in module is registered under that name: a registry,
the decorator, and a ``BaseTool`` whose ``_verify_json_format_args`` parses a JSON string and validates the
arguments against the tool's JSON schema with ``jsonschema`` (what qwen_agent's does, minus its lenient
JSON5 parsing, which no case here needs).
"""

from __future__ import annotations

import argparse
import csv
import importlib
import json
import sys
import tempfile
import types
from pathlib import Path

from opd.agent.travel.world import TABLES, write_world

DEFAULT_SEED = 0
DEFAULT_N_TASKS = 2

# The table each DeepPlanning tool is constructed with (as its agent does).
TOOL_TABLES = {
    "query_train_info": "trains",
    "query_flight_info": "flights",
    "query_hotel_info": "hotels",
    "query_attraction_details": "attractions",
    "recommend_attractions": "attractions",
    "search_location": "locations",
    "query_road_route_info": "distances",
    "recommend_restaurants": "restaurants",
    "query_restaurant_details": "restaurants",
}


def _install_qwen_agent_stand_in() -> None:
    try:
        importlib.import_module("qwen_agent.tools.base")
        return
    except ImportError:
        pass
    import jsonschema

    registry: dict = {}

    def register_tool(name, allow_overwrite=False):
        def decorator(cls):
            cls.name = name
            registry[name] = cls
            return cls

        return decorator

    class BaseTool:
        name = ""
        description = ""
        parameters: dict | list = {}

        def __init__(self, cfg=None):
            self.cfg = cfg or {}

        def _verify_json_format_args(self, params, strict_json=False):
            if isinstance(params, str):
                params = json.loads(params)
            jsonschema.validate(instance=params, schema=self.parameters)
            return params

    base = types.ModuleType("qwen_agent.tools.base")
    base.BaseTool, base.register_tool, base.TOOL_REGISTRY = BaseTool, register_tool, registry
    package, tools = types.ModuleType("qwen_agent"), types.ModuleType("qwen_agent.tools")
    package.__path__, tools.__path__ = [], []
    package.tools, tools.base = tools, base
    sys.modules.update({"qwen_agent": package, "qwen_agent.tools": tools, "qwen_agent.tools.base": base})


def load_deepplanning_tools(deepplanning_dir: str | Path) -> dict:
    """DeepPlanning's tool classes by tool name (imported from ``deepplanning_dir/tools``)."""
    deepplanning_dir = Path(deepplanning_dir)
    if not (deepplanning_dir / "tools" / "train_query_tool.py").is_file():
        raise SystemExit(
            f"{deepplanning_dir} is not DeepPlanning's travelplanning directory (no tools/train_query_tool.py); "
            "pass --deepplanning .../benchmark/deepplanning/travelplanning"
        )
    _install_qwen_agent_stand_in()
    sys.path.insert(0, str(deepplanning_dir))
    try:
        module = importlib.import_module("tools")
    finally:
        sys.path.remove(str(deepplanning_dir))
    return {name: cls for name, cls in module.base_travel_tool.TOOL_REGISTRY.items() if name in TOOL_TABLES}


def _rows(db_dir: Path, table: str) -> list[dict]:
    with open(db_dir / TABLES[table], encoding="utf-8") as f:
        return list(csv.DictReader(f))


def cases(db_dir: Path) -> list[tuple[str, dict]]:
    """Argument sets for one task database, derived from its tables (so every case means something)."""
    trains, flights = _rows(db_dir, "trains"), _rows(db_dir, "flights")
    hotels, attractions = _rows(db_dir, "hotels"), _rows(db_dir, "attractions")
    locations, restaurants = _rows(db_dir, "locations"), _rows(db_dir, "restaurants")
    out: list[tuple[str, dict]] = []
    for tool, rows in (("query_train_info", trains), ("query_flight_info", flights)):
        legs = list(dict.fromkeys((r["origin_city"], r["destination_city"], r["dep_date"]) for r in rows))
        classes = list(dict.fromkeys(r["seat_class"] for r in rows))
        for origin, destination, date in legs:
            out.append((tool, {"origin": origin, "destination": destination, "depDate": date}))
        origin, destination, date = legs[0]
        for seat_class in [*classes, "Business Seat"]:
            out.append(
                (
                    tool,
                    {
                        "origin": origin,
                        "destination": destination,
                        "depDate": date,
                        "seatClassName": seat_class,
                    },
                )
            )
        out.append((tool, {"origin": origin, "destination": destination, "depDate": "2030-01-01"}))
        out.append((tool, {"origin": destination, "destination": origin, "depDate": date}))
        out.append(
            (tool, {"origin": origin, "destination": destination, "depDate": date, "seatClassName": ""})
        )
    stay = {"destination": hotels[0]["city"], "checkinDate": "2025-11-12", "checkoutDate": "2025-11-14"}
    out.append(("query_hotel_info", stay))
    for star in sorted({h["hotel_star"] for h in hotels}) + ["1"]:
        out.append(("query_hotel_info", {**stay, "hotelStar": star}))
    brands = sorted({h["brand"] for h in hotels if h["brand"]})
    for brand in [*brands, "Hanting Hotel"]:
        out.append(("query_hotel_info", {**stay, "hotelBrands": brand}))
    out.append(
        (
            "query_hotel_info",
            {**stay, "hotelStar": hotels[0]["hotel_star"], "hotelBrands": hotels[0]["brand"]},
        )
    )
    out.append(("query_hotel_info", {**stay, "hotelStar": "", "hotelBrands": ""}))
    for attraction in attractions:
        out.append(("query_attraction_details", {"attraction_name": attraction["attraction_name"]}))
    out.append(("query_attraction_details", {"attraction_name": "No Such Attraction"}))
    city = attractions[0]["city"]
    out.append(("recommend_attractions", {"city": city}))
    for kind in sorted({a["attraction_type"] for a in attractions}) + ["Unknown Type"]:
        out.append(("recommend_attractions", {"city": city, "attraction_type": kind}))
    for location in locations[:: max(1, len(locations) // 8)]:
        out.append(("search_location", {"place_name": location["poi_name"]}))
    out.append(("search_location", {"place_name": locations[0]["poi_name"] + " Annex"}))
    coords = [f"{loc['latitude']},{loc['longitude']}" for loc in locations]
    for i, j in ((0, 1), (1, 0), (0, len(coords) - 1), (len(coords) // 2, len(coords) // 2 + 1), (3, 4)):
        out.append(("query_road_route_info", {"origin": coords[i], "destination": coords[j]}))
    out.append(("query_road_route_info", {"origin": coords[0], "destination": coords[0]}))
    out.append(("query_road_route_info", {"origin": "0.000000,0.000000", "destination": coords[0]}))
    out.append(("query_road_route_info", {"origin": coords[0], "destination": "0.000000,0.000000"}))
    hubs = list(dict.fromkeys((r["query_latitude"], r["query_longitude"]) for r in restaurants))
    for lat, lon in hubs:
        out.append(("recommend_restaurants", {"latitude": lat, "longitude": lon}))
    out.append(
        ("recommend_restaurants", {"latitude": hotels[0]["latitude"], "longitude": hotels[0]["longitude"]})
    )
    for name in dict.fromkeys(r["restaurant_name"] for r in restaurants):
        out.append(("query_restaurant_details", {"restaurant_name": name}))
    out.append(("query_restaurant_details", {"restaurant_name": "No Such Restaurant"}))
    return out


def record(deepplanning_dir: str | Path, language: str, seed: int, n_tasks: int) -> dict:
    """DeepPlanning's answers for every case of every task database of the world."""
    import pandas as pd

    classes = load_deepplanning_tools(deepplanning_dir)
    records = []
    with tempfile.TemporaryDirectory() as tmp:
        world = write_world(tmp, seed=seed, n_tasks=n_tasks, languages=(language,))
        for db in world["databases"][language]:
            db_dir = Path(db)
            relative = f"{db_dir.parent.name}/{db_dir.name}"
            instances = {}
            for tool, arguments in cases(db_dir):
                if tool not in instances:
                    path = db_dir / TABLES[TOOL_TABLES[tool]]
                    instances[tool] = classes[tool]({"database_path": str(path), "language": language})
                case = {"tool": tool, "arguments": arguments, "database": relative}
                try:
                    case["answer"] = instances[tool].call(json.dumps(arguments, ensure_ascii=False))
                except Exception as error:  # recorded: where DeepPlanning raises, ours answers a message
                    case["raises"] = f"{type(error).__name__}: {error}"
                records.append(case)
    return {
        "world": {"seed": seed, "n_tasks": n_tasks, "language": language},
        "pandas": pd.__version__,
        "source": "QwenLM/Qwen-Agent benchmark/deepplanning/travelplanning/tools",
        "cases": records,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deepplanning", required=True, help="DeepPlanning's travelplanning directory")
    parser.add_argument("--out", required=True, help="JSON file to write the recorded answers to")
    parser.add_argument("--language", default="en", choices=["en", "zh"])
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="world seed")
    parser.add_argument("--n-tasks", type=int, default=DEFAULT_N_TASKS, help="task databases to record")
    args = parser.parse_args(argv)
    # DeepPlanning's tools print a line per table they load; keep stdout for our summary only.
    stdout, sys.stdout = sys.stdout, sys.stderr
    try:
        result = record(args.deepplanning, args.language, args.seed, args.n_tasks)
    finally:
        sys.stdout = stdout
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    print(f"{len(result['cases'])} answers from DeepPlanning's tools written to {args.out}")


if __name__ == "__main__":
    main()
