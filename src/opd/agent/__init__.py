"""Tools for multi-turn agent rollouts (verl ``tool_agent`` loop, ``multi_turn.tool_config_path``)."""
