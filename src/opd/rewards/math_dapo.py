"""DAPO-format math reward: the answer is on the last ``Answer: ...`` line, judged by ``math_reward``.

DAPO prompts ask for a final line ``Answer: $Answer``; verl's ``reward_score.math_dapo`` extracts it
case-insensitively, takes the last such line and compares normalised strings. Here the extraction
convention is the same, but equivalence is ``opd.rewards.math_reward``'s (``score_answer``, one home for it),
and ``score`` is 1.0/0.0 like every opd reward rather than verl's 1.0/-1.0, so that scores from
``math_reward`` and ``math_dapo`` runs are directly comparable.
"""

from __future__ import annotations

import re

from opd.rewards.boxed import last_boxed
from opd.rewards.math_reward import score_answer

_ANSWER_LINE = re.compile(r"answer\s*:(.*)", re.IGNORECASE)


def extract_answer(solution_str: str) -> str:
    """The text after the last ``Answer:`` (any case), unwrapped from ``$...$``/``\\boxed{}``; "" if none."""
    matches = _ANSWER_LINE.findall(solution_str)
    if not matches:
        return ""
    answer = matches[-1].strip().strip("*").rstrip(".").strip()  # "**Answer:** 42." in markdown
    answer = last_boxed(answer) or answer
    if len(answer) >= 2 and answer.startswith("$") and answer.endswith("$"):
        answer = answer.strip("$").strip()
    return answer


def compute_score(
    data_source: str | None = None,
    solution_str: str = "",
    ground_truth: str = "",
    extra_info: dict | None = None,
    **kwargs: object,
) -> dict[str, float | str]:
    """verl reward-function signature; ``score`` = ``acc`` = 1.0 when the last ``Answer:`` is correct."""
    return score_answer(extract_answer(solution_str), ground_truth)
