"""python -m opd.agent.travel.world --out DIR [--seed 0] [--n-tasks 8] [--languages en,zh] [--scale 1]

A small, deterministic synthetic travel-planning world in DeepPlanning's published layout, so tests and CPU
runs have tasks and task databases without the real (hub-hosted) data:

    DIR/data/travelplanning_query_<lang>.json
    DIR/database/database_<lang>/id_<N>/{trains/trains.csv, flights/flights.csv, hotels/hotels.csv,
        attractions/attractions.csv, locations/locations_coords.csv, transportation/distance_matrix.csv,
        restaurants/restaurants.csv}

Column names are the ones DeepPlanning's tools and evaluation read. ``DATABASE_DIR`` for the launcher is
``DIR/database``.

Design:
- One task = one trip (origin, one destination, 2-3 days, 2-4 people) and one database holding exactly the
  facts that trip needs (trains and flights both ways on both dates plus one off-date, the destination's
  hotels, attractions, restaurants near three attractions, POI coordinates and a full distance matrix among
  the destination's POIs). Facts are drawn language-neutrally, then rendered per language, so task ``id``
  N is the same trip in every language (as in DeepPlanning, where en and zh tasks correspond).
- The hard constraints are written in DeepPlanning's forms and are true in the task's database:
  ``train_seat_status`` / ``flight_seat_status`` (the named trains or flights have at least
  ``people_number`` seats; the other direct ones on those dates have fewer), ``hotel_star_service_required``
  (the only hotel of that star offering that service), ``restaurant_specific_tag_nearby`` (the only
  restaurant near that attraction with that tag), ``attraction_must_visit_named`` and
  ``budget_constraint``.
- The tables deliberately contain what DeepPlanning's tools have special cases for: transfer routes with two
  segments, missing seat status (the tools answer "Available"), route indexes past 9 (the tools sort them
  as text), a restaurant listed near two attractions, missing brands and closing dates, a free attraction,
  one open around the clock (opening time equals closing time).
- ``scale`` multiplies the number of hotels, attractions, restaurants and trains; the distance matrix grows
  with the square of the POI count. ``scale=1`` is test-sized (a few hundred records per task, the whole
  8-task world in well under 0.5 s); ``opd.bench.travel_tables`` uses the scale giving about 7,700 records
  per task, DeepPlanning's size.

Everything is derived from ``random.Random`` seeded with ``(seed, task index)``: the same arguments give
byte-identical files.
"""

from __future__ import annotations

import argparse
import csv
import datetime as dt
import json
import math
import random
from pathlib import Path

LANGUAGES = ("en", "zh")

TABLES = {
    "trains": "trains/trains.csv",
    "flights": "flights/flights.csv",
    "hotels": "hotels/hotels.csv",
    "attractions": "attractions/attractions.csv",
    "locations": "locations/locations_coords.csv",
    "distances": "transportation/distance_matrix.csv",
    "restaurants": "restaurants/restaurants.csv",
}

COLUMNS = {
    "trains": [
        "origin_city", "destination_city", "dep_date", "route_index", "segment_index", "train_no",
        "train_type", "dep_station_code", "dep_station_name", "arr_station_code", "arr_station_name",
        "dep_datetime", "arr_datetime", "duration", "seat_class", "seat_status", "price",
    ],
    "flights": [
        "origin_city", "destination_city", "dep_date", "route_index", "segment_index", "flight_no",
        "airline", "dep_station_code", "dep_station_name", "arr_station_code", "arr_station_name",
        "dep_datetime", "arr_datetime", "duration", "seat_class", "seat_status", "price", "equip_size",
        "equip_type", "manufacturer",
    ],
    "hotels": [
        "name", "city", "address", "latitude", "longitude", "decoration_time", "hotel_star", "price",
        "score", "brand", "services", "tags", "stock",
    ],
    "attractions": [
        "attraction_id", "attraction_name", "city", "address", "latitude", "longitude", "description",
        "rating", "opening_time", "closing_time", "closing_dates", "min_visit_hours", "max_visit_hours",
        "ticket_price", "attraction_type",
    ],
    "locations": ["poi_name", "latitude", "longitude", "poi_type"],
    "distances": ["origin", "destination", "distance_meters", "duration_minutes", "cost"],
    "restaurants": [
        "restaurant_id", "restaurant_name", "query_latitude", "query_longitude", "latitude", "longitude",
        "price_per_person", "cuisine", "opening_time", "closing_time", "nearby_attraction_name", "rating",
        "tags",
    ],
}  # fmt: skip

