"""The final travel plan: DeepPlanning's converted-plan JSON schema, asked of the policy and parsed back.

DeepPlanning's agent writes its plan as Markdown inside ``<plan>`` tags, an LLM then converts it to JSON
(the format-conversion prompt in ``agent/prompts.py``), and the rule checks in ``evaluation/`` score that
JSON. A training reward cannot call an LLM, so the policy is asked to end its final reply with the
converted JSON itself, in a ```json fenced block; the reward parses it with ``parse_plan`` and scores it
with the same rules (``opd.rewards.travel``). The schema, field names and activity-type names are
DeepPlanning's, because its scorer reads exactly these::

    {"budget_summary": {"transportation", "accommodation", "meals", "attractions_and_tickets", "other",
                        "total_estimated_budget": number, "currency": str},
     "daily_plans": [{"day_number": int, "current_city": "from A to B" | "A",
                      "accommodation": {"name": str, "price_per_night": number},  # omitted on the last day
                      "activities": [{"time_slot": "HH:MM-HH:MM", "type": <one of ACTIVITY_TYPES>,
                                      "details": {<DETAIL_FIELDS[type]>}}]}]}

Validation is strict about what the scorer needs and nothing else: a plan that ``parse_plan`` accepts can
be scored by every rule without guessing. Required: ``daily_plans`` (a non-empty list), per day
``day_number`` (int), ``current_city`` (str) and ``activities`` (a list), per activity a well-formed
``time_slot``, a known ``type`` and that type's required ``details`` fields with the right types, and
``budget_summary.total_estimated_budget`` (a number). Optional fields (``accommodation``, the other
budget lines, ``details.city`` of an attraction, ``details.mode`` of a city trip) are type-checked when
present. Prices are plain numbers (``650``, not ``"¥650"``): DeepPlanning's converter extracts them so.
Unknown extra keys are allowed; unknown activity types are not (the scorer would silently skip them).

Where the JSON is found in a reply (the reply may hold tool calls and tool answers before it): the last
```json fenced block; else the last ``<JSON>...</JSON>`` span (what DeepPlanning's converter emits); else
the last top-level ``{...}`` object that decodes. Only that one candidate is validated: a broken final
plan is a format error even when an earlier JSON object (a tool answer) happens to parse.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from typing import Any

ACTIVITY_TYPES = ("travel_intercity_public", "travel_city", "attraction", "meal", "hotel", "buffer")

# Required ``details`` fields per activity type, with the types they must have. "number" means int or
# float (not bool, finite); "text" means str; "text_or_number" allows either (the converter writes
# "30km" / "60min", a policy may write 30 / 60).
DETAIL_FIELDS: dict[str, dict[str, str]] = {
    "travel_intercity_public": {
        "mode": "text",
        "number": "text",
        "from": "text",
        "to": "text",
        "cost": "number",
    },
    "travel_city": {
        "from": "text",
        "to": "text",
        "distance": "text_or_number",
        "duration": "text_or_number",
        "cost": "number",
    },
    "attraction": {"name": "text", "cost": "number"},
    "meal": {"meal_type": "text", "name": "text", "cost": "number"},
    "hotel": {"activity": "text", "name": "text"},
    "buffer": {"description": "text"},
}
OPTIONAL_DETAIL_FIELDS: dict[str, dict[str, str]] = {
    "attraction": {"city": "text"},
    "travel_city": {"mode": "text"},
}
BUDGET_FIELDS = ("transportation", "accommodation", "meals", "attractions_and_tickets", "other")

_SLOT = re.compile(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*")
# A fence opens and closes at the start of a line, so prose that mentions "```json" is not a block.
_FENCED_JSON = re.compile(r"^[ \t]*```json[ \t]*\n(.*?)^[ \t]*```", re.DOTALL | re.IGNORECASE | re.MULTILINE)
_JSON_TAGS = re.compile(r"<JSON>(.*?)</JSON>", re.DOTALL | re.IGNORECASE)
_MAX_DECODE_ATTEMPTS = 2000  # bounds the unfenced fallback on long replies full of braces


class PlanError(ValueError):
    """The reply holds no valid final plan; ``reason`` says what is wrong (missing, unparsable, a field)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


# --------------------------------------------------------------------------- instructions

