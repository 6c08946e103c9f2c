"""Bad input fails before Ray starts, with one message that names the file and the fix."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pandas as pd
import pytest


def _main_grpo(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "opd.main_grpo", "platform=cpu", *overrides], capture_output=True, text=True
    )


def _data(tiny_assets):
    return [
        f"data.train_files={tiny_assets / 'data' / 'train.parquet'}",
        f"data.val_files={tiny_assets / 'data' / 'val.parquet'}",
    ]


def _assert_one_clear_error(result: subprocess.CompletedProcess, *must_contain: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for text in must_contain:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize("where", ["nested", "one_slash"])
def test_missing_model_path(tiny_assets, tmp_path, where):
    # "/no_such_model" has the one slash of a hub id ("org/name"): it is still a path
    missing = tmp_path / "no_such_model" if where == "nested" else "/no_such_model"
    result = _main_grpo(f"actor_rollout_ref.model.path={missing}", *_data(tiny_assets))
    _assert_one_clear_error(result, str(missing), "does not exist", "actor_rollout_ref.model.path")


def test_parquet_without_prompt_column(tiny_assets, tmp_path):
    bad = tmp_path / "train.parquet"
    pd.read_parquet(tiny_assets / "data" / "train.parquet").drop(columns=["prompt"]).to_parquet(bad)
    result = _main_grpo(
        f"actor_rollout_ref.model.path={tiny_assets / 'student'}",
        f"data.train_files={bad}",
        f"data.val_files={tiny_assets / 'data' / 'val.parquet'}",
    )
    _assert_one_clear_error(result, str(bad), "prompt", "data.train_files")


def test_file_that_is_not_parquet(tiny_assets, tmp_path):
    bad = tmp_path / "val.parquet"
    bad.write_text("question,answer\n1+1,2\n")
    result = _main_grpo(
        f"actor_rollout_ref.model.path={tiny_assets / 'student'}",
        f"data.train_files={tiny_assets / 'data' / 'train.parquet'}",
        f"data.val_files={bad}",
    )
    _assert_one_clear_error(result, str(bad), "not a readable parquet file")


def test_tokenizer_without_chat_template(tiny_assets, tmp_path):
    model = tmp_path / "base_model"
    shutil.copytree(tiny_assets / "student", model)
    (model / "chat_template.jinja").unlink(missing_ok=True)
    config_file = model / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.pop("chat_template", None)
    config_file.write_text(json.dumps(config))
    result = _main_grpo(f"actor_rollout_ref.model.path={model}", *_data(tiny_assets))
    _assert_one_clear_error(result, str(model), "no chat template", "tokenizer_config.json")


def test_model_dir_without_weights(tiny_assets, tmp_path):
    model = tmp_path / "empty_model"
    model.mkdir()
    shutil.copy(tiny_assets / "student" / "config.json", model / "config.json")
    result = _main_grpo(f"actor_rollout_ref.model.path={model}", *_data(tiny_assets))
    _assert_one_clear_error(result, str(model), "no weights")
