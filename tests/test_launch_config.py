"""The login side without a cluster: every experiment and sweep composes (login and verl side),
resources flow to the scheduler and to verl from one place, overrides survive Hydra's grammar, and the
per-job Ray port bands never overlap."""

from __future__ import annotations

import socket
import subprocess
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser

from conftest import compose_verl_config
from opd.launch import CONFIGS
from opd.launch.compose import entry_module
from opd.launch.ray_cluster import BAND_SIZE, ephemeral_low, free_ports, ray_start_command, slot_ports
from opd.launch.rundir import _value, login_values, sbatch_options, verl_overrides
from opd.launch.sweep import hydra_arguments
from opd.tiny import default_dir

EXPERIMENTS = sorted(p.stem for p in (Path(CONFIGS) / "experiment").glob("*.yaml"))
SWEEPS = sorted(p.stem for p in (Path(CONFIGS) / "sweep").glob("*.yaml"))


def login(*overrides: str):
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose(config_name="launch", overrides=list(overrides), return_hydra_config=True)


@pytest.fixture
def model_env(monkeypatch):
    monkeypatch.setenv("MODEL_PATH", "/models/student")
    monkeypatch.setenv("TEACHER_MODEL_PATH", "/models/teacher")


def test_every_seed_experiment_has_a_tiny_cpu_variant():
    full = {"grpo", "grpo_native", "grpo_native_no_kl", "opd", "eval"}
    assert full | {f"tiny_{name}" for name in full} <= set(EXPERIMENTS)
    for name in full:
        assert login(f"experiment=tiny_{name}").resources.platform == "cpu"
        assert login(f"experiment={name}").resources.platform == "gpu"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_on_both_sides_with_resources_stated_once(experiment, model_env, tmp_path):
    cfg = login(f"experiment={experiment}", "resources=gpu_2x8")
    overrides = verl_overrides(cfg, tmp_path)
    verl = compose_verl_config(overrides, entry_module(cfg.experiment.entry).CONFIG_NAME)
    # one statement of the resources reaches verl, sbatch and the submitit launcher alike
    assert verl.trainer.nnodes == cfg.resources.nodes == cfg.hydra.launcher.nodes == 2
    assert (
        verl.trainer.n_gpus_per_node == cfg.resources.gpus_per_node == cfg.hydra.launcher.gpus_per_node == 8
    )
    options = sbatch_options(
        {k: login_values(cfg, k) for k in ("experiment", "resources", "cluster")}, tmp_path
    )
    assert "#SBATCH --nodes=2" in options and "#SBATCH --gpus-per-node=8" in options
    assert verl.trainer.default_local_dir == str(tmp_path)
    expected_model = (
        "/models/student" if not experiment.startswith("tiny_") else str(default_dir() / "student")
    )
    assert verl.actor_rollout_ref.model.path == expected_model


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_points_compose_for_their_experiment(sweep, model_env, tmp_path):
    experiment = {
        "opd_loss_x_beta": "opd",
        "tiny_opd": "tiny_opd",
        "tiny_grpo": "tiny_grpo",
        "tip_rules": "tiny_opd_tip",
        "paced": "tiny_opd_paced",
    }.get(sweep, "grpo")
    cfg = login(f"experiment={experiment}", f"sweep={sweep}")
    params = cfg.hydra.sweeper.params or {}
    assert sweep == "none" or params, "a sweep file must vary something"
    # every value of every swept key composes on the verl side (the first values of the other keys)
    for key, values in params.items():
        for value in str(values).split(","):
            point = login(f"experiment={experiment}", f"{key}={value}")
            verl = compose_verl_config(
                verl_overrides(point, tmp_path), entry_module(point.experiment.entry).CONFIG_NAME
            )
            if key.startswith("++verl."):
                assert str(verl_select(verl, key.removeprefix("++verl."))) == str(_parsed(value))
                continue
            # a config group (e.g. token_selection): its file's verl values reach the verl side
            from omegaconf import OmegaConf

            group = OmegaConf.to_container(OmegaConf.load(Path(CONFIGS) / key / f"{value}.yaml"))
            for dotted, expected in _leaves(group["verl"]):
                assert str(verl_select(verl, dotted)) == str(expected), (key, value, dotted)