# (en name, zh name, station code, airport code, latitude, longitude)
CITIES = [
    ("Hefei", "合肥", "HFH", "HFE", 31.820587, 117.227239),
    ("Nanjing", "南京", "NKH", "NKG", 32.060255, 118.796877),
    ("Hangzhou", "杭州", "HZH", "HGH", 30.274084, 120.155070),
    ("Shanghai", "上海", "SHH", "SHA", 31.230416, 121.473701),
    ("Suzhou", "苏州", "SZH", "SZV", 31.298886, 120.585316),
    ("Wuhan", "武汉", "WHN", "WUH", 30.592849, 114.305539),
]
TRANSFER_CITIES = [("Bengbu", "蚌埠", "BBH"), ("Wuxi", "无锡", "WXH"), ("Changzhou", "常州", "CZH")]

WORDS = {
    "en": {
        "station": "{city} South Station",
        "airport": "{city} International Airport",
        "train_classes": ["Second Class Seat", "First Class Seat"],
        "flight_classes": ["Economy Class", "Business Class"],
        "train_types": ["High-speed Rail", "EMU"],
        "airlines": ["China Eastern Airlines", "Air China", "Hainan Airlines"],
        "brands": ["Ji Hotel", "Atour Hotel", "Marriott", "Hilton", "Home Inn", "Orange Hotel"],
        "services": ["Swimming Pool", "Gym", "Free Parking", "Laundry", "Airport Shuttle"],
        "hotel_tags": ["Family Friendly", "Business", "Near Metro", "Quiet"],
        "hotel": "{brand} {city} {place} Branch",
        "hotel_nobrand": "{city} {place} Guesthouse",
        "address": "{n} {place} Road, {city}",
        "places": ["Riverside", "Old Town", "Lake View", "Central Park", "West Gate", "Museum Square",
                   "Bell Tower", "Harbour", "Garden Lane", "Hill Top", "Silk Street", "Moon Bridge"],
        "attraction_types": ["Historical and Cultural", "Natural Scenery", "Art Exhibition", "City Landmark",
                             "Theme Park", "Leisure Experience"],
        "attraction": "{city} {place} {kind}",
        "attraction_kinds": ["Temple", "Park", "Gallery", "Tower", "Wonderland", "Old Street"],
        "description": "A well-known spot in {city} near {place}",
        "closed": "Monday",
        "all_day": "00:00",
        "cuisines": ["Jiangsu Cuisine", "Hot Pot", "Noodles", "Cantonese Cuisine", "Teahouse"],
        "restaurant_tags": ["Birthday Package", "Private Room", "Outdoor Seating", "Kids Menu", "Live Music"],
        "restaurant": "{place} {cuisine} House (Branch {n})",
        "poi_types": {"hotel": "hotel", "attraction": "attraction", "restaurant": "restaurant",
                      "station": "railway station", "airport": "airport"},
    },
    "zh": {
        "station": "{city}南站",
        "airport": "{city}国际机场",
        "train_classes": ["二等座", "一等座"],
        "flight_classes": ["经济舱", "公务舱"],
        "train_types": ["高铁", "动车"],
        "airlines": ["东方航空", "中国国航", "海南航空"],
        "brands": ["全季酒店", "亚朵酒店", "万豪", "希尔顿", "如家", "桔子酒店"],
        "services": ["泳池", "健身房", "免费停车", "洗衣服务", "机场接送"],
        "hotel_tags": ["亲子", "商务", "近地铁", "安静"],
        "hotel": "{brand}{city}{place}店",
        "hotel_nobrand": "{city}{place}客栈",
        "address": "{city}{place}路{n}号",
        "places": ["滨江", "老城", "湖景", "中央公园", "西门", "博物馆广场", "钟楼", "港湾", "花园巷",
                   "山顶", "丝绸街", "月桥"],
        "attraction_types": ["历史文化", "自然风光", "艺术展览", "城市地标", "主题乐园", "休闲体验"],
        "attraction": "{city}{place}{kind}",
        "attraction_kinds": ["寺", "公园", "美术馆", "塔", "乐园", "老街"],
        "description": "{city}{place}附近的知名景点",
        "closed": "周一",
        "all_day": "00:00",
        "cuisines": ["苏帮菜", "火锅", "面馆", "粤菜", "茶馆"],
        "restaurant_tags": ["生日套餐服务", "包间", "露天座位", "儿童餐", "现场音乐"],
        "restaurant": "{place}{cuisine}（{n}店）",
        "poi_types": {"hotel": "酒店", "attraction": "景点", "restaurant": "餐厅", "station": "火车站",
                      "airport": "机场"},
    },
}  # fmt: skip

