"""The nine DeepPlanning travel tools as plain functions: ``tool(database, params, language) -> str``.

Each answers exactly what DeepPlanning's tool of the same name answers for the same task database and
arguments (``tests/data/travel_parity_<lang>.json`` holds DeepPlanning's recorded answers and the tests
compare every one): the same JSON text (``ensure_ascii=False``, ``indent=2``, key order), the same ordering
(trains and flights grouped by ``route_index`` sorted as text, so "10" comes before "2"; segments sorted by
``segment_index``; everything else in file order, first match for the detail tools), the same number
spellings (prices as floats, ``duration`` as int), the same missing-value spellings (a missing seat
status is "Available"/"充足"; a missing hotel field is ""; a missing train, flight or restaurant field is
JSON ``NaN``; a missing attraction field is "nan" in the details text, a missing ticket price "0") and the
same language-specific field names and messages. Tables are read as DeepPlanning reads them
(``pandas.read_csv(dtype=str)``, see ``database``), which is what makes those spellings identical.

DeepPlanning behaviours kept on purpose, because the evaluation side uses the same tools:
``query_hotel_info`` and ``recommend_attractions`` do not filter by city or date (a task database holds only
its destination), and a transfer segment's ``depCityName`` is the previous arrival station name cut at
" Station"/"站".

Differences from DeepPlanning (where it raises or silently misleads, we answer a message and never raise):
- Arguments are checked first, against the tool's schema: arguments that are not a JSON object, a missing
  required parameter, a parameter the tool does not have, a non-string value (DeepPlanning raises a
  jsonschema error; it ignores unknown parameters). The message names the parameter and the expected form.
- Dates (``depDate``, ``checkinDate``, ``checkoutDate``) must be real ``YYYY-MM-DD`` dates and checkout must
  follow checkin (DeepPlanning answers "not found" for a wrongly written date).
- Train/flight ``origin``/``destination`` not a city of the table: a message naming the parameter and the
  cities the table has (DeepPlanning: its plain "no train information found" message).
- Coordinates that are not numbers (``query_road_route_info``'s "latitude,longitude", or
  ``recommend_restaurants``' ``latitude``/``longitude``): a message with the expected form (DeepPlanning:
  its "not in query range" / "not found" messages, which we keep for well-formed but unknown coordinates).
- Malformed values where DeepPlanning raises (a non-integer ``duration``/``distance_meters``/
  ``duration_minutes``/``cost``, a missing arrival station before a transfer) and missing or unreadable
  tables (DeepPlanning answers "Database not loaded"/"No information found"): a message naming the table
  and the fix.
None of DeepPlanning's tools raises on a plain miss (no matching row): each has a not-found message, which
we answer verbatim.

``answer(tool, database, params, language, max_chars=None)`` dispatches by tool name, turns every error
into text and bounds the answer's length by dropping whole records (``bound_answer``).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from opd.agent.travel.database import TableError, TaskDatabase, open_database

# Parameters per tool: name -> required. Names follow DeepPlanning's schemas (tool_schema_<lang>.json).
PARAMETERS: dict[str, dict[str, bool]] = {
    "query_train_info": {"origin": True, "destination": True, "depDate": True, "seatClassName": False},
    "query_flight_info": {"origin": True, "destination": True, "depDate": True, "seatClassName": False},
    "query_hotel_info": {
        "destination": True,
        "checkinDate": True,
        "checkoutDate": True,
        "hotelStar": False,
        "hotelBrands": False,
    },
    "query_attraction_details": {"attraction_name": True},
    "recommend_attractions": {"city": True, "attraction_type": False},
    "search_location": {"place_name": True},
    "query_road_route_info": {"origin": True, "destination": True},
    "recommend_restaurants": {"latitude": True, "longitude": True},
    "query_restaurant_details": {"restaurant_name": True},
}

# The expected form of each parameter, quoted in bad-argument messages.
FORMS = {
    "origin": "a city name, e.g. Nanjing",
    "destination": "a city name, e.g. Nanjing",
    "depDate": "a date YYYY-MM-DD, e.g. 2025-11-12",
    "checkinDate": "a date YYYY-MM-DD, e.g. 2025-11-12",
    "checkoutDate": "a date YYYY-MM-DD, e.g. 2025-11-13",
    "seatClassName": "a seat class name as the query results spell it",
    "hotelStar": 'one star rating as a string, e.g. "4"',
    "hotelBrands": "one brand name, e.g. Hilton",
    "attraction_name": "an attraction name exactly as another tool returned it",
    "city": "a city name",
    "attraction_type": "one attraction type, e.g. Natural Scenery",
    "place_name": "a place name exactly as another tool returned it",
    "restaurant_name": "a restaurant name exactly as another tool returned it",
    "latitude": 'a latitude with 6 decimals as text, e.g. "32.060255"',
    "longitude": 'a longitude with 6 decimals as text, e.g. "118.796877"',
}
ROUTE_FORMS = {
    "origin": 'coordinates "latitude,longitude" with 6 decimals, e.g. "32.060255,118.796877"',
    "destination": 'coordinates "latitude,longitude" with 6 decimals, e.g. "32.060255,118.796877"',
}


class ArgumentError(ValueError):
    """A tool argument is missing, unknown or malformed; the message names it and the expected form."""


def _json(value: Any) -> str:
    # DeepPlanning's format: non-ASCII kept, two-space indent, NaN written as NaN.
    return json.dumps(value, ensure_ascii=False, indent=2)


def _missing(value: Any) -> bool:
    return isinstance(value, float) and math.isnan(value)


def _as_int(value: Any, table: str, column: str) -> int:
    try:
        return int(value)
    except (TypeError, ValueError) as error:
        raise TableError(
            f"table {table} has a non-integer {column} value {value!r}; fix that row of the database"
        ) from error


def check_params(tool: str, params: Any) -> dict:
    """Arguments as a dict of strings, checked against the tool's parameters (ArgumentError otherwise)."""
    if tool not in PARAMETERS:
        raise ArgumentError(f"unknown tool {tool!r}; the travel tools are {sorted(PARAMETERS)}")
    if isinstance(params, str):
        try:
            params = json.loads(params) if params.strip() else {}
        except json.JSONDecodeError as error:
            raise ArgumentError(
                f"{tool}: arguments are not valid JSON ({error}); send a JSON object"
            ) from error
    if not isinstance(params, dict):
        raise ArgumentError(
            f"{tool}: arguments must be a JSON object of parameters, got {type(params).__name__}"
        )
    spec = PARAMETERS[tool]
    forms = ROUTE_FORMS if tool == "query_road_route_info" else FORMS
    unknown = [name for name in params if name not in spec]
    if unknown:
        raise ArgumentError(f"{tool}: unknown parameter(s) {unknown}; the parameters are {list(spec)}")
    for name, required in spec.items():
        if name not in params:
            if required:
                raise ArgumentError(f"{tool}: missing required parameter {name!r}: {forms[name]}")
            continue
        if not isinstance(params[name], str):
            raise ArgumentError(
                f"{tool}: parameter {name!r} must be a string ({forms[name]}), got {json.dumps(params[name])}"
            )
    return params


