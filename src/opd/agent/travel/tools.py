"""verl ``BaseTool`` adapters for the nine DeepPlanning travel tools, and their verl tool config.

verl's ``tool_agent`` loop keeps one object per tool and, for every call, runs ``create(create_kwargs=...)``
with the row's ``extra_info.tools_kwargs[<tool>].create_kwargs``, then ``execute``, then ``release``. The
row's ``create_kwargs`` (written by ``opd.data.prepare_agent_data``) select the task database:

    {"database": "database_<lang>/id_<N>",   # relative to database_root (DATABASE_DIR); absolute allowed
     "language": "<lang>"}                  # en or zh: the answer's field names and messages

Tool config (``config`` of each entry in verl's tool-config YAML; ``tool_config()`` writes all of it):
- ``database_root``: the directory holding ``database_<lang>/`` (DATABASE_DIR). Required unless every row
  passes an absolute ``database``.
- ``language``: default language for rows whose create_kwargs have none (default ``en``).
- ``max_answer_chars``: bound on an answer's length, = ``multi_turn.max_tool_response_length`` (default
  1024). Listing answers drop whole records from the end and say how many were left out and how to narrow
  the query; verl would otherwise cut the text in the middle, leaving JSON the model cannot read.
- ``timeout_s``: deadline of one call (default 10 s). The query runs in a worker thread; past the deadline
  the call answers a message and the rollout goes on (the thread finishes on its own; queries are short).
- ``cache_size``: task databases kept loaded per process (LRU, default 64; see ``database``).

Nothing a model can send raises out of ``execute``: bad arguments, unknown databases, missing or malformed
tables and timeouts all answer text. Metrics per call: ``ok`` (1 answered from the table), ``records``,
``left_out`` (records dropped by the bound), ``chars``, ``timeout`` (1 when the deadline passed).
"""

from __future__ import annotations

import asyncio
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from importlib import resources
from typing import Any
from uuid import uuid4

from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse

from opd.agent.travel.database import DEFAULT_CACHE_SIZE, TableError, open_database, resolve_database
from opd.agent.travel.queries import answer

DEFAULT_MAX_ANSWER_CHARS = 1024
DEFAULT_TIMEOUT_S = 10.0
# Queries take about a millisecond; a few threads serve many concurrent rollouts in one process.
_EXECUTOR_THREADS = 8
_executor: ThreadPoolExecutor | None = None
_executor_lock = threading.Lock()


def _pool() -> ThreadPoolExecutor:
    global _executor
    with _executor_lock:
        if _executor is None:
            _executor = ThreadPoolExecutor(_EXECUTOR_THREADS, thread_name_prefix="travel-tool")
        return _executor


def load_schemas(language: str = "en") -> dict[str, dict]:
    """Tool schemas (OpenAI function format) by tool name, from ``schemas/tool_schema_<language>.json``."""
    if language not in ("en", "zh"):
        raise ValueError(f"no tool schemas for language {language!r}; choose en or zh")
    text = (
        resources.files("opd.agent.travel")
        .joinpath(f"schemas/tool_schema_{language}.json")
        .read_text("utf-8")
    )
    return {schema["function"]["name"]: schema for schema in json.loads(text)}


