"""Task databases for the travel tools: read-only, loaded lazily, shared through a bounded LRU cache.

A task database is a directory ``database_<lang>/id_<N>/`` with seven CSV tables (``world.TABLES``).
verl runs many rollouts at once (``agent.num_workers`` workers, each with many concurrent trajectories), and
each tool call creates a fresh tool instance, so the tables must not be re-read per call:

- ``open_database(path, cache_size)`` returns the process-wide ``TaskDatabase`` for ``path`` from an LRU
  cache of at most ``cache_size`` databases (the least recently used is dropped when a new one comes in;
  a dropped database is simply re-read if a task needs it again).
- ``TaskDatabase.table(name)`` reads a table the first time a tool needs it and keeps it. A lock per table
  makes concurrent first calls (threads; asyncio callers run queries in worker threads) read it exactly
  once; later calls take no lock. ``load_counts`` records the reads, for tests and metrics.
- Files are only ever opened for reading; nothing here writes, renames or touches them.
- A missing table file, a parse failure or a missing column raises ``TableError`` with the path and what to
  fix; the tool adapters turn it into tool text, so a broken database never crashes a rollout.

Query engine, chosen by measurement (``python -m opd.bench.travel_tables``: one DeepPlanning-size database,
7,673 records, shared 2-core login node, medians of 50):

    engine   load   memory   lookup latency
    pandas   17 ms  0.7 MB   0.3 ms (place) .. 1.4 ms (hotels) .. 30 ms (all trains of a leg, 31 routes),
                             answer text included
    sqlite   15 ms  0.9 MB   0.002 .. 0.09 ms, rows only (indexed, in memory, standard library)

Loads and memory are the same; SQLite's lookups are faster, but every pandas answer is already far below a
model turn (tens of milliseconds to seconds per generated turn) and the tool call is not the bottleneck.
pandas wins on correctness: DeepPlanning reads the same files with ``pandas.read_csv(path, dtype=str)``, and
its answers depend on pandas' missing-value rules (empty, "NA", "null", ... become NaN, which then prints as
NaN, "nan" or "" depending on the tool) and text ordering; an SQLite engine would have to re-implement all of
that to stay identical. No new dependency either; DuckDB (not installed) would not change this balance.
"""

from __future__ import annotations

import os
import threading
from collections import Counter, OrderedDict
from pathlib import Path

from opd.agent.travel.world import COLUMNS, TABLES

DEFAULT_CACHE_SIZE = 64


class TableError(Exception):
    """A table of a task database is missing or unreadable; the message names the file and the fix."""


class TaskDatabase:
    """The seven tables of one task, each read on first use and kept (read-only)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._tables: dict = {}
        self._locks = {name: threading.Lock() for name in TABLES}
        self.load_counts: Counter = Counter()

    def table_path(self, name: str) -> Path:
        return self.path / TABLES[name]

    def table(self, name: str, required: tuple[str, ...] = ()):
        """The table as a pandas DataFrame of strings (missing values as NaN), checking ``required`` columns."""
        frame = self._tables.get(name)
        if frame is None:
            with self._locks[name]:
                frame = self._tables.get(name)
                if frame is None:
                    frame = self._load(name)
                    self._tables[name] = frame
        missing = [column for column in required if column not in frame.columns]
        if missing:
            raise TableError(
                f"table {self.table_path(name)} has no column(s) {missing}; its header must include "
                f"{COLUMNS[name]} (DeepPlanning's column names)"
            )
        return frame

    def _load(self, name: str):
        import pandas as pd

        path = self.table_path(name)
        if not path.is_file():
            raise TableError(
                f"table {TABLES[name]} is missing from task database {self.path} (expected file {path}); "
                "regenerate or re-extract the database (opd.agent.travel.world writes all seven tables)"
            )
        self.load_counts[name] += 1
        try:
            # Every column as text, as DeepPlanning reads it: coordinates and prices keep their exact spelling.
            return pd.read_csv(path, dtype=str)
        except (ValueError, UnicodeDecodeError, pd.errors.ParserError, pd.errors.EmptyDataError) as error:
            raise TableError(
                f"table {path} cannot be parsed as CSV ({type(error).__name__}: {str(error).strip()[:200]}); "
                "fix or regenerate the file (UTF-8, one header line, the same number of fields in every row)"
            ) from error


_CACHE: OrderedDict[str, TaskDatabase] = OrderedDict()
_CACHE_LOCK = threading.Lock()


def open_database(path: str | Path, cache_size: int = DEFAULT_CACHE_SIZE) -> TaskDatabase:
    """The shared ``TaskDatabase`` for a task directory (LRU cache of ``cache_size`` databases)."""
    if cache_size < 1:
        raise ValueError(f"cache_size must be at least 1 (got {cache_size})")
    key = os.path.realpath(path)
    with _CACHE_LOCK:
        database = _CACHE.get(key)
        if database is not None:
            _CACHE.move_to_end(key)
            return database
        if not os.path.isdir(key):
            raise TableError(
                f"task database directory {path} does not exist; check database_root (DATABASE_DIR) and the "
                "row's create_kwargs.database (database_<lang>/id_<N>)"
            )
        database = TaskDatabase(key)
        _CACHE[key] = database
        while len(_CACHE) > cache_size:
            _CACHE.popitem(last=False)
        return database


def cached_paths() -> list[str]:
    """Paths of the cached databases, least recently used first."""
    with _CACHE_LOCK:
        return list(_CACHE)


def clear_cache() -> None:
    with _CACHE_LOCK:
        _CACHE.clear()


def resolve_database(database_root: str | Path | None, database: str | Path) -> Path:
    """The task directory: ``database`` itself when absolute, else ``database_root / database``."""
    database = Path(database)
    if database.is_absolute():
        return database
    if not database_root:
        raise TableError(
            f"database {database} is relative but no database_root is configured; set database_root "
            "(DATABASE_DIR) in the tool config or pass an absolute path"
        )
    return Path(database_root) / database