# Language-neutral keys of the services/tags DeepPlanning's zh records carry next to the zh text.
SERVICE_KEYS = ["Swimming_Pool", "Gym", "Free_Parking", "Laundry", "Airport_Shuttle"]
TAG_KEYS = ["Birthday_Package", "Private_Room", "Outdoor_Seating", "Kids_Menu", "Live_Music"]
BASE_DATE = dt.date(2025, 11, 3)


def _coord(value: float) -> str:
    return f"{value:.6f}"


def _haversine_m(a: tuple[float, float], b: tuple[float, float]) -> float:
    lat1, lon1, lat2, lon2 = map(math.radians, (*a, *b))
    h = math.sin((lat2 - lat1) / 2) ** 2 + math.cos(lat1) * math.cos(lat2) * math.sin((lon2 - lon1) / 2) ** 2
    return 2 * 6_371_000 * math.asin(math.sqrt(h))


def _road(a: tuple[float, float], b: tuple[float, float]) -> tuple[int, int, int]:
    """(meters, minutes, cost): walking up to 2 km at no cost, a taxi beyond (as DeepPlanning's tool says)."""
    meters = int(_haversine_m(a, b) * 1.3)
    if meters <= 2000:
        return meters, max(1, meters // 80), 0
    km = meters / 1000
    return meters, int(km * 2 + 5), int(13 + 2.5 * max(0.0, km - 3))


def _hhmm(minutes: int) -> str:
    return f"{minutes // 60 % 24:02d}:{minutes % 60:02d}"


def _draw_task(index: int, seed: int, scale: int) -> dict:
    """Language-neutral facts of one trip and its database (indexes into the vocabularies)."""
    rng = random.Random(f"opd-travel-world-{seed}-{index}")
    org, dest = rng.sample(range(len(CITIES)), 2)
    days = rng.choice([2, 3])
    depart = BASE_DATE + dt.timedelta(days=rng.randrange(0, 20))
    people = rng.choice([2, 3, 4])
    mode = "train" if index % 2 == 0 else "flight"
    n_hotels, n_attractions = 8 * scale, 8 * scale
    places = WORDS["en"]["places"]

    hotels = []
    for h in range(n_hotels):
        hotels.append(
            {
                "brand": rng.randrange(len(WORDS["en"]["brands"])) if h % 5 != 4 else None,
                "place": h % len(places),
                "n": h // len(places),
                "star": 2 + h % 4,
                "price": float(rng.randrange(150, 1500)),
                "score": round(rng.uniform(3.8, 4.9), 1),
                "decoration": rng.randrange(2012, 2025),
                "services": sorted(rng.sample(range(5), rng.randrange(1, 4))),
                "tags": sorted(rng.sample(range(4), 2)),
                "stock": rng.randrange(0, 30),
                "offset": (rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05)),
            }
        )
    # The star+service constraint names the only hotel of its star that has the service.
    target_hotel = rng.randrange(n_hotels)
    service = rng.randrange(5)
    for h, hotel in enumerate(hotels):
        same_star = hotel["star"] == hotels[target_hotel]["star"]
        if h == target_hotel:
            hotel["services"] = sorted(set(hotel["services"]) | {service})
        elif same_star and service in hotel["services"]:
            hotel["services"] = [s for s in hotel["services"] if s != service] or [(service + 1) % 5]

    attractions = []
    for a in range(n_attractions):
        attractions.append(
            {
                "place": (a * 7 + 3) % len(places),
                "kind": a % 6,
                "n": a // len(places),
                "type": a % 6,
                "rating": round(rng.uniform(4.0, 4.9), 1),
                "open": rng.choice([480, 510, 540]),
                "close": rng.choice([1020, 1080, 1260]),
                "closed": a % 3 == 0,
                "min_h": float(rng.choice([1, 1.5, 2])),
                "max_h": float(rng.choice([2.5, 3, 4])),
                "ticket": rng.choice([0, 30, 45, 60, 120]) if a != 1 else None,
                "offset": (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04)),
            }
        )
    attractions[2]["open"] = attractions[2]["close"] = 0  # open around the clock
    must_visit = sorted(rng.sample(range(n_attractions), 2))

    # Restaurants near the first three attractions; the first restaurant of hub 0 is listed again at hub 1.
    hubs = [0, 1, 2]
    restaurants, listings = [], []
    for hub in hubs:
        for r in range(4 * scale):
            restaurants.append(
                {
                    "hub": hub,
                    "place": (hub * 5 + r) % len(places),
                    "cuisine": r % 5,
                    "n": r + 1,
                    "price": float(rng.randrange(40, 400)),
                    "rating": round(rng.uniform(3.9, 4.9), 1),
                    "open": rng.choice([600, 660]),
                    "close": rng.choice([1260, 1320]),
                    "tags": sorted(rng.sample(range(5), rng.randrange(0, 3))),
                    "offset": (rng.uniform(-0.004, 0.004), rng.uniform(-0.004, 0.004)),
                }
            )
            listings.append((hub, len(restaurants) - 1))
    listings.append((1, 0))
    tag_hub, tag = 0, rng.randrange(5)
    near_hub = [i for i, r in enumerate(restaurants) if r["hub"] == tag_hub]
    target_restaurant = rng.choice(near_hub)
    for i in near_hub:
        r = restaurants[i]
        if i == target_restaurant:
            r["tags"] = sorted(set(r["tags"]) | {tag})
        else:
            r["tags"] = [t for t in r["tags"] if t != tag]

    return {
        "index": index,
        "org": org,
        "dest": dest,
        "days": days,
        "depart": depart,
        "ret": depart + dt.timedelta(days=days - 1),
        "people": people,
        "rooms": (people + 1) // 2,
        "mode": mode,
        "hotels": hotels,
        "target_hotel": target_hotel,
        "service": service,
        "attractions": attractions,
        "must_visit": must_visit,
        "restaurants": restaurants,
        "listings": listings,
        "tag_hub": tag_hub,
        "tag": tag,
        "target_restaurant": target_restaurant,
        "transport": _draw_transport(
            rng, org, dest, depart, depart + dt.timedelta(days=days - 1), people, scale
        ),
        "budget": 1000 * people * days,
    }


