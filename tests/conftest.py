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


@pytest.fixture(scope="session")
def tiny_agent_assets() -> Path:
    """The tiny agent task's databases, rows, teacher and student (``make tiny-agent``; minutes to build)."""
    from opd.tiny.agent_build import build_agent, default_agent_dir

    out_dir = default_agent_dir()
    build_agent(out_dir)
    return out_dir


def compose_verl_config(overrides: list[str], config_name: str = "grpo_trainer"):
    """The exact config an entry point would see, composed without running it."""
    from hydra import compose, initialize_config_module

    with initialize_config_module(config_module="opd.config", version_base=None):
        return compose(config_name=config_name, overrides=overrides)


REPO = Path(__file__).resolve().parents[1]


def tiny_launcher_env(
    tiny_assets: Path, data_dir: Path, output_root: Path, **variables: str
) -> dict[str, str]:
    """Environment for ``jobs/*.sh`` on CPU with the tiny student: the seed's variables at tiny sizes."""
    import os

    env = {
        k: v for k, v in os.environ.items() if k not in ("MODEL_PATH", "TEACHER_MODEL_PATH", "RAY_ADDRESS")
    }
    env.update(
        PLATFORM="cpu",
        MODEL_PATH=str(tiny_assets / "student"),
        DATA_DIR=str(data_dir),
        OUTPUT_ROOT=str(output_root),
        TRAIN_BATCH_SIZE="8",
        PPO_MINI_BATCH_SIZE="8",
        PPO_MICRO_BATCH_SIZE_PER_GPU="8",
        ROLLOUT_N="4",
        MAX_PROMPT_LENGTH="128",
        MAX_RESPONSE_LENGTH="24",
        LEARNING_RATE="1e-4",
        VAL_N="1",
        PYTHONUNBUFFERED="1",
    )
    env.update(variables)
    return env


def run_launcher(script: str, env: dict[str, str], log: Path, *args: str) -> int:
    """``bash jobs/<script> args...`` with its output in ``log``."""
    return run_logged(["bash", str(REPO / "jobs" / script), *args], env, log)