_EXAMPLE_EN = {
    "budget_summary": {
        "transportation": 1360,
        "accommodation": 800,
        "meals": 440,
        "attractions_and_tickets": 120,
        "other": 0,
        "total_estimated_budget": 2720,
        "currency": "CNY",
    },
    "daily_plans": [
        {
            "day_number": 1,
            "current_city": "from Shanghai to Beijing",
            "accommodation": {"name": "Beijing Wangfujing Hotel", "price_per_night": 800},
            "activities": [
                {
                    "time_slot": "07:00-09:00",
                    "type": "travel_intercity_public",
                    "details": {
                        "mode": "flight",
                        "number": "CA1234",
                        "from": "Shanghai Hongqiao International Airport",
                        "to": "Beijing Capital International Airport",
                        "cost": 650,
                    },
                },
                {"time_slot": "09:00-09:40", "type": "buffer", "details": {"description": "Baggage claim"}},
                {
                    "time_slot": "09:40-10:40",
                    "type": "travel_city",
                    "details": {
                        "from": "Beijing Capital International Airport",
                        "to": "Beijing Wangfujing Hotel",
                        "distance": "30km",
                        "duration": "60min",
                        "cost": 60,
                    },
                },
                {
                    "time_slot": "10:40-11:00",
                    "type": "hotel",
                    "details": {"activity": "Check-in", "name": "Beijing Wangfujing Hotel"},
                },
                {
                    "time_slot": "11:00-11:10",
                    "type": "travel_city",
                    "details": {
                        "from": "Beijing Wangfujing Hotel",
                        "to": "Siji Minfu Roast Duck",
                        "distance": "0.5km",
                        "duration": "10min",
                        "cost": 0,
                    },
                },
                {
                    "time_slot": "11:10-12:20",
                    "type": "meal",
                    "details": {"meal_type": "lunch", "name": "Siji Minfu Roast Duck", "cost": 110},
                },
                {
                    "time_slot": "12:20-12:30",
                    "type": "travel_city",
                    "details": {
                        "from": "Siji Minfu Roast Duck",
                        "to": "The Palace Museum",
                        "distance": "0.7km",
                        "duration": "10min",
                        "cost": 0,
                    },
                },
                {
                    "time_slot": "12:30-16:30",
                    "type": "attraction",
                    "details": {"name": "The Palace Museum", "city": "Beijing", "cost": 60},
                },
            ],
        }
    ],
}

_EXAMPLE_ZH = {
    "budget_summary": {
        "transportation": 1360,
        "accommodation": 800,
        "meals": 440,
        "attractions_and_tickets": 120,
        "other": 0,
        "total_estimated_budget": 2720,
        "currency": "CNY",
    },
    "daily_plans": [
        {
            "day_number": 1,
            "current_city": "from 上海 to 北京",
            "accommodation": {"name": "北京王府井酒店", "price_per_night": 800},
            "activities": [
                {
                    "time_slot": "07:00-09:00",
                    "type": "travel_intercity_public",
                    "details": {
                        "mode": "flight",
                        "number": "CA1234",
                        "from": "上海虹桥国际机场",
                        "to": "北京首都国际机场",
                        "cost": 650,
                    },
                },
                {
                    "time_slot": "09:00-09:40",
                    "type": "buffer",
                    "details": {"description": "下飞机、提取行李"},
                },
                {
                    "time_slot": "09:40-10:40",
                    "type": "travel_city",
                    "details": {
                        "from": "北京首都国际机场",
                        "to": "北京王府井酒店",
                        "distance": "30km",
                        "duration": "60min",
                        "cost": 60,
                    },
                },
                {
                    "time_slot": "10:40-11:00",
                    "type": "hotel",
                    "details": {"activity": "办理入住", "name": "北京王府井酒店"},
                },
                {
                    "time_slot": "11:00-11:10",
                    "type": "travel_city",
                    "details": {
                        "from": "北京王府井酒店",
                        "to": "四季民福烤鸭店",
                        "distance": "0.5km",
                        "duration": "10min",
                        "cost": 0,
                    },
                },
                {
                    "time_slot": "11:10-12:20",
                    "type": "meal",
                    "details": {"meal_type": "午餐", "name": "四季民福烤鸭店", "cost": 110},
                },
                {
                    "time_slot": "12:20-12:30",
                    "type": "travel_city",
                    "details": {
                        "from": "四季民福烤鸭店",
                        "to": "故宫博物院",
                        "distance": "0.7km",
                        "duration": "10min",
                        "cost": 0,
                    },
                },
                {
                    "time_slot": "12:30-16:30",
                    "type": "attraction",
                    "details": {"name": "故宫博物院", "city": "北京", "cost": 60},
                },
            ],
        }
    ],
}

