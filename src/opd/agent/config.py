"""The ``agent:`` group of the verl-side config: which tools a multi-turn run calls, and where their data is.

It is typed and checked with the other inputs, before submission (``opd.launch.compose``) and again before
Ray starts. In the job, ``write_tool_config`` then writes verl's tool-config YAML for the run into its run
directory, with the database root, answer bound and limits baked in, and points
``actor_rollout_ref.rollout.multi_turn.tool_config_path`` at it. A run is thus reproducible from its own
directory, and ``DATABASE_DIR`` has one route into a run: ``agent.database_dir``, read by the tools and by
the travel reward (``reward.custom_reward_function.reward_kwargs.database_dir``).

No torch or verl at import time (the login side imports this).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from opd.data.checks import InputError, as_list, deferred

TOOL_SETS = ("travel", "calculator")
LANGUAGES = ("en", "zh")
TOOL_CONFIG_FILE = "tool_config.yaml"


@dataclass(frozen=True)
class AgentConfig:
    """``agent:`` keys (``src/opd/config/task/travel.yaml`` documents each)."""

    tools: str | None = None
    database_dir: str | None = None
    language: str = "en"
    tool_timeout_s: float = 10.0
    tool_cache_size: int = 16
    tool_names: tuple[str, ...] | None = None

    @classmethod
    def from_mapping(cls, mapping: dict | None) -> AgentConfig:
        mapping = dict(mapping or {})
        unknown = sorted(set(mapping) - set(cls.__dataclass_fields__))
        if unknown:
            raise InputError(
                f"unknown agent.* keys {unknown}: choose from {sorted(cls.__dataclass_fields__)}"
            )
        if mapping.get("tool_names") is not None:
            mapping["tool_names"] = tuple(mapping["tool_names"])
        agent = cls(**mapping)
        if agent.tools is not None and agent.tools not in TOOL_SETS:
            raise InputError(f"agent.tools={agent.tools!r}: choose one of {list(TOOL_SETS)} or null")
        if agent.language not in LANGUAGES:
            raise InputError(f"agent.language={agent.language!r}: choose one of {list(LANGUAGES)}")
        if not agent.tool_timeout_s > 0:
            raise InputError(f"agent.tool_timeout_s={agent.tool_timeout_s}: a positive number of seconds")
        if int(agent.tool_cache_size) != agent.tool_cache_size or agent.tool_cache_size < 1:
            raise InputError(f"agent.tool_cache_size={agent.tool_cache_size}: a positive whole number")
        if agent.tool_names is not None and not agent.tool_names:
            raise InputError("agent.tool_names=[]: name at least one tool, or null for all of agent.tools")
        return agent


def agent_config(config) -> AgentConfig | None:
    """The typed ``agent:`` group of a resolved verl config, or None when the config has none."""
    from omegaconf import OmegaConf

    if config.get("agent") is None:
        return None
    return AgentConfig.from_mapping(OmegaConf.to_container(config.agent, resolve=True))


def check_agent(config) -> AgentConfig | None:
    """Refuse a tool run whose tools cannot work: the travel tools need ``DATABASE_DIR`` holding the
    database directory of every row in the training and validation files."""
    agent = agent_config(config)
    if agent is None or agent.tools != "travel" or not multi_turn_enabled(config):
        return agent
    if agent.database_dir and deferred(agent.database_dir):
        return agent
    from opd.data.checks import check_agent_database  # refuses an unset DATABASE_DIR too, naming the fix

    files = [*as_list(config.data.get("train_files")), *as_list(config.data.get("val_files"))]
    check_agent_database([f for f in files if not deferred(f)], agent.database_dir)
    return agent


def multi_turn_enabled(config) -> bool:
    return bool(config.actor_rollout_ref.rollout.multi_turn.get("enable", False))


def tool_config(agent: AgentConfig, max_answer_chars: int) -> dict:
    """verl's tool-config mapping for ``agent`` (``{"tools": [...]}``)."""
    if agent.tools == "travel":
        from opd.agent.travel.tools import tool_config as travel_tools

        mapping = travel_tools(
            os.path.abspath(agent.database_dir),
            language=agent.language,
            max_answer_chars=max_answer_chars,
            timeout_s=agent.tool_timeout_s,
            cache_size=agent.tool_cache_size,
        )
    else:
        from opd.agent.calculator import SCHEMA

        mapping = {
            "tools": [
                {
                    "class_name": "opd.agent.calculator.CalculatorTool",
                    "config": {"type": "native"},
                    "tool_schema": SCHEMA,
                }
            ]
        }
    if agent.tool_names is None:
        return mapping
    offered = [tool["tool_schema"]["function"]["name"] for tool in mapping["tools"]]
    unknown = sorted(set(agent.tool_names) - set(offered))
    if unknown:
        raise InputError(
            f"agent.tool_names: unknown tools {unknown}; agent.tools={agent.tools} offers {offered}"
        )
    return {
        "tools": [t for t in mapping["tools"] if t["tool_schema"]["function"]["name"] in agent.tool_names]
    }


def write_tool_config(config, run_dir: str) -> str | None:
    """Write the run's tool config to ``run_dir/tool_config.yaml`` and point verl at it; a path the user
    set (``multi_turn.tool_config_path``) is kept as is. Returns the path verl will read, or None."""
    from omegaconf import OmegaConf, open_dict

    agent = agent_config(config)
    multi_turn = config.actor_rollout_ref.rollout.multi_turn
    if agent is None or agent.tools is None or not multi_turn_enabled(config):
        return multi_turn.get("tool_config_path")
    if multi_turn.get("tool_config_path"):
        return multi_turn.tool_config_path
    path = Path(run_dir).absolute() / TOOL_CONFIG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    OmegaConf.save(OmegaConf.create(tool_config(agent, int(multi_turn.max_tool_response_length))), tmp)
    os.replace(tmp, path)
    with open_dict(config):
        multi_turn.tool_config_path = str(path)
    return str(path)