def _draw_transport(rng, org, dest, depart, ret, people, scale) -> dict:
    """Direct and transfer trains/flights on (org->dest, depart), (dest->org, ret) and one off-date."""
    legs = {"outbound": (org, dest, depart), "inbound": (dest, org, ret), "offdate": (org, dest, ret)}
    transfer = rng.randrange(len(TRANSFER_CITIES))
    out = {}
    for kind in ("train", "flight"):
        per_leg = {}
        for leg, (a, b, date) in legs.items():
            direct = []
            for k in range(5 * scale):
                dep = rng.randrange(360, 1200)
                dur = rng.randrange(60, 180) if kind == "train" else rng.randrange(70, 150)
                prefix = "G" if kind == "train" else ["MU", "CA", "HU"][k % 3]
                direct.append(
                    {
                        "no": f"{prefix}{rng.randrange(1000, 9999)}",
                        "dep": dep,
                        "dur": dur,
                        "price": float(
                            rng.randrange(80, 400) if kind == "train" else rng.randrange(300, 1500)
                        ),
                        # Fewer seats than travellers on every direct route but the chosen one.
                        "seats": [str(rng.randrange(0, people)), str(rng.randrange(0, people))],
                        "type": k % 2,
                        "airline": k % 3,
                        "equip": k % 2,
                    }
                )
            chosen = rng.randrange(len(direct))
            direct[chosen]["seats"][0] = str(people + rng.randrange(0, 6))
            first = {"dep": rng.randrange(420, 900), "dur": rng.randrange(50, 90)}
            second = {"dep": first["dep"] + first["dur"] + 30, "dur": rng.randrange(40, 80)}
            per_leg[leg] = {
                "from": a,
                "to": b,
                "date": date,
                "direct": direct,
                "chosen": chosen,
                "transfer": {
                    "via": transfer,
                    "segments": [first, second],
                    "nos": [f"{'G' if kind == 'train' else 'MU'}{rng.randrange(100, 999)}" for _ in range(2)],
                    "price": float(rng.randrange(100, 500)),
                },
            }
        out[kind] = per_leg
    return out


def _city(index: int, language: str) -> str:
    return CITIES[index][0 if language == "en" else 1]