def _check_date(tool: str, name: str, value: str) -> dt.date:
    if not re.fullmatch(r"\d{4}-\d{2}-\d{2}", value):
        raise ArgumentError(f"{tool}: parameter {name!r} is {value!r}; expected {FORMS[name]}")
    try:
        return dt.date.fromisoformat(value)
    except ValueError as error:
        raise ArgumentError(
            f"{tool}: parameter {name!r} is {value!r}, not a calendar date ({error})"
        ) from error


def _check_number(tool: str, name: str, value: str, form: str) -> None:
    try:
        float(value)
    except ValueError as error:
        raise ArgumentError(f"{tool}: parameter {name!r} is {value!r}; expected {form}") from error


def _database(database: TaskDatabase | str | Path) -> TaskDatabase:
    return database if isinstance(database, TaskDatabase) else open_database(database)


# ----------------------------------------------------------------------------------------------- transport

_TRANSPORT_TEXT = {
    "en": {
        "segment": "Segment {}",
        "seats": "Remaining Seats",
        "available": "Available",
        "station": " Station",
        "train_missing": "No train information found from {} to {} on {}",
        "flight_missing": "No flight information found from {} to {} on {}",
    },
    "zh": {
        "segment": "第{}段",
        "seats": "剩余票数量",
        "available": "充足",
        "station": "站",
        "train_missing": "未找到从 {} 到 {} 在 {} 的火车票信息",
        "flight_missing": "未找到从 {} 到 {} 在 {} 的航班信息",
    },
}