def _leaves(tree: dict, prefix: str = ""):
    for name, value in tree.items():
        if isinstance(value, dict):
            yield from _leaves(value, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", value


def verl_select(config, dotted: str):
    from omegaconf import OmegaConf

    return OmegaConf.select(config, dotted)


def _parsed(value: str):
    return OverridesParser.create().parse_overrides([f"x={value}"])[0].value()


@pytest.mark.parametrize(
    "value",
    [
        "plain",
        "/a/path-with.dots",
        "with space",
        "a,comma",
        "quote'inside",
        "back\\slash",
        "end\\",
        "a\\'b",
        "null",
        3,
        1e-06,
        True,
        None,
    ],
)
def test_override_values_survive_hydras_grammar(value):
    assert _parsed(_value(value)) == value


def test_verl_arguments_are_added_to_the_login_configs_verl_node():
    assert hydra_arguments(["verl.opd.loss_type=jsd,forward_kl", "cluster=ci", "++verl.x=1"]) == [
        "++verl.opd.loss_type=jsd,forward_kl",
        "cluster=ci",
        "++verl.x=1",
    ]


def _all_ports(ports: dict) -> set[int]:
    fixed = {p for name, p in ports.items() if not name.endswith("worker-port")}
    return fixed | set(range(ports["min-worker-port"], ports["max-worker-port"] + 1))


def test_port_bands_of_neighbouring_jobs_and_nodes_are_disjoint_and_below_the_ephemeral_range():
    jobs = [slot_ports(job, node) for job in (1000, 1001, 1002) for node in (0, 1)]
    sets = [_all_ports(p) for p in jobs]
    for i, a in enumerate(sets):
        assert max(a) < ephemeral_low() and min(a) >= 10000
        for b in sets[i + 1 :]:
            assert not a & b
    assert slot_ports(7, 0) == slot_ports(7, 0)  # derived from the job id: every node computes the same


def test_a_busy_port_moves_the_job_to_the_next_free_band():
    job = 4321
    first = slot_ports(job, 0)
    with socket.socket() as busy:
        busy.bind(("", first["port"]))
        busy.listen()
        chosen = free_ports(job, 0, head=True)
    assert chosen["port"] != first["port"] and (chosen["port"] - first["port"]) % BAND_SIZE == 0


def test_ray_start_pins_every_port_and_joins_by_explicit_address():
    ports = slot_ports(55, 1)
    head = ray_start_command("ray", ports, "/tmp/opd-55.0.0", None, {"num_cpus": 4})
    worker = ray_start_command("ray", ports, "/tmp/opd-55.0.1", "10.0.0.1:20000", {})
    assert "--head" in head and "--include-dashboard=false" in head and f"--port={ports['port']}" in head
    assert f"--dashboard-port={ports['dashboard-port']}" in head  # the minimal dashboard still binds one
    assert "--address=10.0.0.1:20000" in worker and not any(a.startswith("--port=") for a in worker)
    for option in ("node-manager-port", "object-manager-port", "min-worker-port", "max-worker-port"):
        assert f"--{option}={ports[option]}" in worker


def test_login_side_modules_import_neither_torch_nor_verl_nor_ray():
    import subprocess
    import sys

    code = (
        "import sys, opd.launch.sweep, opd.launch.submit, opd.launch.status, opd.launch.rundir, "
        "opd.launch.node, opd.launch.local_slurm, opd.launch.container, opd.image, "
        "hydra_plugins.opd_launcher.launcher; "
        "print(sorted(m for m in ('torch', 'verl', 'ray') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_run_directory_holds_resolved_config_record_and_rerun_script(
    tiny_assets, tiny_math_data, tmp_path, monkeypatch
):
    from omegaconf import OmegaConf

    from opd.launch.rundir import prepare

    monkeypatch.setenv("DATA_DIR", str(tiny_math_data))
    monkeypatch.setenv("WANDB_PROJECT", "it's quoted")
    cfg = login("experiment=tiny_opd", "cluster=example_site", "++verl.opd.loss_type=jsd")
    run_dir = prepare(cfg, tmp_path / "run", ["experiment=tiny_opd", "++verl.opd.loss_type=jsd"])
    text = (run_dir / "config.yaml").read_text()
    assert "${" not in text
    config = OmegaConf.create(text)
    assert config.opd.loss_type == "jsd" and config.trainer.default_local_dir == str(run_dir)
    assert config.opd.teacher_path == str(tiny_assets / "teacher")  # resolved by the entry's own checks
    assert config.data.train_files == str(tiny_math_data / "grpo_processed" / "train.parquet")
    script = (run_dir / "rerun.sbatch").read_text()
    for line in ("--nodes=1", "--cpus-per-task=2", "--mem=6G", "--partition=gpu", "--account=my_project",
                 "--qos=normal", "--exclusive", "--requeue", "--signal=B:USR2@300"):  # fmt: skip
        assert f"#SBATCH {line}\n" in script
    assert "module purge\n" in script
    assert subprocess.run(["bash", "-n", str(run_dir / "rerun.sbatch")]).returncode == 0  # valid shell
    assert f"-m opd.launch.node {run_dir}" in script and "--kill-on-bad-exit=1" in script
    environment = (run_dir / "environment.sh").read_text()
    assert f"export DATA_DIR={tiny_math_data}" in environment
    assert "export WANDB_PROJECT='it'\"'\"'s quoted'" in environment
    assert "++verl.opd.loss_type=jsd" in (run_dir / "overrides.txt").read_text()
    assert "opd.loss_type=jsd" in (run_dir / "overrides.txt").read_text()
    assert (run_dir / "logs").is_dir()  # sbatch --output needs it before the job starts
    launch = OmegaConf.load(run_dir / "launch.yaml")
    assert launch.experiment.entry == "opd.main_opd" and launch.resources.nodes == 1


@pytest.mark.parametrize("launcher", ["slurm", "local"])
def test_launchers_instantiate_from_resources_and_cluster(launcher):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = login(
        "experiment=tiny_grpo",
        "resources=cpu_tiny_2node",
        "cluster=example_site",
        f"hydra/launcher={launcher}",
    )
    plugin = instantiate(OmegaConf.to_container(cfg.hydra.launcher, resolve=True))
    params = plugin.executor_parameters()
    if launcher == "slurm":
        assert type(plugin).__module__ == "hydra_plugins.opd_launcher.launcher"
        assert (
            params["nodes"] == 2 and params["cpus_per_task"] == 2 and params["slurm_account"] == "my_project"
        )
        assert params["slurm_srun_args"] == ["--kill-on-bad-exit=1"]
        assert params["slurm_additional_parameters"] == {"requeue": True, "exclusive": True}
        assert params["slurm_signal_delay_s"] == 300
    else:
        assert params["nodes"] == 1 and "slurm_srun_args" not in params
