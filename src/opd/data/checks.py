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


# A DeepPlanning task database: the seven tables its nine travel tools read, relative to id_<N>/.
AGENT_DATABASE_TABLES = (
    "trains/trains.csv",
    "flights/flights.csv",
    "hotels/hotels.csv",
    "attractions/attractions.csv",
    "locations/locations_coords.csv",
    "transportation/distance_matrix.csv",
    "restaurants/restaurants.csv",
)
_AGENT_DATABASE_FIX = (
    "export DATABASE_DIR=/path/to/deepplanning/database, the folder holding database_<lang>/id_<N>/ "
    "(unzip DeepPlanning's database_<lang>.zip there, or generate a world with opd.agent.travel.world)"
)
_LISTED_DATABASES = 5


def check_agent_database(parquet_files, database_dir: str | None) -> None:
    """Refuse agent data whose tools would find no database: DATABASE_DIR must be set, exist and hold
    the directory (with its seven tables) of every row's ``extra_info.database``.

    Only that one nested column is read from each parquet file, so a few hundred rows check in
    milliseconds on the login node. Remote and deferred files are skipped (their rows are unknown yet).
    """
    if not database_dir:
        raise InputError(
            f"DATABASE_DIR is not set: the travel tools read each task's database from it. {_AGENT_DATABASE_FIX}"
        )
    if _is_remote(str(database_dir)):
        return
    root = Path(os.path.expanduser(str(database_dir)))
    if not root.is_dir():
        raise InputError(f"DATABASE_DIR={database_dir} is not a directory. {_AGENT_DATABASE_FIX}")
    databases: dict[str, str] = {}  # database -> the first file naming it
    for path in as_list(parquet_files):
        if not _is_remote(path) and not deferred(path):
            for database in _row_databases(path):
                databases.setdefault(database, path)
    missing, incomplete = [], []
    for database, path in databases.items():
        folder = root / database
        if not folder.is_dir():
            missing.append(f"{folder}/ (rows of {path})")
            continue
        lacking = [table for table in AGENT_DATABASE_TABLES if not (folder / table).is_file()]
        if lacking:
            incomplete.append(f"{folder}/ lacks {', '.join(lacking)}")
    for problems, what in ((missing, "has no directory"), (incomplete, "has incomplete directories")):
        if problems:
            shown = "; ".join(problems[:_LISTED_DATABASES])
            more = (
                f" and {len(problems) - _LISTED_DATABASES} more" if len(problems) > _LISTED_DATABASES else ""
            )
            raise InputError(
                f"DATABASE_DIR={database_dir} {what} for {len(problems)} of the {len(databases)} task "
                f"databases the data names: {shown}{more}. {_AGENT_DATABASE_FIX}; the data must come from "
                "the same DeepPlanning copy (python -m opd.data.prepare_agent_data checks both)"
            )


def _row_databases(path: str) -> list[str]:
    """The distinct ``extra_info.database`` values of one agent parquet file."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    file = Path(os.path.expanduser(path))
    if not file.is_file():
        raise InputError(
            f"agent data file {path} does not exist: prepare it with python -m opd.data.prepare_agent_data"
        )
    try:
        parquet = pq.ParquetFile(file)
        schema = parquet.schema_arrow
    except Exception as error:
        raise InputError(f"agent data file {path} is not a readable parquet file: {error}") from error
    index = schema.get_field_index("extra_info")
    extra = schema.field(index).type if index >= 0 else None
    if not (isinstance(extra, pa.StructType) and extra.get_field_index("database") >= 0):
        raise InputError(
            f"agent data file {path} has no extra_info.database column (which task database each row's "
            "tools read): it is not travel agent data; prepare it with python -m opd.data.prepare_agent_data"
        )
    # the nested path reads that one leaf; flattened, the table is that one column
    column = parquet.read(columns=["extra_info.database"]).flatten().column(0)
    if column.null_count:
        raise InputError(
            f"agent data file {path}: {column.null_count} row(s) have no extra_info.database; regenerate "
            "it with python -m opd.data.prepare_agent_data"
        )
    return list(dict.fromkeys(column.to_pylist()))