_TRAIN_COLUMNS = (
    "origin_city", "destination_city", "dep_date", "route_index", "segment_index", "train_no", "train_type",
    "dep_station_code", "dep_station_name", "arr_station_code", "arr_station_name", "dep_datetime",
    "arr_datetime", "duration", "seat_class", "seat_status", "price",
)  # fmt: skip
_FLIGHT_COLUMNS = (
    "origin_city", "destination_city", "dep_date", "route_index", "segment_index", "flight_no", "airline",
    "dep_station_code", "dep_station_name", "arr_station_code", "arr_station_name", "dep_datetime",
    "arr_datetime", "duration", "seat_class", "seat_status", "price", "equip_size", "equip_type", "manufacturer",
)  # fmt: skip


def _text(language: str) -> str:
    return "zh" if language == "zh" else "en"


def _transport(kind: str, database, params, language: str) -> str:
    tool = f"query_{kind}_info"
    params = check_params(tool, params)
    _check_date(tool, "depDate", params["depDate"])
    words = _TRANSPORT_TEXT[_text(language)]
    table = "trains" if kind == "train" else "flights"
    frame = _database(database).table(table, _TRAIN_COLUMNS if kind == "train" else _FLIGHT_COLUMNS)
    origin, destination, date = params["origin"], params["destination"], params["depDate"]
    seat_class = params.get("seatClassName", "")
    rows = frame[(frame["origin_city"] == origin) & (frame["destination_city"] == destination)]
    rows = rows[rows["dep_date"] == date]
    if seat_class:
        rows = rows[rows["seat_class"] == seat_class]
    if rows["route_index"].isna().any():
        raise TableError(f"table {table} has rows without route_index; every row needs one")
    if rows.empty:
        cities = set(frame["origin_city"].dropna()) | set(frame["destination_city"].dropna())
        for name, city in (("origin", origin), ("destination", destination)):
            if city not in cities:
                raise ArgumentError(
                    f"{tool}: parameter {name!r} is {city!r}, which is not a city in this task's {table}; "
                    f"the cities are {sorted(cities)}"
                )
        return words[f"{kind}_missing"].format(origin, destination, date)

    routes = []
    # Route indexes are text: they are grouped and ordered as strings, as DeepPlanning does.
    # (groupby sorts its keys as text and keeps each group's rows in file order, like filtering per route)
    for route_index, group in rows.groupby("route_index", sort=True):
        segments = group.sort_values("segment_index")
        route: dict[str, Any] = {}
        price = None
        previous = None
        for position, row in enumerate(segments.itertuples(), 1):
            seats = row.seat_status
            if seats is None or str(seats).strip() == "" or str(seats).lower() == "nan":
                seats = words["available"]
            if kind == "train" and position > 1:
                if not isinstance(previous.arr_station_name, str):
                    raise TableError(
                        f"table {table} route {route_index} has a segment without arr_station_name"
                    )
                # A later segment's departure city is the previous arrival station's name without " Station".
                dep_city = previous.arr_station_name.split(words["station"])[0]
            else:
                dep_city = row.origin_city
            segment = {
                "arrCityName": row.destination_city,
                "arrStationCode": row.arr_station_code,
                "arrStationName": row.arr_station_name,
                "depCityName": dep_city,
                "depStationCode": row.dep_station_code,
                "depStationName": row.dep_station_name,
                "duration": _as_int(row.duration, table, "duration"),
                "arrDateTime": row.arr_datetime,
                "depDateTime": row.dep_datetime,
                "marketingTransportName": row.train_type if kind == "train" else row.airline,
                "marketingTransportNo": row.train_no if kind == "train" else row.flight_no,
                "seatClassName": row.seat_class,
                words["seats"]: seats,
            }
            if kind == "flight":
                segment.update(
                    equipSize=row.equip_size, equipType=row.equip_type, manufacturer=row.manufacturer
                )
            route[words["segment"].format(position)] = segment
            if position == 1:
                try:
                    price = float(row.price)
                except (TypeError, ValueError):
                    price = None
            previous = row
        route["price"] = price if price is not None else 0
        # Trains come as one-element lists, flights as plain objects (DeepPlanning's shapes).
        routes.append([route] if kind == "train" else route)
    return _json(routes)


