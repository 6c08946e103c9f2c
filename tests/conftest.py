"""Shared fixtures: the tiny assets (built once, then reused from the cache) and verl config composition."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def tiny_assets() -> Path:
    """Tokenizer, teacher, student and data from ``opd.tiny`` (cached by builder version)."""
    import opd.tiny

    out_dir = Path(opd.tiny.default_dir())
    opd.tiny.build(out_dir)
    return out_dir


def compose_verl_config(overrides: list[str], config_name: str = "grpo_trainer"):
    """The exact config an entry point would see, composed without running it."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="opd.config", version_base=None):
        return compose(config_name=config_name, overrides=overrides)