def _render_transport(task: dict, kind: str, language: str) -> tuple[list[dict], dict]:
    """Rows of trains.csv or flights.csv, and {leg: chosen number}."""
    w = WORDS[language]
    rows, chosen = [], {}
    route = 0
    route_now = [0]  # the route being written, read by row()
    classes = w["train_classes"] if kind == "train" else w["flight_classes"]
    hub_name = w["station"] if kind == "train" else w["airport"]
    for leg, info in task["transport"][kind].items():
        a, b, date = _city(info["from"], language), _city(info["to"], language), info["date"].isoformat()
        code_a = CITIES[info["from"]][2 if kind == "train" else 3]
        code_b = CITIES[info["to"]][2 if kind == "train" else 3]

        def row(seg, no, dep_name, dep_code, arr_name, arr_code, dep, dur, seat_class, seats, price, extra,
                info=info, a=a, b=b, date=date):  # fmt: skip
            day = info["date"]
            dep_at = dt.datetime.combine(day, dt.time()) + dt.timedelta(minutes=dep)
            arr_at = dep_at + dt.timedelta(minutes=dur)
            base = {
                "origin_city": a,
                "destination_city": b,
                "dep_date": date,
                "route_index": str(route_now[0]),
                "segment_index": str(seg),
                "dep_station_code": dep_code,
                "dep_station_name": dep_name,
                "arr_station_code": arr_code,
                "arr_station_name": arr_name,
                "dep_datetime": dep_at.strftime("%Y-%m-%d %H:%M"),
                "arr_datetime": arr_at.strftime("%Y-%m-%d %H:%M"),
                "duration": str(dur),
                "seat_class": seat_class,
                "seat_status": seats,
                "price": price,
            }
            if kind == "train":
                base.update(train_no=no, train_type=w["train_types"][extra["type"]])
            else:
                base.update(
                    flight_no=no,
                    airline=w["airlines"][extra["airline"]],
                    equip_size=["M", "L"][extra["equip"]],
                    equip_type=["320", "787"][extra["equip"]],
                    # A missing manufacturer: the tools answer it as JSON NaN.
                    manufacturer=["Airbus", "Boeing"][extra["equip"]] if extra["airline"] != 2 else "",
                )
            rows.append(base)

        for k, train in enumerate(info["direct"]):
            for c, seat_class in enumerate(classes):
                route += 1
                route_now[0] = route
                price = f"{train['price'] * (1 + c):.1f}"
                row(1, train["no"], hub_name.format(city=a), code_a, hub_name.format(city=b), code_b,
                    train["dep"], train["dur"], seat_class, train["seats"][c], price, train)  # fmt: skip
            if k == info["chosen"]:
                chosen[leg] = (train["no"], train["seats"][0])
        route += 1
        route_now[0] = route
        t = info["transfer"]
        via_en, via_zh, via_code = TRANSFER_CITIES[t["via"]]
        via = via_en if language == "en" else via_zh
        via_hub = hub_name.format(city=via)
        extra = {"type": 0, "airline": 0, "equip": 0}
        for seg, (segment, no) in enumerate(zip(t["segments"], t["nos"], strict=True), 1):
            dep_name, dep_code = (hub_name.format(city=a), code_a) if seg == 1 else (via_hub, via_code)
            arr_name, arr_code = (via_hub, via_code) if seg == 1 else (hub_name.format(city=b), code_b)
            # Seat status left empty (the tools answer "Available"); the price sits on the first segment.
            row(seg, no, dep_name, dep_code, arr_name, arr_code, segment["dep"], segment["dur"], classes[0], "",
                f"{t['price']:.1f}" if seg == 1 else "", extra)  # fmt: skip
    return rows, chosen