def query_train_info(database, params, language: str = "en") -> str:
    """Trains from ``origin`` to ``destination`` on ``depDate`` (optionally one ``seatClassName``)."""
    return _transport("train", database, params, language)


def query_flight_info(database, params, language: str = "en") -> str:
    """Flights from ``origin`` to ``destination`` on ``depDate`` (optionally one ``seatClassName``)."""
    return _transport("flight", database, params, language)


# ------------------------------------------------------------------------------------------------- hotels

_HOTEL_MISSING = {
    "en": "No hotel information found in {} from {} to {}, please check parameters or reduce constraints",
    "zh": "未找到满足条件的 {} 在 {} 到 {} 的酒店信息,请检查参数信息或减少约束条件",
}
_HOTEL_FIELDS = (
    ("name", "name"),
    ("address", "address"),
    ("latitude", "latitude"),
    ("longitude", "longitude"),
    ("decorationTime", "decoration_time"),
    ("hotelStar", "hotel_star"),
    ("price", "price"),
    ("score", "score"),
    ("brand", "brand"),
)


def query_hotel_info(database, params, language: str = "en") -> str:
    """The task's hotels, optionally of one ``hotelStar`` and one ``hotelBrands`` (no city or date filter)."""
    tool = "query_hotel_info"
    params = check_params(tool, params)
    checkin = _check_date(tool, "checkinDate", params["checkinDate"])
    checkout = _check_date(tool, "checkoutDate", params["checkoutDate"])
    if checkout <= checkin:
        raise ArgumentError(
            f"{tool}: checkoutDate {params['checkoutDate']} must be after checkinDate {params['checkinDate']}"
        )
    frame = _database(database).table("hotels", ("name", "hotel_star", "brand"))
    rows = frame
    if params.get("hotelStar", ""):
        rows = rows[rows["hotel_star"] == params["hotelStar"]]
    if params.get("hotelBrands", ""):
        rows = rows[rows["brand"] == params["hotelBrands"]]
    if rows.empty:
        return _HOTEL_MISSING[_text(language)].format(
            params["destination"], params["checkinDate"], params["checkoutDate"]
        )
    has_services = "services" in rows.columns
    hotels = []
    for _, row in rows.iterrows():
        # Absent columns and missing values both read as "" here.
        hotel = {key: _plain(row.get(column, "")) for key, column in _HOTEL_FIELDS}
        services = row.get("services") if has_services else None
        if isinstance(services, str) and services.strip():
            hotel["services"] = services.split(";")
        hotels.append(hotel)
    return _json(hotels)


def _plain(value: Any) -> str:
    return "" if value is None or _missing(value) else str(value)


# ------------------------------------------------------------------------------------------- attractions

_ATTRACTION_TEXT = {
    "en": {
        "missing": "Detailed information not found for attraction {}",
        "labels": ("Attraction ID", "Attraction Name", "City", "Address", "Coordinates", "Description", "Rating",
                   "Opening Hours", "Closed Dates", "Minimum Visit Duration", "Maximum Visit Duration",
                   "Ticket Price", "Attraction Type"),
        "latitude": "Latitude", "longitude": "Longitude", "rated": "(average visitor rating)", "to": "to",
        "hours": "hours", "currency": "RMB",
        "none": "No attraction recommendations found",
        "header": "Recommended attractions:\n",
        "line": "{}, {}. This is a {} type attraction",
    },
    "zh": {
        "missing": "未找到景点 {} 的详细信息",
        "labels": ("景点ID", "景点名称", "所属城市", "地址", "经纬度坐标", "景点简介", "用户评分", "开放时间",
                   "闭馆日期", "建议最短游玩时长", "建议最长游玩时长", "门票价格", "景点类型"),
        "latitude": "纬度", "longitude": "经度", "rated": "（游客平均评价）", "to": "至",
        "hours": "小时", "currency": "元",
        "none": "未找到景点推荐",
        "header": "推荐的景点有：\n",
        "line": "{}，{}这是一个{}类型的景点",
    },
}  # fmt: skip