def run_logged(command: list[str], env: dict[str, str], log: Path) -> int:
    """Run ``command`` in its own session with its output in ``log``; when the test times out or is
    interrupted, the whole tree (bash, python, Ray's daemons and workers) is killed with it."""
    import subprocess

    from opd.demo import kill_session

    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as out:
        process = subprocess.Popen(
            command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            return process.wait()
        finally:
            kill_session(process)


def only_run_dir(output_root: Path) -> Path:
    """The single experiment directory a launcher created under OUTPUT_ROOT."""
    runs = [p for p in output_root.iterdir() if p.is_dir() and (p / ".hydra").is_dir()]
    assert len(runs) == 1, runs
    return runs[0]


@pytest.fixture(scope="session")
def tiny_raw_data(tiny_assets, tmp_path_factory) -> Path:
    """The tiny problems in the documented raw math layout (DAPO / AIME / MATH-500 files)."""
    from opd.tiny.raw_layout import write_raw_layout

    return write_raw_layout(tiny_assets, tmp_path_factory.mktemp("raw_data"))


@pytest.fixture(scope="session")
def grpo_checkpoint_run(tiny_assets, tiny_raw_data, tmp_path_factory) -> Path:
    """``bash jobs/train_grpo.sh`` (the DAPO-style recipe) for 2 steps on CPU, checkpoints at steps 1 and 2.

    Returns the run directory (``OUTPUT_ROOT/<experiment name>``: ``.hydra/``, ``metrics.jsonl``,
    ``global_step_{1,2}/actor``); shared by the GRPO and checkpoint-conversion tests."""
    output_root = tmp_path_factory.mktemp("grpo_outputs")
    env = tiny_launcher_env(
        tiny_assets, tiny_raw_data, output_root, TOTAL_TRAINING_STEPS="2", SAVE_FREQ="1", TEST_FREQ="2"
    )
    log = output_root / "launcher.log"
    assert run_launcher("train_grpo.sh", env, log) == 0, log.read_text()[-4000:]
    return only_run_dir(output_root)


@pytest.fixture(scope="session")
def tiny_math_data(tiny_assets, tmp_path_factory) -> Path:
    """DATA_DIR for the tiny_* math experiments: raw layout plus grpo_processed/ and eval_processed/."""
    from opd.tiny.__main__ import write_tiny_math_data

    data_dir = tmp_path_factory.mktemp("tiny_math_data")
    assert write_tiny_math_data(data_dir) == 0
    return data_dir


@pytest.fixture(scope="session")
def slurm_cluster() -> Path:
    """The local SLURM cluster (``make slurm-up``), started if it is not up; returns its slurm.conf.

    Stopped at the end only if this session started it: a cluster someone brought up stays up."""
    from opd.launch import local_slurm

    state = local_slurm.up()
    yield Path(state["slurm_conf"])
    if state["started"]:
        local_slurm.down()


# --- Test tiers (README "Development"): `make test-fast` runs `-m "not e2e"`, `make test-e2e` runs `-m e2e` --
# Fixtures that start a SLURM cluster or a verl run, or train models for minutes: only e2e tests may use them.
E2E_FIXTURES = {"slurm_cluster", "grpo_checkpoint_run", "tiny_agent_assets"}
# E2e files, longest first: with `--dist loadfile` each file goes to one worker, so the SLURM jobs run on
# the cluster while the other worker takes the verl runs; the rest follow in collection order.
# The agent file comes early: its fixture builds the tiny agent models, which the SLURM file's agent sweep
# also waits for (the build holds a lock), while the cluster is busy with the other SLURM tests.
E2E_FILE_ORDER = [
    "test_slurm_launch.py",
    "test_agent_opd_e2e.py",
    "test_grpo_e2e.py",
    "test_opd_e2e.py",
    "test_eval_e2e.py",
]


def tier_problem(item) -> str | None:
    """What breaks the tier rules: an e2e test without its own budget, or a fast test that would start
    e2e machinery (a SLURM cluster, a verl run)."""
    e2e = item.get_closest_marker("e2e") is not None
    if e2e and item.get_closest_marker("timeout") is None:
        return "an e2e test needs its own budget: @pytest.mark.timeout(seconds)"
    used = E2E_FIXTURES & set(getattr(item, "fixturenames", ()))
    if not e2e and used:
        return f"uses {sorted(used)} (a SLURM cluster or a verl run): mark it e2e"
    return None


def pytest_collection_modifyitems(config, items):
    """Order the e2e files longest first. (Tier-rule breaches fail at setup, in pytest_runtest_setup: an
    error raised here would only crash pytest-xdist's workers without saying why.)"""
    rank = {name: i for i, name in enumerate(E2E_FILE_ORDER)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item):
    """Before any fixture is set up: a fast test never gets as far as starting a cluster."""
    problem = tier_problem(item)
    if problem:
        pytest.fail(f"test tier rules: {problem}", pytrace=False)


RAY_DAEMONS = ("raylet", "gcs_server")


@pytest.fixture(autouse=True)
def _fast_tests_start_no_ray(request):
    """A fast test must leave no Ray daemon behind it (the fast tier starts no Ray cluster at all)."""
    yield
    if request.node.get_closest_marker("e2e") is not None:
        return
    import sys

    import psutil

    left = [
        name
        for name in (process_name(p) for p in psutil.Process().children(recursive=True))
        if name.startswith(RAY_DAEMONS)
    ]
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        left.append("ray.init() in this process")
    assert not left, f"a fast test started Ray ({left}): mark it e2e or stop what it starts"


def process_name(process) -> str:
    """A process's name, or "" once it has exited."""
    try:
        return process.name()
    except Exception:  # exited meanwhile
        return ""