def _render_database(task: dict, language: str) -> tuple[dict[str, list[dict]], dict]:
    """Rows per table and the names the task's constraints refer to."""
    w = WORDS[language]
    dest_i = task["dest"]
    city = _city(dest_i, language)
    centre = (CITIES[dest_i][4], CITIES[dest_i][5])
    tables: dict[str, list[dict]] = {}
    facts: dict = {}
    tables["trains"], facts["trains"] = _render_transport(task, "train", language)
    tables["flights"], facts["flights"] = _render_transport(task, "flight", language)
    pois: list[tuple[str, tuple[float, float], str]] = []

    hotel_rows = []
    for h in task["hotels"]:
        place = w["places"][h["place"]] + (str(h["n"] + 1) if h["n"] else "")
        if h["brand"] is None:
            name = w["hotel_nobrand"].format(city=city, place=place)
        else:
            name = w["hotel"].format(brand=w["brands"][h["brand"]], city=city, place=place)
        lat, lon = centre[0] + h["offset"][0], centre[1] + h["offset"][1]
        hotel_rows.append(
            {
                "name": name,
                "city": city,
                "address": w["address"].format(n=h["place"] + 1, place=place, city=city),
                "latitude": _coord(lat),
                "longitude": _coord(lon),
                "decoration_time": str(h["decoration"]),
                "hotel_star": str(h["star"]),
                "price": f"{h['price']:.1f}",
                "score": f"{h['score']:.1f}",
                "brand": "" if h["brand"] is None else w["brands"][h["brand"]],
                "services": ";".join(w["services"][s] for s in h["services"]),
                "tags": "|".join(w["hotel_tags"][t] for t in h["tags"]),
                "stock": str(h["stock"]),
            }
        )
        pois.append((name, (lat, lon), "hotel"))
    tables["hotels"] = hotel_rows
    target = task["hotels"][task["target_hotel"]]
    facts["hotel"] = (hotel_rows[task["target_hotel"]]["name"], target["star"], target["price"])

    attraction_rows = []
    for a_i, a in enumerate(task["attractions"]):
        place = w["places"][a["place"]] + (str(a["n"] + 1) if a["n"] else "")
        name = w["attraction"].format(city=city, place=place, kind=w["attraction_kinds"][a["kind"]])
        lat, lon = centre[0] + a["offset"][0], centre[1] + a["offset"][1]
        attraction_rows.append(
            {
                "attraction_id": f"A{task['index']:03d}{a_i:03d}",
                "attraction_name": name,
                "city": city,
                "address": w["address"].format(n=a_i + 1, place=place, city=city),
                "latitude": _coord(lat),
                "longitude": _coord(lon),
                "description": w["description"].format(city=city, place=place),
                "rating": f"{a['rating']:.1f}",
                "opening_time": w["all_day"] if a["open"] == a["close"] else _hhmm(a["open"]),
                "closing_time": w["all_day"] if a["open"] == a["close"] else _hhmm(a["close"]),
                "closing_dates": w["closed"] if a["closed"] else "",
                "min_visit_hours": f"{a['min_h']:g}",
                "max_visit_hours": f"{a['max_h']:g}",
                "ticket_price": "" if a["ticket"] is None else str(a["ticket"]),
                "attraction_type": w["attraction_types"][a["type"]],
            }
        )
        pois.append((name, (lat, lon), "attraction"))
    tables["attractions"] = attraction_rows

    restaurant_rows, names = [], []
    for r_i, r in enumerate(task["restaurants"]):
        place = w["places"][r["place"]]
        names.append(w["restaurant"].format(place=place, cuisine=w["cuisines"][r["cuisine"]], n=r["n"] + r_i))
    for hub, r_i in task["listings"]:
        r = task["restaurants"][r_i]
        hub_row = attraction_rows[hub]
        hub_lat, hub_lon = float(hub_row["latitude"]), float(hub_row["longitude"])
        lat, lon = hub_lat + r["offset"][0], hub_lon + r["offset"][1]
        restaurant_rows.append(
            {
                "restaurant_id": f"R{task['index']:03d}{r_i:03d}",
                "restaurant_name": names[r_i],
                "query_latitude": hub_row["latitude"],
                "query_longitude": hub_row["longitude"],
                "latitude": _coord(lat),
                "longitude": _coord(lon),
                "price_per_person": f"{r['price']:.1f}",
                "cuisine": w["cuisines"][r["cuisine"]],
                "opening_time": _hhmm(r["open"]),
                "closing_time": _hhmm(r["close"]),
                "nearby_attraction_name": hub_row["attraction_name"],
                "rating": f"{r['rating']:.1f}",
                "tags": ";".join(w["restaurant_tags"][t] for t in r["tags"]),
            }
        )
        if (hub, r_i) != (1, 0):
            pois.append((names[r_i], (lat, lon), "restaurant"))
    tables["restaurants"] = restaurant_rows
    target_r = task["restaurants"][task["target_restaurant"]]
    facts["restaurant"] = (names[task["target_restaurant"]], target_r["price"], target_r["rating"])
    facts["tag_hub"] = attraction_rows[task["tag_hub"]]["attraction_name"]
    facts["must_visit"] = [
        (attraction_rows[i]["attraction_name"], task["attractions"][i]["rating"]) for i in task["must_visit"]
    ]

    for kind, fmt in (("station", w["station"]), ("airport", w["airport"])):
        offset = 0.03 if kind == "station" else -0.12
        pois.append((fmt.format(city=city), (centre[0] + offset, centre[1] + offset), kind))
    tables["locations"] = [
        {
            "poi_name": name,
            "latitude": _coord(lat),
            "longitude": _coord(lon),
            "poi_type": w["poi_types"][kind],
        }
        for name, (lat, lon), kind in pois
    ]
    # Coordinates go through their 6-decimal text form, as the tools compare them as text.
    coords = [(_coord(lat), _coord(lon)) for _, (lat, lon), _ in pois]
    distance_rows = []
    for i, a in enumerate(coords):
        for j, b in enumerate(coords):
            if i == j:
                continue
            meters, minutes, cost = _road((float(a[0]), float(a[1])), (float(b[0]), float(b[1])))
            distance_rows.append(
                {
                    "origin": f"{a[0]},{a[1]}",
                    "destination": f"{b[0]},{b[1]}",
                    "distance_meters": str(meters),
                    "duration_minutes": str(minutes),
                    "cost": str(cost),
                }
            )
    tables["distances"] = distance_rows
    return tables, facts


