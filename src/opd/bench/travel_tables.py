"""python -m opd.bench.travel_tables [--scale 3] [--repeats 50]

Chooses the travel tools' query engine by measurement. Builds one DeepPlanning-size task database
(``world.write_world(scale=3)``: about 7,700 records, like DeepPlanning's) and, per engine, prints the time to
load the seven tables, the median latency of the tools' typical lookups and the memory the loaded tables take:

- ``pandas``: ``pandas.read_csv(dtype=str)`` per table and boolean-mask filters, what ``opd.agent.travel``
  uses (through ``queries.answer``, so the latency includes building the answer text);
- ``sqlite``: the standard library's SQLite in memory, CSV rows inserted as text with an index on each
  lookup key, the same lookups as parameterised SELECTs (rows only, no answer text).

Memory: pandas ``DataFrame.memory_usage(deep=True)``; SQLite ``page_count * page_size`` of the database.
The last stdout line is the results as JSON.
"""

from __future__ import annotations

import argparse
import csv
import json
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from opd.agent.travel.world import TABLES, write_world

INDEXES = {
    "trains": ["origin_city", "destination_city", "dep_date"],
    "flights": ["origin_city", "destination_city", "dep_date"],
    "attractions": ["attraction_name"],
    "locations": ["poi_name"],
    "distances": ["origin", "destination"],
    "restaurants": ["query_latitude", "query_longitude"],
}


def _lookups(db_dir: Path) -> dict[str, tuple[str, dict]]:
    def first(table):
        with open(db_dir / TABLES[table], encoding="utf-8") as f:
            return next(csv.DictReader(f))

    t, loc, r = first("trains"), first("locations"), first("restaurants")
    coords = f"{loc['latitude']},{loc['longitude']}"
    with open(db_dir / TABLES["locations"], encoding="utf-8") as f:
        second = list(csv.DictReader(f))[1]
    return {
        "train": ("query_train_info", {"origin": t["origin_city"], "destination": t["destination_city"], "depDate": t["dep_date"]}),
        "hotel": ("query_hotel_info", {"destination": "x", "checkinDate": "2025-11-12", "checkoutDate": "2025-11-13", "hotelStar": "4"}),
        "location": ("search_location", {"place_name": loc["poi_name"]}),
        "route": ("query_road_route_info", {"origin": coords, "destination": f"{second['latitude']},{second['longitude']}"}),
        "restaurants": ("recommend_restaurants", {"latitude": r["query_latitude"], "longitude": r["query_longitude"]}),
    }  # fmt: skip


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return round(1000 * statistics.median(times), 3)


def bench_pandas(db_dir: Path, repeats: int) -> dict:
    from opd.agent.travel import database, queries

    database.clear_cache()
    start = time.perf_counter()
    task = database.TaskDatabase(db_dir)
    frames = {name: task.table(name) for name in TABLES}
    load_ms = 1000 * (time.perf_counter() - start)
    latency = {
        key: _median_ms(lambda tool=tool, params=params: queries.answer(tool, task, params), repeats)
        for key, (tool, params) in _lookups(db_dir).items()
    }
    memory = sum(int(frame.memory_usage(deep=True).sum()) for frame in frames.values())
    return {"load_ms": round(load_ms, 1), "latency_ms": latency, "memory_mb": round(memory / 2**20, 2)}


def bench_sqlite(db_dir: Path, repeats: int) -> dict:
    start = time.perf_counter()
    conn = sqlite3.connect(":memory:", check_same_thread=False)
    for name, rel in TABLES.items():
        with open(db_dir / rel, encoding="utf-8") as f:
            reader = csv.reader(f)
            header = next(reader)
            columns = ", ".join(f'"{c}" TEXT' for c in header)
            conn.execute(f"CREATE TABLE {name} ({columns})")
            conn.executemany(f"INSERT INTO {name} VALUES ({', '.join('?' * len(header))})", reader)
        if name in INDEXES:
            conn.execute(f"CREATE INDEX idx_{name} ON {name} ({', '.join(INDEXES[name])})")
    conn.commit()
    load_ms = 1000 * (time.perf_counter() - start)
    lookups = _lookups(db_dir)
    sql = {
        "train": ("SELECT * FROM trains WHERE origin_city=? AND destination_city=? AND dep_date=? "
                  "ORDER BY route_index, segment_index", lambda p: (p["origin"], p["destination"], p["depDate"])),
        "hotel": ("SELECT * FROM hotels WHERE hotel_star=?", lambda p: (p["hotelStar"],)),
        "location": ("SELECT * FROM locations WHERE poi_name=? LIMIT 1", lambda p: (p["place_name"],)),
        "route": ("SELECT * FROM distances WHERE origin=? AND destination=? LIMIT 1",
                  lambda p: (p["origin"], p["destination"])),
        "restaurants": ("SELECT * FROM restaurants WHERE query_latitude=? AND query_longitude=?",
                        lambda p: (p["latitude"], p["longitude"])),
    }  # fmt: skip
    latency = {}
    for key, (query, args) in sql.items():
        values = args(lookups[key][1])
        latency[key] = _median_ms(lambda q=query, v=values: conn.execute(q, v).fetchall(), repeats)
    pages = conn.execute("PRAGMA page_count").fetchone()[0] * conn.execute("PRAGMA page_size").fetchone()[0]
    return {"load_ms": round(load_ms, 1), "latency_ms": latency, "memory_mb": round(pages / 2**20, 2)}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scale", type=int, default=3, help="world scale (3: about 7,700 records per task)")
    parser.add_argument("--repeats", type=int, default=50, help="timed repeats per lookup (median reported)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        world = write_world(tmp, n_tasks=1, scale=args.scale)
        db_dir = Path(world["databases"]["en"][0])
        results = {"records": world["records"]["en"][0]}
        for engine, bench in (("pandas", bench_pandas), ("sqlite", bench_sqlite)):
            bench(db_dir, 3)  # warm-up: imports, file cache
            results[engine] = bench(db_dir, args.repeats)
    print(f"one task database, {results['records']} records")
    print(f"{'engine':8} {'load ms':>8} {'memory MB':>10}  median latency ms per lookup")
    for engine in ("pandas", "sqlite"):
        r = results[engine]
        lat = "  ".join(f"{k}={v}" for k, v in r["latency_ms"].items())
        print(f"{engine:8} {r['load_ms']:8.1f} {r['memory_mb']:10.2f}  {lat}")
    print(json.dumps(results))


if __name__ == "__main__":
    main()
