"""The seed-compatible launchers in jobs/: variables documented, mapped to their config keys, required ones
enforced, runnable from a copy (as sbatch runs them). Composition only (``--cfg job``): no Ray here; the
end-to-end runs of the launchers are in test_grpo_e2e.py and test_eval_e2e.py."""

from __future__ import annotations

import os
import re
import shutil
import subprocess

import pytest
from omegaconf import OmegaConf

from conftest import REPO, tiny_launcher_env

LAUNCHERS = {
    "grpo": "train_grpo.sh",
    "native": "train_grpo_native.sh",
    "no_kl": "train_grpo_native_no_kl.sh",
    "opd": "train_opd.sh",
    "agent": "train_opd_agent.sh",
    "eval": "eval_math.sh",
    "convert": "convert_checkpoint.sh",
}
GROUPS = {"train": ["grpo", "native", "no_kl", "opd", "agent"], "all": list(LAUNCHERS)}
REQUIRED = {
    "grpo": ["MODEL_PATH"],
    "native": ["MODEL_PATH"],
    "no_kl": ["MODEL_PATH"],
    "opd": ["MODEL_PATH", "TEACHER_MODEL_PATH"],
    "agent": ["MODEL_PATH", "TEACHER_MODEL_PATH"],
    "eval": ["MODEL_PATH"],
    "convert": ["CHECKPOINT_PATH"],
}
# Values that differ from every default, one per variable with a config key (checked after composition).
TEST_VALUES = {
    "MODEL_NAME": "org/my-model",
    "RUN_ID": "r42",
    "N_GPUS_PER_NODE": "3",
    "TRAIN_BATCH_SIZE": "96",
    "PPO_MINI_BATCH_SIZE": "48",
    "PPO_MICRO_BATCH_SIZE_PER_GPU": "6",
    "LOG_PROB_MICRO_BATCH_SIZE_PER_GPU": "7",
    "LEARNING_RATE": "0.25",
    "TOTAL_EPOCHS": "3",
    "TOTAL_TRAINING_STEPS": "11",
    "SAVE_FREQ": "13",
    "TEST_FREQ": "17",
    "VAL_BEFORE_TRAIN": "false",
    "MAX_PROMPT_LENGTH": "333",
    "MAX_RESPONSE_LENGTH": "444",
    "ROLLOUT_N": "5",
    "TP_SIZE": "4",
    "GPU_MEMORY_UTIL": "0.55",
    "ENTROPY_COEFF": "0.125",
    "TEMPERATURE": "0.875",
    "TOP_P": "0.9375",
    "TOP_K": "50",
    "VAL_TEMPERATURE": "0.375",
    "VAL_TOP_P": "0.625",
    "VAL_TOP_K": "30",
    "VAL_N": "3",
    "KL_LOSS_COEF": "0.0625",
    "KL_LOSS_TYPE": "k3",
    "CLIP_RATIO_LOW": "0.15",
    "CLIP_RATIO_HIGH": "0.35",
    "CLIP_RATIO_C": "5.5",
    "USE_DYNAMIC_BSZ": "false",
    "LOSS_AGG_MODE": "seq-mean-token-mean",
    "OPD_LOSS_TYPE": "jsd",
    "OPD_CHUNK_SIZE": "64",
    "OPD_MAX_LENGTH": "777",
    "OPD_REWARD_BETA": "0.5",
    "ENABLE_THINKING": "true",
    "INSTRUCTION_VARIANT": "dapo",
    "REWARD_FUNCTION": "math_dapo",
    "ENABLE_TOOLS": "false",
    "MAX_ASSISTANT_TURNS": "9",
    "MAX_TOOL_RESPONSE_LENGTH": "2222",
    "TOOL_FORMAT": "gpt-oss",
    "AGENT_NUM_WORKERS": "5",
}
NOT_CONFIG = {
    "CHECKPOINT_PATH",
    "TARGET_DIR",
    "PYTHON",
    "OPD_REPO",
    "DAPO_TRAIN_RATIO",
    "AGENT_TRAIN_RATIO",
    "PLATFORM",
    "DATABASE_DIR",  # a path: test_agent_launcher_prepares_data_and_finds_the_database
}