_INSTRUCTIONS_EN = """\
When you have gathered enough information, end your final reply with the complete plan as one JSON \
object in a ```json fenced block, and write nothing after it. Schema:
- "budget_summary": numbers "transportation", "accommodation", "meals", "attractions_and_tickets", \
"other", "total_estimated_budget" (the sum of all costs for the whole group), and "currency".
- "daily_plans": one entry per day with "day_number", "current_city" ("from A to B" on a travel day, \
else the city), "accommodation" ({"name", "price_per_night"}; leave it out on the last day) and \
"activities" in time order, each {"time_slot": "HH:MM-HH:MM", "type", "details"}:
  - travel_intercity_public: {"mode": "flight" or "train", "number", "from", "to", "cost" (per person)}
  - travel_city: {"from", "to", "distance", "duration", "cost" (per vehicle)}
  - attraction: {"name", "city", "cost" (per person)}
  - meal: {"meal_type": "lunch" or "dinner", "name", "cost" (per person)}
  - hotel: {"activity": "Check-in", "Check-out" or "Rest", "name"}
  - buffer: {"description"}
All prices are plain numbers (650, not "¥650"). Names must match the tool results exactly. \
A shortened example (a real plan covers every day of the trip):
```json
{example}
```"""

_INSTRUCTIONS_ZH = """\
收集到足够信息后，请在最终回复的末尾给出完整的旅行计划：一个放在 ```json 代码块中的 JSON 对象，代码块之后不要再写任何内容。\
字段名保持英文，结构如下：
- "budget_summary"：数字 "transportation"、"accommodation"、"meals"、"attractions_and_tickets"、"other"、\
"total_estimated_budget"（全体出行人员所有费用之和），以及 "currency"。
- "daily_plans"：每天一项，包含 "day_number"、"current_city"（跨城日写 "from 甲 to 乙"，否则写城市名）、\
"accommodation"（{"name", "price_per_night"}；最后一天不写）和按时间顺序排列的 "activities"，\
每项为 {"time_slot": "HH:MM-HH:MM", "type", "details"}：
  - travel_intercity_public：{"mode": "flight" 或 "train", "number", "from", "to", "cost"（每人）}
  - travel_city：{"from", "to", "distance", "duration", "cost"（每车）}
  - attraction：{"name", "city", "cost"（每人）}
  - meal：{"meal_type": "午餐" 或 "晚餐", "name", "cost"（每人）}
  - hotel：{"activity": "办理入住"、"退房" 或 "休息", "name"}
  - buffer：{"description"}
所有价格均为纯数字（650，而不是 "￥650"）。名称必须与工具返回结果完全一致。简化示例（真实计划须覆盖行程的每一天）：
```json
{example}
```"""


def _compact_json(plan: dict) -> str:
    """The example plan with one activity per line: readable, and a third of ``indent=1``'s length."""

    def dump(value: Any) -> str:
        return json.dumps(value, ensure_ascii=False)

    days = []
    for day in plan["daily_plans"]:
        head = {k: v for k, v in day.items() if k != "activities"}
        lines = ",\n".join(f"    {dump(act)}" for act in day["activities"])
        days.append(f'  {dump(head)[:-1]}, "activities": [\n{lines}\n  ]}}')
    days_text = ",\n".join(days)
    return f'{{"budget_summary": {dump(plan["budget_summary"])},\n "daily_plans": [\n{days_text}\n]}}'


def format_instructions(language: str) -> str:
    """Text appended to the user prompt: the JSON the final reply must end with, and a short example.

    ``language`` is the task's language, ``"en"`` or ``"zh"`` (DeepPlanning's two).
    """
    if language == "en":
        template, example = _INSTRUCTIONS_EN, _EXAMPLE_EN
    elif language == "zh":
        template, example = _INSTRUCTIONS_ZH, _EXAMPLE_ZH
    else:
        raise ValueError(f"format_instructions: unsupported language {language!r}; use 'en' or 'zh'")
    return template.replace("{example}", _compact_json(example))


# --------------------------------------------------------------------------- parsing


def _last_json_candidate(text: str) -> str | Any:
    """The final plan's JSON: its text (fenced / tagged) or the already decoded last top-level object."""
    fenced = _FENCED_JSON.findall(text)
    if fenced:
        return fenced[-1]
    tagged = _JSON_TAGS.findall(text)
    if tagged:
        return tagged[-1]
    decoder = json.JSONDecoder()
    last, pos, attempts = None, text.find("{"), 0
    while pos != -1 and attempts < _MAX_DECODE_ATTEMPTS:
        attempts += 1
        try:
            obj, end = decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            pos = text.find("{", pos + 1)
            continue
        last = obj
        pos = text.find("{", end)
    if last is None:
        raise PlanError(
            "no JSON plan found: end the final reply with the plan as one JSON object in a ```json block"
        )
    return last


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _check_kind(value: Any, kind: str) -> bool:
    if kind == "number":
        return _is_number(value)
    if kind == "text":
        return isinstance(value, str)
    return isinstance(value, str) or _is_number(value)  # text_or_number


