"""Input checks run before Ray starts: a bad path or file fails in a second with one clear message
naming the file and the fix, instead of minutes later inside a Ray worker's traceback."""

from __future__ import annotations

import os
from pathlib import Path


class InputError(ValueError):
    """A user-facing problem with a path, file or setting; the message names the problem and the fix."""


def _is_remote(path: str) -> bool:
    return "://" in path  # hdfs://, s3://, ...: verl copies these itself


DEFERRED_ENV = "OPD_DEFERRED_INPUTS"


def deferred(path: str | None) -> bool:
    """A path that an earlier run of a chain will write (it lies under one of the directories in
    ``OPD_DEFERRED_INPUTS``, set at submission for ``after=`` runs) and that does not exist yet: its
    check moves to the job's start, where the entry point runs its checks again."""
    roots = [r for r in os.environ.get(DEFERRED_ENV, "").split(os.pathsep) if r]
    if not path or not roots or os.path.exists(path):
        return False
    absolute = os.path.abspath(os.path.expanduser(str(path)))
    return any(absolute == root or absolute.startswith(root.rstrip("/") + "/") for root in roots)


def resolve_model_dir(
    path: str | None, what: str = "model", setting: str = "actor_rollout_ref.model.path"
) -> str:
    """Return a local model directory (or a remote URI) for ``path``; raise InputError otherwise."""
    if not path:
        raise InputError(f"no {what} path given: set {setting}=/path/to/hf_model_dir")
    if _is_remote(path) or deferred(path):
        return path
    local = Path(os.path.expanduser(path))
    if not local.exists():
        cached = _hub_cache_dir(path)
        if cached is not None:
            return cached
        raise InputError(
            f"{what} path {path} does not exist: set {setting} to a Hugging Face model directory "
            "(config.json + weights); hub ids work only when already in the local HF cache"
        )
    if not local.is_dir() or not (local / "config.json").is_file():
        raise InputError(
            f"{what} path {path} is not a model directory (no config.json): point {setting} at the folder "
            "written by save_pretrained, or convert a verl checkpoint first"
        )
    weights = [*local.glob("*.safetensors"), *local.glob("*.bin"), *local.glob("*.safetensors.index.json")]
    if not weights:
        raise InputError(f"{what} directory {path} has config.json but no weights (*.safetensors or *.bin)")
    return str(local)


def _hub_cache_dir(repo_id: str) -> str | None:
    # a hub id is "org/name": an absolute or home-relative path (``/no_such_model``) is a path, not an id
    if repo_id.count("/") != 1 or repo_id.startswith(("/", "~", ".")):
        return None
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return None
    found = try_to_load_from_cache(repo_id, "config.json")
    return str(Path(found).parent) if isinstance(found, str) else None


def check_chat_template(model_dir: str, setting: str = "actor_rollout_ref.model.path") -> None:
    """Rollouts render prompts with the tokenizer's chat template; a base model without one cannot."""
    if _is_remote(model_dir) or deferred(model_dir):
        return
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
    except Exception as error:
        raise InputError(f"cannot load a tokenizer from {model_dir} ({setting}): {error}") from error
    if not getattr(tokenizer, "chat_template", None):
        raise InputError(
            f"the tokenizer in {model_dir} has no chat template: prompts are rendered with it. Use an "
            "instruct/chat model, or add a `chat_template` to its tokenizer_config.json (or chat_template.jinja)"
        )


RL_REQUIRED_COLUMNS = ("prompt",)
RL_REWARD_COLUMNS = ("data_source", "reward_model")


def check_rl_parquet(path: str, setting: str, need_reward_columns: bool = True) -> int:
    """Validate one parquet file in verl's RL format; return its row count."""
    if _is_remote(path) or deferred(path):
        return -1
    import pyarrow.parquet as pq

    file = Path(os.path.expanduser(path))
    if not file.is_file():
        raise InputError(
            f"data file {path} ({setting}) does not exist: prepare the data first (make data / make tiny)"
        )
    try:
        parquet = pq.ParquetFile(file)
    except Exception as error:
        raise InputError(f"data file {path} ({setting}) is not a readable parquet file: {error}") from error
    columns = set(parquet.schema_arrow.names)
    required = RL_REQUIRED_COLUMNS + (RL_REWARD_COLUMNS if need_reward_columns else ())
    missing = [c for c in required if c not in columns]
    if missing:
        raise InputError(
            f"data file {path} ({setting}) lacks column(s) {missing}; found {sorted(columns)}. verl's RL format "
            "needs `prompt` (a list of chat messages) plus `data_source` and `reward_model.ground_truth` for "
            "rewards: regenerate it with the project's data preparation"
        )
    rows = parquet.metadata.num_rows
    if rows == 0:
        raise InputError(f"data file {path} ({setting}) has no rows")
    return rows


def as_list(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return [value]
    return [str(v) for v in value]