def readme_rows() -> list[dict]:
    """The README's "Launcher variables" table: variable, launchers, config key(s), default."""
    text = (REPO / "README.md").read_text()
    table = text.split("### Launcher variables", 1)[1].split("\n\n")
    rows = []
    for line in next(block for block in table if block.startswith("| variable")).splitlines()[2:]:
        variable, launchers, key, default = (cell.strip() for cell in line.strip("|").split("|"))
        names = [n.strip() for n in launchers.split(",")]
        rows.append(
            {
                "variable": variable.strip("`"),
                "launchers": sorted({m for n in names for m in GROUPS.get(n, [n])}),
                "keys": _expand(key.strip("`")),
                "default": default,
            }
        )
    return rows


def _expand(key: str) -> list[str]:
    """``a.{b,c}.d`` -> ``[a.b.d, a.c.d]``."""
    match = re.search(r"\{([^}]*)\}", key)
    if not match:
        return [key]
    return [key[: match.start()] + part + key[match.end() :] for part in match.group(1).split(",")]


def launcher_variables() -> dict[str, set[str]]:
    """Every environment variable each launcher reads: in its script, the shared library's top level and
    the library functions it calls (``${VAR}`` references and the names given to ``map`` / ``require``)."""
    library = (REPO / "jobs" / "lib" / "common.sh").read_text()
    functions = dict(re.findall(r"^(\w+)\(\) \{\n(.*?)^\}", library, re.S | re.M))
    top_level = re.sub(r"^\w+\(\) \{\n.*?^\}", "", library, flags=re.S | re.M)
    used = {}
    for name, script in LAUNCHERS.items():
        text = (REPO / "jobs" / script).read_text()
        parts, pending = [text, top_level], [text]
        while pending:  # functions calling functions (map_training_variables -> locations)
            body = pending.pop()
            for fn, fn_body in functions.items():
                if re.search(rf"^\s*{fn}\b", body, re.M) and fn_body not in parts:
                    parts.append(fn_body)
                    pending.append(fn_body)
        names = set()
        for part in parts:
            names |= set(re.findall(r"\$\{!?([A-Z][A-Z0-9_]+)", part))
            lines = part.replace("\\\n", " ").splitlines()
            for tokens in (line.split() for line in lines):
                if tokens[:1] == ["map"]:
                    names |= set(tokens[1::2])
                elif tokens[:1] == ["require"]:
                    names |= set(tokens[1:])
        used[name] = names - {"OVERRIDES", "SLURM_SUBMIT_DIR", "SLURM_GPUS_ON_NODE", "BASH_SOURCE"}
    return used


def test_every_variable_a_launcher_reads_is_in_the_readme_table_and_vice_versa():
    documented = {row["variable"]: set(row["launchers"]) for row in readme_rows()}
    used = launcher_variables()
    for launcher, names in used.items():
        for name in names:
            assert name in documented, f"{LAUNCHERS[launcher]} reads {name}, missing from the README table"
            assert launcher in documented[name], f"README: {name} should list {launcher}"
    for name, launchers in documented.items():
        for launcher in launchers:
            assert name in used[launcher], f"README says {LAUNCHERS[launcher]} reads {name}; it does not"