def _number(value: Any) -> float | None:
    try:
        return None if _missing(value) else float(value)
    except (TypeError, ValueError):
        return None


def query_attraction_details(database, params, language: str = "en") -> str:
    """One attraction's details as labelled lines (first row with exactly this ``attraction_name``)."""
    params = check_params("query_attraction_details", params)
    words = _ATTRACTION_TEXT[_text(language)]
    frame = _database(database).table("attractions", ("attraction_name",))
    rows = frame[frame["attraction_name"] == params["attraction_name"]]
    if rows.empty:
        return words["missing"].format(params["attraction_name"])
    row = rows.iloc[0]

    def text(column: str, default: str = "") -> str:
        return str(row.get(column, default))

    rating = _number(row.get("rating"))
    min_hours = _number(row.get("min_visit_hours"))
    max_hours = _number(row.get("max_visit_hours"))
    ticket = _number(row.get("ticket_price"))
    opening, closing = text("opening_time"), text("closing_time")
    hours = opening if opening == closing else f"{opening} {words['to']} {closing}"
    values = (
        text("attraction_id"),
        text("attraction_name", params["attraction_name"]),
        text("city"),
        text("address"),
        f"{words['latitude']} {text('latitude')}，{words['longitude']} {text('longitude')}",
        text("description"),
        f"{'' if rating is None else rating}{words['rated']}",
        hours,
        text("closing_dates"),
        f"{'' if min_hours is None else min_hours} {words['hours']}",
        f"{'' if max_hours is None else max_hours} {words['hours']}",
        f"{'0' if ticket is None else ticket} {words['currency']}",
        text("attraction_type"),
    )
    # The label separator is a full-width colon in both languages.
    return "\n".join(f"{label}：{value}" for label, value in zip(words["labels"], values, strict=True))


def recommend_attractions(database, params, language: str = "en") -> str:
    """The task's attractions (optionally of one ``attraction_type``), one line each; no city filter."""
    params = check_params("recommend_attractions", params)
    words = _ATTRACTION_TEXT[_text(language)]
    frame = _database(database).table("attractions", ("attraction_name", "attraction_type"))
    rows = frame
    if params.get("attraction_type", ""):
        rows = rows[rows["attraction_type"] == params["attraction_type"]]
    if rows.empty:
        return words["none"]
    lines = [words["header"]]
    for _, row in rows.iterrows():
        lines.append(
            words["line"].format(
                row.get("attraction_name", ""), row.get("description", ""), row.get("attraction_type", "")
            )
        )
    return "\n".join(lines)


# -------------------------------------------------------------------------------------- locations, routes

_LOCATION_MISSING = {
    "en": (
        "Coordinate information not found for location {}, please check: 1. Whether the place name comes from "
        "other tool results; 2. Whether the place name is exactly consistent with tool results, no abbreviation, "
        "renaming or additional description allowed"
    ),
    "zh": (
        "未找到地点 {} 的坐标信息, 请检查：1. 地点名称是否来自其他工具的返回结果; 2. 地点名称是否与工具返回结果保持完全一致，"
        "不得缩写、改名或添加额外描述"
    ),
}
_ROUTE_TEXT = {
    "en": {
        "missing": "No transportation information found from {} to {}",
        "range": (
            "Coordinate {} is not in query range, please check:\n1. Whether coordinate comes from valid tool "
            "query result, not manual input or fabrication;\n2. Whether coordinate precision is exactly consistent "
            "with query result, 6 decimal places"
        ),
    },
    "zh": {
        "missing": "未找到从 {} 到 {} 的交通信息",
        "range": (
            "坐标 {} 不在查询范围内，请检查：\n1. 坐标是否源自有效的工具查询结果，而非手动输入或编造；\n"
            "2. 坐标数值精度是否与查询结果保持完全一致,6位小数"
        ),
    },
}


def search_location(database, params, language: str = "en") -> str:
    """Coordinates of the first POI named exactly ``place_name``."""
    params = check_params("search_location", params)
    frame = _database(database).table("locations", ("latitude", "longitude"))
    column = "poi_name" if "poi_name" in frame.columns else "place_name"
    if column not in frame.columns:
        raise TableError(
            "table locations/locations_coords.csv has neither a poi_name nor a place_name column"
        )
    rows = frame[frame[column] == params["place_name"]]
    if rows.empty:
        return _LOCATION_MISSING[_text(language)].format(params["place_name"])
    row = rows.iloc[0]
    return _json(
        {"place_name": row[column], "latitude": str(row["latitude"]), "longitude": str(row["longitude"])}
    )


