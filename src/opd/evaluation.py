"""Scores of sampled math answers: mean@n, pass@k and maj@k per data source, as a table and JSON.

``pass@k`` uses the unbiased estimator of Chen et al. (2021), ``1 - C(n-c, k) / C(n, k)`` per problem, so
it is exact for every k <= n instead of a bootstrap estimate. ``maj@k`` is the accuracy of the most
frequent extracted answer among k samples (ties: the answer seen first), averaged over all k-subsets when
there are few, else over a seeded random choice of them. Pure Python: imported by the eval driver and tests.
"""

from __future__ import annotations

import itertools
import json
import random
from collections import Counter, defaultdict
from math import comb
from pathlib import Path

RESULTS_FILE = "eval_results.json"
GENERATIONS_FILE = "generations.jsonl"


def default_ks(n: int) -> list[int]:
    """1, 2, 4, ... below n, and n itself."""
    ks = [k for k in (2**i for i in range(n.bit_length())) if k < n]
    return [*ks, n]


def pass_at_k(n: int, correct: int, k: int) -> float:
    """Probability that at least one of k samples drawn without replacement from n is correct."""
    if n - correct < k:
        return 1.0
    return 1.0 - comb(n - correct, k) / comb(n, k)


def majority_correct(samples: list[tuple[str, bool]]) -> bool:
    """Is the most frequent answer (first seen wins a tie) correct? Empty answers never win a vote."""
    votes = Counter(pred for pred, _ in samples if pred)
    if not votes:
        return False
    top = max(votes.values())
    winner = next(pred for pred, _ in samples if pred and votes[pred] == top)
    return any(ok for pred, ok in samples if pred == winner)


def maj_at_k(samples: list[tuple[str, bool]], k: int, draws: int, rng: random.Random) -> float:
    n = len(samples)
    if k >= n:
        return float(majority_correct(samples))
    if comb(n, k) <= draws:
        subsets = itertools.combinations(samples, k)
    else:
        subsets = (
            [samples[i] for i in sorted(rng.sample(range(n), k))] for _ in range(draws)
        )  # keep order: ties
    hits = [majority_correct(list(subset)) for subset in subsets]
    return sum(hits) / len(hits)


def summarize(records: list[dict], ks: list[int] | None = None, maj_draws: int = 200, seed: int = 0) -> dict:
    """Per data source: problems, samples per problem, mean@n, pass@k and maj@k.

    ``records`` hold one sampled answer each: ``data_source``, ``uid`` (the problem), ``acc`` (bool or
    0/1) and ``pred`` (the extracted answer, "" if none)."""
    problems: dict[str, dict[str, list[tuple[str, bool]]]] = defaultdict(lambda: defaultdict(list))
    for record in records:
        problems[record["data_source"]][record["uid"]].append(
            (str(record.get("pred") or ""), bool(record["acc"]))
        )
    summary = {}
    rng = random.Random(seed)
    for source in sorted(problems):
        groups = list(problems[source].values())
        n = min(len(g) for g in groups)
        if any(len(g) != n for g in groups):
            raise ValueError(f"{source}: problems have different sample counts; cannot compute pass@k")
        k_values = [k for k in (ks or default_ks(n)) if 1 <= k <= n]
        summary[source] = {
            "problems": len(groups),
            "n": n,
            f"mean@{n}": sum(sum(ok for _, ok in g) / n for g in groups) / len(groups),
            **{
                f"pass@{k}": sum(pass_at_k(n, sum(ok for _, ok in g), k) for g in groups) / len(groups)
                for k in k_values
            },
            **{
                f"maj@{k}": sum(maj_at_k(g, k, maj_draws, rng) for g in groups) / len(groups)
                for k in k_values
            },
        }
    return summary


def format_table(summary: dict) -> str:
    """One row per data source; percentages with one decimal."""
    metric_names = []
    for scores in summary.values():
        metric_names += [m for m in scores if "@" in m and m not in metric_names]
    order = {"mean": 0, "pass": 1, "maj": 2}
    metric_names.sort(key=lambda m: (order[m.split("@")[0]], int(m.split("@")[1])))
    header = ["data source", "problems", *metric_names]
    rows = [
        [
            source,
            str(scores["problems"]),
            *(f"{100 * scores[m]:.1f}" if m in scores else "-" for m in metric_names),
        ]
        for source, scores in summary.items()
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.rjust(w) if i else cell.ljust(w) for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(out_dir: Path, records: list[dict], summary: dict, settings: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / GENERATIONS_FILE, "w") as f:
        for record in records:
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
    (out_dir / RESULTS_FILE).write_text(
        json.dumps({"settings": settings, "results": summary}, indent=2) + "\n"
    )