class TravelTool(BaseTool):
    """One DeepPlanning travel tool; subclasses fix ``tool_name``."""

    tool_name = ""

    def __init__(self, config: dict, tool_schema: OpenAIFunctionToolSchema | None = None):
        config = dict(config or {})
        self.database_root = config.get("database_root")
        self.language = config.get("language", "en")
        self.max_answer_chars = int(config.get("max_answer_chars", DEFAULT_MAX_ANSWER_CHARS))
        self.timeout_s = float(config.get("timeout_s", DEFAULT_TIMEOUT_S))
        self.cache_size = int(config.get("cache_size", DEFAULT_CACHE_SIZE))
        if self.language not in ("en", "zh"):
            raise ValueError(f"{type(self).__name__}: config language {self.language!r} must be en or zh")
        if self.max_answer_chars < 200 or self.timeout_s <= 0 or self.cache_size < 1:
            raise ValueError(
                f"{type(self).__name__}: need max_answer_chars >= 200, timeout_s > 0 and cache_size >= 1 (got "
                f"{self.max_answer_chars}, {self.timeout_s}, {self.cache_size})"
            )
        schema = tool_schema or OpenAIFunctionToolSchema.model_validate(
            load_schemas(self.language)[self.tool_name]
        )
        # BaseTool.__init__ only sets these three and prints the schema; verl's tool agent loop builds the
        # tools again for every trajectory, which would print nine schemas per rollout into the job's log.
        self.config, self.tool_schema, self.name = config, schema, schema.function.name
        self._instances: dict[str, dict] = {}

    async def create(self, instance_id: str | None = None, **kwargs) -> tuple[str, ToolResponse]:
        instance_id = instance_id or str(uuid4())
        create_kwargs = kwargs.get("create_kwargs") or {}
        self._instances[instance_id] = {
            "database": create_kwargs.get("database"),
            "language": create_kwargs.get("language") or self.language,
        }
        return instance_id, ToolResponse()

    async def execute(
        self, instance_id: str, parameters: dict[str, Any], **kwargs
    ) -> tuple[ToolResponse, float, dict]:
        instance = self._instances.get(instance_id) or {"database": None, "language": self.language}
        language = instance["language"] if instance["language"] in ("en", "zh") else self.language

        def run() -> tuple[str, dict]:
            if not instance["database"]:
                raise TableError(
                    f"{self.tool_name} was created without a task database; the row's "
                    f"extra_info.tools_kwargs.{self.tool_name}.create_kwargs must give database (database_<lang>/id_<N>)"
                )
            path = resolve_database(self.database_root, instance["database"])
            database = open_database(path, self.cache_size)
            return answer(self.tool_name, database, parameters, language, self.max_answer_chars)

        loop = asyncio.get_running_loop()
        try:
            text, metrics = await asyncio.wait_for(loop.run_in_executor(_pool(), run), self.timeout_s)
            metrics["timeout"] = 0
        except asyncio.TimeoutError:
            text = (
                f"Error: {self.tool_name} did not answer within {self.timeout_s:g} s and was abandoned; "
                "try again or narrow the query"
            )
            metrics = {"ok": 0, "records": 0, "left_out": 0, "chars": len(text), "timeout": 1}
        except TableError as error:
            text = f"Error: the task database cannot answer: {error}"
            metrics = {"ok": 0, "records": 0, "left_out": 0, "chars": len(text), "timeout": 0}
        return ToolResponse(text=text), 0.0, metrics

    async def release(self, instance_id: str, **kwargs) -> None:
        self._instances.pop(instance_id, None)


class TrainQueryTool(TravelTool):
    tool_name = "query_train_info"


class FlightQueryTool(TravelTool):
    tool_name = "query_flight_info"


class HotelQueryTool(TravelTool):
    tool_name = "query_hotel_info"


class AttractionDetailsQueryTool(TravelTool):
    tool_name = "query_attraction_details"


class AttractionRecommendTool(TravelTool):
    tool_name = "recommend_attractions"


class LocationSearchTool(TravelTool):
    tool_name = "search_location"


class RoadRouteInfoQueryTool(TravelTool):
    tool_name = "query_road_route_info"


class RestaurantRecommendTool(TravelTool):
    tool_name = "recommend_restaurants"


class RestaurantDetailsQueryTool(TravelTool):
    tool_name = "query_restaurant_details"


TOOL_CLASSES: dict[str, type[TravelTool]] = {
    cls.tool_name: cls
    for cls in (
        TrainQueryTool,
        FlightQueryTool,
        HotelQueryTool,
        AttractionDetailsQueryTool,
        AttractionRecommendTool,
        LocationSearchTool,
        RoadRouteInfoQueryTool,
        RestaurantRecommendTool,
        RestaurantDetailsQueryTool,
    )
}


def tool_config(
    database_root: str,
    language: str = "en",
    max_answer_chars: int = DEFAULT_MAX_ANSWER_CHARS,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    cache_size: int = DEFAULT_CACHE_SIZE,
) -> dict:
    """verl's tool-config mapping (``{"tools": [{class_name, config, tool_schema}, ...]}``) for the nine tools.

    ``database_root`` may be an OmegaConf interpolation such as ``"${oc.env:DATABASE_DIR}"``, resolved when
    verl loads the YAML. ``language`` picks the schema text and the default answer language.
    """
    schemas = load_schemas(language)
    config = {
        "type": "native",
        "database_root": database_root,
        "language": language,
        "max_answer_chars": max_answer_chars,
        "timeout_s": timeout_s,
        "cache_size": cache_size,
    }
    return {
        "tools": [
            {"class_name": f"{__name__}.{cls.__name__}", "config": dict(config), "tool_schema": schemas[name]}
            for name, cls in TOOL_CLASSES.items()
        ]
    }
