"""Agent recipes without Ray: the travel task's settings, the ``agent:`` group's checks (DATABASE_DIR), the
tool config a run writes for itself (loaded by verl's own registry), and agent evaluation's composition."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf, open_dict

from conftest import compose_verl_config
from opd.agent.config import AgentConfig, check_agent, tool_config, write_tool_config
from opd.data.checks import InputError
from opd.data.prepare_agent_data import prepare_agent_data

NINE_TOOLS = {
    "query_train_info",
    "query_flight_info",
    "query_hotel_info",
    "query_attraction_details",
    "recommend_attractions",
    "search_location",
    "query_road_route_info",
    "recommend_restaurants",
    "query_restaurant_details",
}


@pytest.fixture(scope="module")
def travel_data(tmp_path_factory) -> dict[str, Path]:
    """A synthetic DeepPlanning world prepared as the agent launcher prepares it."""
    from opd.agent.travel.world import write_world

    root = tmp_path_factory.mktemp("travel")
    write_world(root / "deepplanning", seed=0, n_tasks=4, languages=("en", "zh"))
    prepare_agent_data(
        data_dir=root / "deepplanning",
        output_dir=root / "agent_processed",
        train_ratio=0.5,
        database_dir=root / "deepplanning" / "database",
    )
    return {"data_dir": root, "database_dir": root / "deepplanning" / "database"}


def agent_config(travel_data, monkeypatch, *overrides: str):
    monkeypatch.setenv("DATA_DIR", str(travel_data["data_dir"]))
    config = compose_verl_config(
        ["experiment=opd_agent", "actor_rollout_ref.model.path=/models/student", *overrides], "opd_trainer"
    )
    OmegaConf.resolve(config)
    return config


def test_opd_agent_recipe_runs_the_tool_loop_on_the_travel_data_with_the_travel_reward(
    travel_data, monkeypatch
):
    monkeypatch.setenv("DATABASE_DIR", str(travel_data["database_dir"]))
    config = agent_config(travel_data, monkeypatch)
    rollout = config.actor_rollout_ref.rollout
    assert rollout.multi_turn.enable and rollout.multi_turn.format == "hermes"
    assert rollout.agent.default_agent_loop == "tool_agent" and config.data.return_raw_chat
    assert config.data.train_files.endswith("agent_processed/train.parquet")
    assert [Path(f).name for f in config.data.val_files] == ["val_travel_en.parquet", "val_travel_zh.parquet"]
    reward = config.reward.custom_reward_function
    assert reward.path == "pkg://opd.rewards.travel" and reward.name == "compute_score"
    # one route for DATABASE_DIR: the agent group, read by the tools' config and the reward alike
    assert config.agent.database_dir == reward.reward_kwargs.database_dir == str(travel_data["database_dir"])
    assert config.opd.max_length >= config.data.max_prompt_length + config.data.max_response_length
    assert check_agent(config).tools == "travel"


def test_a_travel_run_without_its_databases_is_refused_naming_database_dir(
    travel_data, monkeypatch, tmp_path
):
    monkeypatch.delenv("DATABASE_DIR", raising=False)
    with pytest.raises(InputError, match="export DATABASE_DIR="):
        check_agent(agent_config(travel_data, monkeypatch))
    # a DATABASE_DIR without the rows' task directories: the missing ones are named
    (tmp_path / "database_en").mkdir()
    monkeypatch.setenv("DATABASE_DIR", str(tmp_path))
    with pytest.raises(InputError, match=r"database_(en|zh)/id_\d"):
        check_agent(agent_config(travel_data, monkeypatch))
    # tools off (ENABLE_TOOLS=False): nothing to check
    assert check_agent(
        agent_config(travel_data, monkeypatch, "actor_rollout_ref.rollout.multi_turn.enable=false")
    )


@pytest.mark.parametrize(
    "agent,message",
    [
        ({"tools": "web"}, "agent.tools='web'"),
        ({"tools": "travel", "language": "fr"}, "agent.language='fr'"),
        ({"tools": "travel", "tool_timeout_s": 0}, "tool_timeout_s=0"),
        ({"tools": "travel", "tool_cache_size": 0}, "tool_cache_size=0"),
        ({"tools": "travel", "tool_names": []}, "name at least one tool"),
        ({"tools": "travel", "databse_dir": "/x"}, "unknown agent.* keys ['databse_dir']"),
    ],
)
def test_bad_agent_settings_are_refused_naming_the_key(agent, message):
    with pytest.raises(InputError) as error:
        AgentConfig.from_mapping(agent)
    assert message in str(error.value)


def test_the_run_writes_its_own_tool_config_and_verl_builds_the_tools_from_it(
    travel_data, monkeypatch, tmp_path
):
    from verl.tools.utils.tool_registry import initialize_tools_from_config

    monkeypatch.setenv("DATABASE_DIR", str(travel_data["database_dir"]))
    config = agent_config(
        travel_data, monkeypatch, "actor_rollout_ref.rollout.multi_turn.max_tool_response_length=777"
    )
    path = write_tool_config(config, str(tmp_path / "run"))
    assert (
        path
        == str(tmp_path / "run" / "tool_config.yaml")
        == config.actor_rollout_ref.rollout.multi_turn.tool_config_path
    )
    tools = initialize_tools_from_config(path)
    assert {tool.name for tool in tools} == NINE_TOOLS
    assert {tool.max_answer_chars for tool in tools} == {777}  # MAX_TOOL_RESPONSE_LENGTH bounds the answers
    assert {tool.database_root for tool in tools} == {str(travel_data["database_dir"])}
    # a path the user gives is kept; a subset of the tools is offered when asked
    with open_dict(config):
        config.actor_rollout_ref.rollout.multi_turn.tool_config_path = "/mine.yaml"
    assert write_tool_config(config, str(tmp_path / "other")) == "/mine.yaml"
    subset = tool_config(
        AgentConfig(tools="travel", database_dir="/db", tool_names=("search_location",)), 1024
    )
    assert [t["tool_schema"]["function"]["name"] for t in subset["tools"]] == ["search_location"]
    with pytest.raises(InputError, match="unknown tools"):
        tool_config(AgentConfig(tools="travel", database_dir="/db", tool_names=("book_hotel",)), 1024)


def test_agent_evaluation_composes_with_the_tools_on_and_names_the_data_step(
    travel_data, monkeypatch, tmp_path
):
    from opd.main_eval import check_eval_settings

    monkeypatch.setenv("DATA_DIR", str(tmp_path / "empty"))
    config = compose_verl_config(["task=travel", "actor_rollout_ref.model.path=/m/student"], "eval")
    assert config.actor_rollout_ref.rollout.multi_turn.enable
    assert config.reward.custom_reward_function.path == "pkg://opd.rewards.travel"
    assert config.trainer.experiment_name == "student-eval-travel-local"
    with pytest.raises(InputError, match="opd.data.prepare_agent_data"):
        check_eval_settings(config)
    monkeypatch.setenv("DATA_DIR", str(travel_data["data_dir"]))
    config = compose_verl_config(["task=travel", "actor_rollout_ref.model.path=/m/student"], "eval")
    check_eval_settings(config)
    assert config.data.train_files == [config.data.val_files[0]]
    math = compose_verl_config(["actor_rollout_ref.model.path=/m/student"], "eval")
    assert math.trainer.experiment_name == "student-eval-boxed-math_reward-local"  # names unchanged