_KIND_WORDS = {"number": "a number", "text": "a string", "text_or_number": "a string or a number"}


def slot_minutes(time_slot: str) -> tuple[int, int]:
    """``"HH:MM-HH:MM"`` as minutes since midnight; an end before the start is taken as the next day."""
    match = _SLOT.fullmatch(time_slot) if isinstance(time_slot, str) else None
    if match is None:
        raise PlanError(f"time_slot {time_slot!r} is not 'HH:MM-HH:MM'")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 24 or h2 > 24 or m1 > 59 or m2 > 59 or (h1 == 24 and m1) or (h2 == 24 and m2):
        raise PlanError(f"time_slot {time_slot!r} is not a valid clock time range")
    start, end = h1 * 60 + m1, h2 * 60 + m2
    if end < start:
        end += 24 * 60
    return start, end


def _validate(plan: Any) -> dict:
    if not isinstance(plan, dict):
        raise PlanError(f"the plan must be a JSON object, got {type(plan).__name__}")
    budget = plan.get("budget_summary")
    if not isinstance(budget, dict):
        raise PlanError("missing 'budget_summary' object")
    if not _is_number(budget.get("total_estimated_budget")):
        raise PlanError("'budget_summary.total_estimated_budget' must be a number")
    for key in BUDGET_FIELDS:
        if key in budget and budget[key] is not None and not _is_number(budget[key]):
            raise PlanError(f"'budget_summary.{key}' must be a number, got {budget[key]!r}")
    days = plan.get("daily_plans")
    if not isinstance(days, list) or not days:
        raise PlanError("'daily_plans' must be a non-empty list of days")
    for i, day in enumerate(days):
        where = f"daily_plans[{i}]"
        if not isinstance(day, dict):
            raise PlanError(f"{where} must be an object")
        if not isinstance(day.get("day_number"), int) or isinstance(day.get("day_number"), bool):
            raise PlanError(f"{where}.day_number must be an integer")
        if not isinstance(day.get("current_city"), str):
            raise PlanError(f"{where}.current_city must be a string")
        accommodation = day.get("accommodation")
        if accommodation is not None:
            if not isinstance(accommodation, dict):
                raise PlanError(f"{where}.accommodation must be an object or left out")
            if not isinstance(accommodation.get("name"), str):
                raise PlanError(f"{where}.accommodation.name must be a string")
            if not _is_number(accommodation.get("price_per_night")):
                raise PlanError(f"{where}.accommodation.price_per_night must be a number")
        activities = day.get("activities")
        if not isinstance(activities, list):
            raise PlanError(f"{where}.activities must be a list")
        for j, act in enumerate(activities):
            at = f"{where}.activities[{j}]"
            if not isinstance(act, dict):
                raise PlanError(f"{at} must be an object")
            try:
                slot_minutes(act.get("time_slot"))
            except PlanError as e:
                raise PlanError(f"{at}: {e.reason}") from None
            kind = act.get("type")
            if kind not in DETAIL_FIELDS:
                raise PlanError(f"{at}.type {kind!r} is not one of {', '.join(ACTIVITY_TYPES)}")
            details = act.get("details")
            if not isinstance(details, dict):
                raise PlanError(f"{at}.details must be an object")
            for field, want in DETAIL_FIELDS[kind].items():
                if field not in details:
                    raise PlanError(f"{at}.details.{field} is missing (required for {kind})")
                if not _check_kind(details[field], want):
                    raise PlanError(
                        f"{at}.details.{field} must be {_KIND_WORDS[want]}, got {details[field]!r}"
                    )
            for field, want in OPTIONAL_DETAIL_FIELDS.get(kind, {}).items():
                if details.get(field) is not None and not _check_kind(details[field], want):
                    raise PlanError(
                        f"{at}.details.{field} must be {_KIND_WORDS[want]}, got {details[field]!r}"
                    )
    return plan


def parse_plan(text: str) -> dict:
    """The plan at the end of a reply, validated against the schema; ``PlanError`` says what is wrong."""
    if not isinstance(text, str):
        raise PlanError(f"the reply must be a string, got {type(text).__name__}")
    candidate = _last_json_candidate(text)
    if isinstance(candidate, str):
        try:
            candidate = json.loads(candidate)
        except json.JSONDecodeError as e:
            raise PlanError(f"the final JSON block does not parse: {e}") from None
    return _validate(candidate)


def iter_activities(plan: dict, kind: str | None = None) -> Iterator[tuple[int, dict, dict]]:
    """(day index, day, activity) over a parsed plan in order, only activities of ``kind`` when given."""
    for index, day in enumerate(plan["daily_plans"]):
        for act in day["activities"]:
            if kind is None or act["type"] == kind:
                yield index, day, act