def query_road_route_info(database, params, language: str = "en") -> str:
    """Distance, duration and cost from ``origin`` to ``destination`` ("latitude,longitude" as tools spell them)."""
    tool = "query_road_route_info"
    params = check_params(tool, params)
    for name in ("origin", "destination"):
        parts = params[name].split(",")
        if len(parts) != 2:
            raise ArgumentError(
                f"{tool}: parameter {name!r} is {params[name]!r}; expected {ROUTE_FORMS[name]}"
            )
        for part in parts:
            _check_number(tool, name, part, ROUTE_FORMS[name])
    words = _ROUTE_TEXT[_text(language)]
    frame = _database(database).table(
        "distances", ("origin", "destination", "distance_meters", "duration_minutes", "cost")
    )
    known = set(frame["origin"].unique()) | set(frame["destination"].unique())
    for name in ("origin", "destination"):
        if params[name] not in known:
            return words["range"].format(params[name])
    rows = frame[(frame["origin"] == params["origin"]) & (frame["destination"] == params["destination"])]
    if rows.empty:
        return words["missing"].format(params["origin"], params["destination"])
    row = rows.iloc[0]
    table = "transportation/distance_matrix.csv"
    return _json(
        {
            "origin": row["origin"],
            "destination": row["destination"],
            "distance_in_meters": _as_int(row["distance_meters"], table, "distance_meters"),
            "duration_in_minutes": _as_int(row["duration_minutes"], table, "duration_minutes"),
            "cost": _as_int(row["cost"], table, "cost"),
        }
    )


# ------------------------------------------------------------------------------------------- restaurants

_RESTAURANT_TEXT = {
    "en": {
        "none": "No recommended restaurants found near coordinates ({}, {}), please check coordinate source",
        "missing": "Detailed information not found for restaurant {}",
    },
    "zh": {
        "none": "未找到坐标 ({}, {}) 附近的推荐餐厅, 请检查坐标来源",
        "missing": "未找到餐厅 {} 的详细信息",
    },
}


def _restaurant(row, defaults: dict[str, Any], with_id: bool) -> dict:
    record = {"id": row.get("restaurant_id", "")} if with_id else {}
    record.update(
        {
            "name": row.get("restaurant_name", defaults["name"]),
            "latitude": str(row.get("latitude", 0)),
            "longitude": str(row.get("longitude", 0)),
            "price_per_person": str(row.get("price_per_person", defaults["price"])),
            "cuisine": row.get("cuisine", ""),
            "opening_time": row.get("opening_time", ""),
            "closing_time": row.get("closing_time", ""),
            "nearby_attraction_name": row.get("nearby_attraction_name", ""),
            "rating": str(row.get("rating", defaults["rating"])),
        }
    )
    tags = row.get("tags") if "tags" in row.index else None
    if isinstance(tags, str) and tags.strip():
        record["tags"] = tags.split(";")
    return record


def recommend_restaurants(database, params, language: str = "en") -> str:
    """Restaurants listed for the query point (``latitude``, ``longitude``), as text, in file order."""
    tool = "recommend_restaurants"
    params = check_params(tool, params)
    for name in ("latitude", "longitude"):
        _check_number(tool, name, params[name], FORMS[name])
    frame = _database(database).table("restaurants", ("query_latitude", "query_longitude"))
    rows = frame[
        (frame["query_latitude"] == params["latitude"]) & (frame["query_longitude"] == params["longitude"])
    ]
    if rows.empty:
        return _RESTAURANT_TEXT[_text(language)]["none"].format(params["latitude"], params["longitude"])
    defaults = {"name": "", "price": 0, "rating": 4.5}
    return _json([_restaurant(row, defaults, with_id=False) for _, row in rows.iterrows()])


