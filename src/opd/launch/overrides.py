"""Python values as Hydra command-line overrides: one quoting for run directories, sweeps and benchmarks."""

from __future__ import annotations

import re


def value(python_value) -> str:
    """A Python value as a Hydra override value (quoted where the override grammar needs it)."""
    v = python_value
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, list | tuple):
        return "[" + ",".join(value(item) for item in v) + "]"
    if isinstance(v, dict):
        return "{" + ",".join(f"{k}:{value(item)}" for k, item in v.items()) + "}"
    text = str(v)
    if re.fullmatch(r"[\w./@:+\-]+", text) and text not in ("null", "true", "false"):
        return text
    # Hydra's quoted strings: backslashes are escaped only where they precede a quote (or the end).
    text = re.sub(r"(\\+)('|$)", lambda m: m.group(1) * 2 + m.group(2), text)
    return "'" + text.replace("'", "\\'") + "'"


def flatten(tree: dict, prefix: str = "") -> list[tuple[str, object]]:
    """``(dotted.key, leaf)`` pairs of a nested dict (lists and empty dicts are leaves)."""
    items = []
    for key, leaf in tree.items():
        if isinstance(leaf, dict) and leaf:
            items += flatten(leaf, f"{prefix}{key}.")
        else:
            items.append((f"{prefix}{key}", leaf))
    return items


def tree_overrides(tree: dict) -> list[str]:
    """``key.path=value`` overrides of a nested dict's leaves (lists and empty dicts stay whole)."""
    return [f"{key}={value(leaf)}" for key, leaf in flatten(tree)]