def _task_record(task: dict, facts: dict, language: str) -> dict:
    en = language == "en"
    w = WORDS[language]
    org, dest = _city(task["org"], language), _city(task["dest"], language)
    people, days = task["people"], task["days"]
    constraints: dict = {}
    mode_facts = facts["trains"] if task["mode"] == "train" else facts["flights"]
    key = "train" if task["mode"] == "train" else "flight"
    constraints[f"{key}_seat_status"] = {
        "constraint_context": (
            f"{people} travelers, choosing to travel by {'train' if key == 'train' else 'plane'}."
            if en
            else f"出行人数为{people}人，选择{'火车' if key == 'train' else '飞机'}出行。"
        ),
        "people_number": people,
        f"outbound_{key}_no": mode_facts["outbound"][0],
        f"inbound_{key}_no": mode_facts["inbound"][0],
        "outbound_seat_status": mode_facts["outbound"][1],
        "inbound_seat_status": mode_facts["inbound"][1],
    }
    hotel_name, star, price = facts["hotel"]
    service = w["services"][task["service"]]
    hotel = {
        "constraint_context": (
            f"Please select a {star}-star hotel that offers {service} for accommodation."
            if en
            else f"住宿请选择{star}星级，且提供{service}的酒店"
        ),
        "constraint_type": "superlative_star_service_required",
        "hotel_star": star,
        "required_service": WORDS["en"]["services"][task["service"]] if en else SERVICE_KEYS[task["service"]],
    }
    if not en:
        hotel["required_service_cn"] = service
    hotel.update(hotel_name=hotel_name, hotel_price=price)
    constraints["hotel_star_service_required"] = hotel
    r_name, r_price, r_rating = facts["restaurant"]
    tag = w["restaurant_tags"][task["tag"]]
    restaurant = {
        "constraint_context": (
            f"Arrange a meal at a restaurant near '{facts['tag_hub']}' during the trip, with {tag} required"
            if en
            else f"旅程中安排一顿'{facts['tag_hub']}'附近的餐厅，需要{tag}"
        ),
        "constraint_type": "superlative_specific_tag_nearby",
        "attraction_name": facts["tag_hub"],
        "required_tag": WORDS["en"]["restaurant_tags"][task["tag"]] if en else TAG_KEYS[task["tag"]],
    }
    if not en:
        restaurant["required_tag_cn"] = tag
    restaurant.update(restaurant_name=r_name, price_per_person=r_price, restaurant_rating=r_rating)
    constraints["restaurant_specific_tag_nearby"] = restaurant
    names = [name for name, _ in facts["must_visit"]]
    constraints["attraction_must_visit_named"] = {
        "constraint_context": (
            f"The itinerary must include visits to '{names[0]}' and '{names[1]}'."
            if en
            else f"行程中必须游玩'{names[0]}'和'{names[1]}'"
        ),
        "constraint_type": "superlative_must_visit_named",
        "attraction_names": names,
        "attraction_ratings": [rating for _, rating in facts["must_visit"]],
    }
    constraints["budget_constraint"] = {"max_budget": task["budget"]}

    depart, ret = task["depart"].isoformat(), task["ret"].isoformat()
    if en:
        by = "train" if key == "train" else "plane"
        query = (
            f"I'm planning a {days}-day trip from {org} to {dest}, leaving on {depart} and returning on {ret}. "
            f"There are {people} of us and we'll travel by {by}; please pick one with enough seats for all of us. "
            f"The total budget is {task['budget']} yuan. We'd like a {star}-star hotel with {service}, "
            f"{task['rooms']} room(s). We must visit '{names[0]}' and '{names[1]}', and we'd like one meal near "
            f"'{facts['tag_hub']}' at a restaurant offering {tag}. Please plan the whole itinerary."
        )
    else:
        by = "火车" if key == "train" else "飞机"
        query = (
            f"我打算{depart}从{org}出发去{dest}玩{days}天，{ret}返回。我们一共{people}个人，坐{by}出行，"
            f"请选余票足够的班次。总预算{task['budget']}元。想住带{service}的{star}星级酒店，订{task['rooms']}间房。"
            f"'{names[0]}'和'{names[1]}'一定要去，另外想在'{facts['tag_hub']}'附近找一家有{tag}的餐厅吃一顿。"
            f"请帮我规划完整行程。"
        )
    return {
        "id": str(task["index"]),
        "query": query,
        "meta_info": {
            "org": org,
            "dest": [dest],
            "days": days,
            "depart_date": depart,
            "return_date": ret,
            "people_number": people,
            "room_number": task["rooms"],
            "hard_constraints": constraints,
            "depart_weekday": task["depart"].isoweekday(),
        },
    }