def query_restaurant_details(database, params, language: str = "en") -> str:
    """The first restaurant named exactly ``restaurant_name``; a JSON message when there is none."""
    params = check_params("query_restaurant_details", params)
    name = params["restaurant_name"]
    frame = _database(database).table("restaurants", ("restaurant_name",))
    rows = frame[frame["restaurant_name"] == name]
    if rows.empty:
        return _json(
            {"message": _RESTAURANT_TEXT[_text(language)]["missing"].format(name), "restaurant_name": name}
        )
    defaults = {"name": name, "price": "100", "rating": 4.0}
    return _json(_restaurant(rows.iloc[0], defaults, with_id=True))


QUERIES: dict[str, Callable[..., str]] = {
    "query_train_info": query_train_info,
    "query_flight_info": query_flight_info,
    "query_hotel_info": query_hotel_info,
    "query_attraction_details": query_attraction_details,
    "recommend_attractions": recommend_attractions,
    "search_location": search_location,
    "query_road_route_info": query_road_route_info,
    "recommend_restaurants": recommend_restaurants,
    "query_restaurant_details": query_restaurant_details,
}

# How to narrow each listing tool's query, quoted when an answer is cut to its length bound.
NARROWING = {
    "query_train_info": "add seatClassName",
    "query_flight_info": "add seatClassName",
    "query_hotel_info": "add hotelStar and/or hotelBrands",
    "recommend_attractions": "add attraction_type",
    "recommend_restaurants": "query from another point or use query_restaurant_details",
}


def bound_answer(tool: str, text: str, max_chars: int | None) -> tuple[str, int]:
    """``text`` within ``max_chars``: whole records dropped from the end, with a note; (text, records left out).

    JSON lists lose trailing elements (the kept prefix is re-serialised exactly as the tools write it), line
    lists (``recommend_attractions``) lose trailing lines. Anything else longer than the bound (one record) is
    cut with a note, which no real record of DeepPlanning's size reaches.
    """
    if max_chars is None or len(text) <= max_chars:
        return text, 0
    how = NARROWING.get(tool, "narrow the query")

    def note(dropped: int, total: int) -> str:
        return f"\n[{dropped} of {total} records left out to stay within {max_chars} characters; {how}]"

    records = None
    if text.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            records = None
    if isinstance(records, list):
        render = _json
    elif tool == "recommend_attractions" and "\n\n" in text:
        header, body = text.split("\n\n", 1)
        records = body.split("\n")

        def render(kept):
            return "\n".join([header + "\n", *kept])
    else:
        marker = f"\n[answer cut at {max_chars} characters; {how}]"
        return text[: max(0, max_chars - len(marker))] + marker, 0

    total = len(records)
    low, high = 0, total  # the largest kept count whose text plus note fits
    while low < high:
        mid = (low + high + 1) // 2
        if len(render(records[:mid]) + note(total - mid, total)) <= max_chars:
            low = mid
        else:
            high = mid - 1
    return render(records[:low]) + note(total - low, total), total - low


def answer(
    tool: str, database, params: Any, language: str = "en", max_chars: int | None = None
) -> tuple[str, dict]:
    """The tool's answer as text (never raises for bad input) and metrics for the call.

    Metrics: ``ok`` (1 when the tool answered from its table, 0 for an argument or table error),
    ``records`` (records in the answer before bounding), ``left_out`` (records dropped to fit ``max_chars``),
    ``chars`` (length of the returned text).
    """
    metrics = {"ok": 1, "records": 0, "left_out": 0}
    try:
        text = QUERIES[tool](database, params, language) if tool in QUERIES else check_params(tool, params)
    except ArgumentError as error:
        text, metrics["ok"] = f"Error: {error}", 0
    except TableError as error:
        text, metrics["ok"] = f"Error: the task database cannot answer: {error}", 0
    else:
        metrics["records"] = _count_records(tool, text)
        text, metrics["left_out"] = bound_answer(tool, text, max_chars)
    metrics["chars"] = len(text)
    return text, metrics


def _count_records(tool: str, text: str) -> int:
    """Records in a successful answer: list elements, attraction lines, or 1 for a found detail record."""
    if text.startswith("["):
        return len(json.loads(text))
    if tool == "recommend_attractions":
        return text.count("\n") - 1 if "\n\n" in text else 0
    if tool == "query_attraction_details":
        return int("\n" in text)
    if text.startswith("{"):
        return int('"message"' not in text)
    return 0
