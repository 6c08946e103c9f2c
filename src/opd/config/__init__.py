"""verl-side Hydra configs (a package so that Hydra can find it as a config module).

Importing it registers the ``opd.*`` resolvers the recipes use; entry points resolve the whole config in
the driver (``opd.runtime.prepare``), so Ray workers never need them.
"""

from __future__ import annotations

import math
import os

from omegaconf import OmegaConf


def _basename(path) -> str:
    return os.path.basename(os.path.normpath(str(path)))


def _teacher_name(teacher, path) -> str:
    """The teacher in run names: its directory's name, or ``self`` (``opd.teacher=self`` has no path)."""
    return "self" if teacher == "self" else _basename(path)


def _safe_name(name) -> str:
    """Model names become directory and experiment names: ``Qwen/Qwen3-8B`` -> ``Qwen_Qwen3-8B``."""
    return str(name).replace("/", "_")


def _token_cap(prompt_length, response_length, factor) -> int:
    """Per-GPU token cap for dynamic batch sizes: ``factor`` full-length rows (the seed's rule)."""
    return (int(prompt_length) + int(response_length)) * int(factor)


def _product(*factors) -> int:
    return math.prod(int(f) for f in factors)


def _eval_tag(tools, instruction_variant, reward_function) -> str:
    """What an evaluation measured, in its run name: ``boxed-math_reward`` (math) or the tool task's name."""
    return str(tools) if tools not in (None, "None") else f"{instruction_variant}-{reward_function}"


def _tiny_dir(name: str = "") -> str:
    """Where the tiny assets live (``opd.tiny.default_dir``), e.g. ``${opd.tiny_dir:student}``."""
    from opd.tiny import default_dir

    return str(default_dir() / name)


def _tiny_agent_dir(name: str = "") -> str:
    """Where the tiny agent assets live (``make tiny-agent``), e.g. ``${opd.tiny_agent_dir:student}``."""
    from opd.tiny.agent_build import default_agent_dir

    return str(default_agent_dir() / name)


def _verl_config_dir() -> str:
    """verl's trainer configs, found without importing verl: ``pkg://verl.trainer.config`` imports the
    package (torch, Ray, transformers: ~5 CPU-seconds) only to list YAML files, on every composition."""
    import importlib.util

    spec = importlib.util.find_spec("verl")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("verl is not installed: make setup (or pip install -e '.[train]')")
    return os.path.join(next(iter(spec.submodule_search_locations)), "trainer", "config")


def register_resolvers() -> None:
    for name, fn in (
        ("opd.verl_config_dir", _verl_config_dir),
        ("opd.tiny_dir", _tiny_dir),
        ("opd.tiny_agent_dir", _tiny_agent_dir),
        ("opd.basename", _basename),
        ("opd.teacher_name", _teacher_name),
        ("opd.safe_name", _safe_name),
        ("opd.token_cap", _token_cap),
        ("opd.product", _product),
        ("opd.eval_tag", _eval_tag),
    ):
        OmegaConf.register_new_resolver(name, fn, replace=True)


register_resolvers()