def _write_csv(path: Path, columns: list[str], rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)


def write_world(root: str | Path, seed: int = 0, n_tasks: int = 8, languages=("en",), scale: int = 1) -> dict:
    """Write the tasks and task databases under ``root``; returns where they are.

    Returns ``{"root", "database_dir" (= DATABASE_DIR), "tasks": {lang: tasks json}, "databases": {lang:
    [database dirs]}, "records": {lang: [records per database]}}``.
    """
    languages = tuple(languages.split(",")) if isinstance(languages, str) else tuple(languages)
    unknown = [lang for lang in languages if lang not in LANGUAGES]
    if unknown:
        raise ValueError(f"unknown language(s) {unknown}: choose from {list(LANGUAGES)}")
    if n_tasks < 1 or scale < 1:
        raise ValueError(f"n_tasks and scale must be at least 1 (got n_tasks={n_tasks}, scale={scale})")
    root = Path(root)
    drawn = [_draw_task(i, seed, scale) for i in range(n_tasks)]
    result = {
        "root": str(root),
        "database_dir": str(root / "database"),
        "tasks": {},
        "databases": {},
        "records": {},
    }
    for language in languages:
        records, dirs, counts = [], [], []
        for task in drawn:
            tables, facts = _render_database(task, language)
            db_dir = root / "database" / f"database_{language}" / f"id_{task['index']}"
            for table, rel in TABLES.items():
                _write_csv(db_dir / rel, COLUMNS[table], tables[table])
            records.append(_task_record(task, facts, language))
            dirs.append(str(db_dir))
            counts.append(sum(len(rows) for rows in tables.values()))
        tasks_path = root / "data" / f"travelplanning_query_{language}.json"
        tasks_path.parent.mkdir(parents=True, exist_ok=True)
        tasks_path.write_text(json.dumps(records, ensure_ascii=False, indent=2), encoding="utf-8")
        result["tasks"][language] = str(tasks_path)
        result["databases"][language] = dirs
        result["records"][language] = counts
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="directory to write data/ and database/ under")
    parser.add_argument("--seed", type=int, default=0, help="world seed (same seed, same files)")
    parser.add_argument("--n-tasks", type=int, default=8, help="tasks (and databases) per language")
    parser.add_argument("--languages", default="en", help="comma-separated: en, zh")
    parser.add_argument("--scale", type=int, default=1, help="multiplies table sizes (about 1 = tests)")
    args = parser.parse_args(argv)
    result = write_world(args.out, args.seed, args.n_tasks, args.languages, args.scale)
    for language, counts in result["records"].items():
        print(f"{language}: {len(counts)} tasks, {min(counts)}-{max(counts)} records per database")
    print(f"tasks: {result['tasks']}\nDATABASE_DIR={result['database_dir']}")


if __name__ == "__main__":
    main()