@pytest.mark.parametrize("launcher", sorted(LAUNCHERS))
def test_missing_required_variables_stop_with_one_line_naming_them(launcher, tmp_path):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in {"MODEL_PATH", "TEACHER_MODEL_PATH", "CHECKPOINT_PATH"}
    }
    result = subprocess.run(
        ["bash", str(REPO / "jobs" / LAUNCHERS[launcher])], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "missing required variable(s): " + " ".join(REQUIRED[launcher]) in lines[0]
    assert not result.stdout


def test_platform_errors_name_the_fix(tiny_assets):
    base = {k: v for k, v in os.environ.items() if k not in {"N_GPUS_PER_NODE", "SLURM_GPUS_ON_NODE"}}
    base.update(
        MODEL_PATH=str(tiny_assets / "student"), PATH="/usr/bin:/bin"
    )  # no nvidia-smi on this machine
    script = str(REPO / "jobs" / "train_grpo.sh")
    no_gpu = subprocess.run(["bash", script], env=dict(base, PLATFORM="gpu"), capture_output=True, text=True)
    assert no_gpu.returncode == 2 and "no GPU found" in no_gpu.stderr and "PLATFORM=cpu" in no_gpu.stderr
    bad = subprocess.run(["bash", script], env=dict(base, PLATFORM="tpu"), capture_output=True, text=True)
    assert bad.returncode == 2 and "PLATFORM=tpu: use gpu or cpu" in bad.stderr


def compose_with_launcher(script: str, env: dict[str, str], cwd=None) -> tuple[dict, str]:
    """Run a launcher with ``--cfg job --resolve``: the config it would train with, and its stderr."""
    result = subprocess.run(
        ["bash", script, "--cfg", "job", "--resolve"], env=env, capture_output=True, text=True, cwd=cwd
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return OmegaConf.create(result.stdout), result.stderr


def _same(value, expected: str) -> bool:
    try:
        return float(value) == float(expected)
    except (TypeError, ValueError):
        return str(value).lower() == expected.lower()


def travel_data_dir(root) -> str:
    """A DATA_DIR holding DeepPlanning's layout (synthetic) under deepplanning/, as the agent launcher reads it."""
    from opd.agent.travel.world import write_world

    write_world(root / "deepplanning", seed=0, n_tasks=4, languages=("en", "zh"))
    return str(root)


@pytest.mark.parametrize("launcher", ["grpo", "native", "no_kl", "opd", "agent", "eval"])
def test_each_variable_reaches_its_config_key_and_defaults_match_the_readme(
    launcher, tiny_assets, tiny_raw_data, tmp_path
):
    rows = [r for r in readme_rows() if launcher in r["launchers"]]
    base = tiny_launcher_env(
        tiny_assets, tiny_raw_data, tmp_path / "out", TEACHER_MODEL_PATH=str(tiny_assets / "teacher")
    )
    data_dir = str(tiny_raw_data)
    if launcher == "agent":
        base["DATA_DIR"] = data_dir = travel_data_dir(tmp_path / "data")
    for name in TEST_VALUES:  # only the README's defaults: drop the tiny sizes
        base.pop(name, None)
    script = str(REPO / "jobs" / LAUNCHERS[launcher])

    # 1. every documented variable, set to a distinctive value, lands on its documented key(s)
    config, stderr = compose_with_launcher(script, dict(base, PLATFORM="gpu", **TEST_VALUES))
    assert "+ " in stderr and "-m opd.main_" in stderr  # the command is echoed
    for row in rows:
        if row["variable"] in NOT_CONFIG or row["variable"] not in TEST_VALUES:
            continue
        for key in row["keys"]:
            got = OmegaConf.select(config, key)
            want = TEST_VALUES[row["variable"]]
            assert _same(got, want), f"{row['variable']} -> {key}: {got!r} != {want!r}"
    assert config.trainer.n_gpus_per_node == 3
    assert config.trainer.experiment_name.startswith("org_my-model-")  # a model id never nests directories

    # 2. with nothing optional set, the config holds the README's default
    config, _ = compose_with_launcher(script, dict(base, PLATFORM="gpu", N_GPUS_PER_NODE="8"))
    for row in rows:
        match = re.fullmatch(r"(\S+)(?: \((.*)\))?", row["default"])
        if (
            not match
            or row["variable"] in NOT_CONFIG
            or row["default"] == "required"
            or "<" in row["default"]
        ):
            continue
        default = match.group(1)
        for exception in (match.group(2) or "").split(";"):
            if ":" in exception:
                names, value = exception.split(":", 1)
                if launcher in [n.strip() for n in names.split(",")]:
                    default = value.strip()
        if " " in default:
            continue
        for key in row["keys"]:
            assert _same(OmegaConf.select(config, key), default), (
                f"{launcher}: {key} default != README {default}"
            )
    assert config.run.data_dir == data_dir and config.run.model_name == "student"


def test_launchers_run_from_a_copy_as_under_sbatch(tiny_assets, tiny_raw_data, tmp_path):
    """sbatch runs a copy of the script from its spool directory: the repository is found through
    SLURM_SUBMIT_DIR (or OPD_REPO), and without either the error says what to set."""
    copy = tmp_path / "spool" / "slurm_script"
    copy.parent.mkdir()
    shutil.copy(REPO / "jobs" / "train_grpo_native.sh", copy)
    env = tiny_launcher_env(tiny_assets, tiny_raw_data, tmp_path / "out")
    env.pop("OPD_REPO", None)
    config, _ = compose_with_launcher(str(copy), dict(env, SLURM_SUBMIT_DIR=str(REPO)), cwd=tmp_path)
    assert config.actor_rollout_ref.actor.use_kl_loss is True
    lost = subprocess.run(["bash", str(copy)], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert lost.returncode == 2 and "set OPD_REPO=" in lost.stderr


def test_opd_thinking_switch_sets_template_and_validation_temperature(tiny_assets, tiny_raw_data, tmp_path):
    env = tiny_launcher_env(
        tiny_assets, tiny_raw_data, tmp_path / "out", TEACHER_MODEL_PATH=str(tiny_assets / "teacher")
    )
    script = str(REPO / "jobs" / "train_opd.sh")
    off, _ = compose_with_launcher(script, dict(env, ENABLE_THINKING="False"))
    assert off.data.apply_chat_template_kwargs.enable_thinking is False
    assert off.actor_rollout_ref.rollout.val_kwargs.temperature == 0.7
    on, _ = compose_with_launcher(script, dict(env, ENABLE_THINKING="True"))
    assert on.data.apply_chat_template_kwargs.enable_thinking is True
    assert on.actor_rollout_ref.rollout.val_kwargs.temperature == 0.6
    assert on.opd.teacher_path == str(tiny_assets / "teacher")


@pytest.mark.parametrize("launcher", ["grpo", "native", "no_kl"])
def test_each_grpo_launcher_composes_its_recipes_settings(launcher, tiny_assets, tiny_raw_data, tmp_path):
    """The recipe constants each launcher trains with (its behaviour in training: test_grpo_e2e.py)."""
    env = tiny_launcher_env(tiny_assets, tiny_raw_data, tmp_path / "out")
    config, _ = compose_with_launcher(str(REPO / "jobs" / LAUNCHERS[launcher]), env)
    actor = config.actor_rollout_ref.actor
    assert config.reward.custom_reward_function.path == "pkg://opd.rewards.math_reward"
    if launcher == "grpo":
        assert (actor.clip_ratio_low, actor.clip_ratio_high, actor.clip_ratio_c) == (0.2, 0.28, 10.0)
        assert actor.use_dynamic_bsz and actor.ppo_max_token_len_per_gpu == (128 + 24) * 2
        assert config.actor_rollout_ref.ref.log_prob_max_token_len_per_gpu == (128 + 24) * 3
        assert not actor.use_kl_loss
    elif launcher == "native":
        assert actor.use_kl_loss and actor.kl_loss_coef == 0.001 and actor.kl_loss_type == "low_var_kl"
        assert not actor.use_dynamic_bsz
    else:
        assert not actor.use_kl_loss and not actor.use_dynamic_bsz
