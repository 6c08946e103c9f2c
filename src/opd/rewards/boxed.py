"""Boxed-answer exact-match reward: 1.0 when the last ``\\boxed{...}`` equals the ground truth.

Enough for the tiny arithmetic task and as the default GRPO reward; ``opd.rewards.math_reward``
(symbolic equivalence) is the reward for real math data.
"""

from __future__ import annotations

_BOX_COMMANDS = ("\\boxed", "\\fbox")


def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` / ``\\fbox{...}`` / ``\\boxed x``, braces matched, or None."""
    start = max(text.rfind(cmd) for cmd in _BOX_COMMANDS)
    if start < 0:
        return None
    cmd = next(c for c in _BOX_COMMANDS if text.startswith(c, start))
    rest = text[start + len(cmd) :]
    if rest.startswith(" "):  # "\boxed 5" form: up to the next whitespace or "$"
        token = rest.strip().split()[0] if rest.strip() else ""
        return token.rstrip("$.") or None
    if not rest.startswith("{"):
        return None
    depth = 0
    for i, ch in enumerate(rest):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return rest[1:i]
    return None  # unbalanced


def normalize(answer: str) -> str:
    answer = answer.strip().replace(" ", "").rstrip(".")
    if answer.startswith("{") and answer.endswith("}"):
        answer = answer[1:-1]
    try:
        number = float(answer.replace(",", ""))
        return str(int(number)) if number.is_integer() else str(number)
    except ValueError:
        return answer


def compute_score(
    data_source=None, solution_str: str = "", ground_truth: str = "", extra_info=None, **kwargs
):
    """verl reward-function signature; returns ``{"score", "acc", "pred"}``."""
    pred = last_boxed(solution_str)
    correct = pred is not None and normalize(pred) == normalize(str(ground_truth))
    return {"score": float(correct), "acc": float(correct), "pred": pred if pred is not None else ""}
