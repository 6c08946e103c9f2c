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

from conftest import REPO, compose_verl_config
from opd.launch import CONFIGS, sbatch
from opd.launch.compose import entry_module
from opd.launch.overrides import value as override_value
from opd.launch.ray_cluster import BAND_SIZE, ClusterError, PortLayout, ray_start_command
from opd.launch.rundir import login_values, verl_overrides
from opd.launch.sweep import hydra_arguments
from opd.tiny import default_dir
from opd.tiny.agent_build import default_agent_dir

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
    full = {"grpo", "grpo_native", "grpo_native_no_kl", "opd", "opd_agent", "eval"}
    assert full | {f"tiny_{name}" for name in full} <= set(EXPERIMENTS)
    for name in full:
        assert login(f"experiment=tiny_{name}").resources.platform == "cpu"
        assert login(f"experiment={name}").resources.platform == "gpu"


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_experiment_composes_on_both_sides_with_resources_stated_once(experiment, model_env, tmp_path):
    cfg = login(f"experiment={experiment}", "resources=gpu_2x8")
    overrides = verl_overrides(cfg, tmp_path)
    verl = compose_verl_config(overrides, entry_module(cfg.experiment.entry).CONFIG_NAME)
    # one statement of the resources reaches verl and the scheduler request (both submission paths)
    assert verl.trainer.nnodes == cfg.resources.nodes == 2
    assert verl.trainer.n_gpus_per_node == cfg.resources.gpus_per_node == 8
    options = sbatch.option_lines(
        sbatch.request({k: login_values(cfg, k) for k in ("experiment", "resources", "cluster")})
    )
    assert "#SBATCH --nodes=2" in options and "#SBATCH --gpus-per-node=8" in options
    assert verl.trainer.default_local_dir == str(tmp_path)
    tiny = default_agent_dir() if "agent" in experiment else default_dir()
    # the teacher answers in the rollouts stage (the tiny one has its own; the full one reads MODEL_PATH)
    tiny_model = "teacher" if experiment == "tiny_teacher_rollouts" else "student"
    expected_model = "/models/student" if not experiment.startswith("tiny_") else str(tiny / tiny_model)
    assert verl.actor_rollout_ref.model.path == expected_model


@pytest.mark.parametrize("sweep", SWEEPS)
def test_sweep_points_compose_for_their_experiment(sweep, model_env, tmp_path):
    experiment = {
        "opd_loss_x_beta": "opd",
        "tiny_opd": "tiny_opd",
        "tiny_grpo": "tiny_grpo",
        "tip_rules": "tiny_opd_tip",
        "paced": "tiny_opd_paced",
        "agent_turns": "opd_agent",
        "tiny_agent": "tiny_opd_agent",
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
    assert _parsed(override_value(value)) == value


def test_verl_arguments_are_added_to_the_login_configs_verl_node():
    assert hydra_arguments(["verl.opd.loss_type=jsd,forward_kl", "cluster=ci", "++verl.x=1"]) == [
        "++verl.opd.loss_type=jsd,forward_kl",
        "cluster=ci",
        "++verl.x=1",
    ]


def _all_ports(ports: dict) -> set[int]:
    fixed = {p for name, p in ports.items() if not name.endswith("worker-port")}
    return fixed | set(range(ports["min-worker-port"], ports["max-worker-port"] + 1))


@pytest.mark.parametrize(
    "ephemeral,configured,expected_range",
    [
        ((32768, 60999), None, (10000, 32768)),  # Linux's default: below the range
        ((9000, 65535), None, (2048, 9000)),  # a floor of 9,000 and no room above: from 2,048 up to it
        ((9000, 60999), None, (61000, 65536)),  # a floor of 9,000 with room above the range
        ((32768, 60999), [20000, 24096], (20000, 24096)),  # the site's range, whatever the host's
    ],
)
def test_port_bands_of_neighbouring_jobs_and_nodes_are_disjoint_and_outside_the_ephemeral_range(
    ephemeral, configured, expected_range
):
    layout = PortLayout.from_config(configured, ephemeral=ephemeral)
    assert (layout.low, layout.high) == expected_range and layout.bands >= 1
    jobs = [layout.slot_ports(job, node) for job in (1000, 1001, 1002) for node in (0, 1)]
    sets = [_all_ports(p) for p in jobs]
    for i, a in enumerate(sets):
        assert expected_range[0] <= min(a) and max(a) < expected_range[1]
        if configured is None:
            assert max(a) < ephemeral[0] or min(a) > ephemeral[1]
        for b in sets[i + 1 :]:
            if layout.bands >= 3:
                assert not a & b
    assert layout.slot_ports(7, 0) == layout.slot_ports(7, 0)  # from the job id: every node computes the same


@pytest.mark.parametrize("configured", [[30000, 30100], [70000, 80000], [5000], "10000-20000"])
def test_a_port_range_without_room_for_a_band_is_refused_with_the_fix(configured):
    with pytest.raises(ClusterError, match=r"ray_ports"):
        PortLayout.from_config(configured)


def test_an_ephemeral_range_that_leaves_no_band_is_refused_naming_the_setting():
    with pytest.raises(ClusterError, match=r"set cluster.ray_ports"):
        PortLayout.from_config(None, ephemeral=(2100, 65535))


def test_a_busy_port_moves_the_job_to_the_next_free_band():
    job = 4321
    layout = PortLayout.from_config(None)
    first = layout.slot_ports(job, 0)
    with socket.socket() as busy:
        busy.bind(("", first["port"]))
        busy.listen()
        chosen = layout.free_ports(job, 0, head=True)
    assert chosen["port"] != first["port"] and (chosen["port"] - first["port"]) % BAND_SIZE == 0


def test_ray_start_pins_every_port_and_joins_by_explicit_address():
    ports = PortLayout.from_config(None).slot_ports(55, 1)
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

    # paths relative to where the user stands (a variable, an override) are absolute in the run directory
    monkeypatch.chdir(tiny_math_data.parent)
    monkeypatch.setenv("DATA_DIR", tiny_math_data.name)
    monkeypatch.setenv("WANDB_PROJECT", "it's quoted")
    val = f"{tiny_math_data.name}/grpo_processed/val_aime24.parquet"
    overrides = [
        "experiment=tiny_opd",
        "cluster=example_site",
        "++verl.opd.loss_type=jsd",
        f"++verl.data.val_files=[{val}]",
    ]
    run_dir = prepare(login(*overrides), tmp_path / "run", overrides)
    text = (run_dir / "config.yaml").read_text()
    assert "${" not in text
    config = OmegaConf.create(text)
    assert config.opd.loss_type == "jsd" and config.trainer.default_local_dir == str(run_dir)
    assert config.opd.teacher_path == str(tiny_assets / "teacher")  # resolved by the entry's own checks
    assert config.data.train_files == str(tiny_math_data / "grpo_processed" / "train.parquet")
    assert list(config.data.val_files) == [str(tiny_math_data / "grpo_processed" / "val_aime24.parquet")]
    script = (run_dir / "rerun.sbatch").read_text()
    for line in ("--nodes=1", "--cpus-per-task=2", "--mem=6G", "--partition=gpu", "--account=my_project",
                 "--qos=normal", "--exclusive", "--requeue", "--signal=USR2@300"):  # fmt: skip
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
    # the job imports the code as submitted: its snapshot, first on PYTHONPATH; git.txt names its commit
    assert (run_dir / "code" / "src" / "opd" / "launch" / "node.py").is_file()
    assert (run_dir / "code" / "jobs").is_dir() and (run_dir / "code" / "configs" / "launch.yaml").is_file()
    assert not list((run_dir / "code").rglob("__pycache__"))
    assert f'export PYTHONPATH="{run_dir}/code/src${{PYTHONPATH:+:$PYTHONPATH}}"' in script
    assert (run_dir / "git.txt").read_text().startswith("commit ")
    launch = OmegaConf.load(run_dir / "launch.yaml")
    assert launch.experiment.entry == "opd.main_opd" and launch.resources.nodes == 1


def test_node_address_from_an_interface_the_hostname_or_rays_choice():
    from opd.launch.ray_cluster import node_address

    assert node_address(None) is None  # Ray's own choice
    assert node_address("lo") == "127.0.0.1"
    assert node_address("hostname") == socket.gethostbyname(socket.gethostname())
    with pytest.raises(ClusterError, match=r"network_interface=no_such_nic: .* its interfaces: .*\blo\b"):
        node_address("no_such_nic")
    command = ray_start_command(
        "ray", PortLayout.from_config(None).slot_ports(1, 0), "/tmp/x", None, {}, "10.1.2.3"
    )
    assert "--node-ip-address=10.1.2.3" in command


def _submitit_script(params: dict, folder: Path) -> str:
    """The sbatch file submitit would submit with these executor parameters (nothing is submitted)."""
    import submitit

    executor = submitit.SlurmExecutor(folder=folder)
    executor.update_parameters(**params)
    return executor._make_submission_file_text("python -m task", "uid")


def test_sweep_points_are_submitted_per_resource_set_with_the_request_setup_and_srun_of_their_rerun_sbatch(
    tiny_assets, tiny_math_data, tmp_path, monkeypatch
):
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from opd.launch.rundir import prepare

    monkeypatch.setenv("DATA_DIR", str(tiny_math_data))
    run_dirs = []
    for n, resources in enumerate(["cpu_tiny", "cpu_tiny_2node", "cpu_tiny"]):
        overrides = ["experiment=tiny_grpo", f"resources={resources}", "cluster=example_site"]
        run_dirs.append(prepare(login(*overrides), tmp_path / str(n), overrides, code=tmp_path / "code"))
    plugin = instantiate(OmegaConf.to_container(login("hydra/launcher=slurm").hydra.launcher, resolve=True))
    arrays = plugin.arrays(run_dirs)
    assert sorted(indices for indices, _ in arrays) == [[0, 2], [1]]  # one array per resource set
    for indices, params in arrays:
        script = _submitit_script(params, tmp_path / "submitit")
        rerun = (run_dirs[indices[0]] / "rerun.sbatch").read_text()
        requested = {line for line in rerun.splitlines() if line.startswith("#SBATCH")}
        requested -= {line for line in requested if "--output=" in line or "--open-mode" in line}
        submitted = {line.replace("'", "") for line in script.splitlines() if line.startswith("#SBATCH")}
        assert requested <= submitted, requested - submitted
        nodes = 2 if indices == [1] else 1
        assert f"#SBATCH --nodes={nodes}" in requested and "#SBATCH --signal=USR2@300" in requested
        # nothing of submitit's own request is left: no second time limit, no forced wckey
        assert not any("wckey" in line for line in script.splitlines())
        assert sum(line.startswith("#SBATCH --time") for line in script.splitlines()) == 1
        for text in (script, rerun):
            srun = next(line for line in text.splitlines() if "srun" in line and not line.startswith("#"))
            assert "--cpus-per-task=2" in srun and "--kill-on-bad-exit=1" in srun, srun
            assert sbatch.RAISE_OPEN_FILES in text and sbatch.SRUN_CPUS in text and "module purge" in text


def test_local_launcher_instantiates_from_resources():
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = login("experiment=tiny_grpo", "resources=cpu_tiny_2node", "hydra/launcher=local")
    plugin = instantiate(OmegaConf.to_container(cfg.hydra.launcher, resolve=True))
    assert plugin.point_parameters(Path("unused"))["timeout_min"] == 60


def test_sweep_directory_of_a_command_line_sweep_ignores_the_swept_values():
    from opd.launch.sweep import sweep_dir

    directory = sweep_dir(
        ["experiment=tiny_grpo", "resources=cpu_tiny,cpu_tiny_2node", "++verl.data.seed=1,2"]
    )
    assert directory.parent.name == "tiny_grpo"


def test_gpu_setup_builds_from_the_gpu_lock_and_names_the_wheels_pinned_by_url():
    from opd.image import url_wheels

    wheels = url_wheels()
    assert list(wheels) == ["flash_attn"] and wheels["flash_attn"].startswith("https://")
    dry = subprocess.run(
        ["make", "-n", "setup", "ENV=gpu", "DRY_RUN=1"], cwd=REPO, capture_output=True, text=True
    )
    assert "opd.image gpu-env --venv .venv-gpu --variant sglang" in dry.stdout and "--dry-run" in dry.stdout
    assert "touch" not in dry.stdout  # a dry run marks nothing as set up
    real = subprocess.run(
        ["make", "-n", "setup", "ENV=gpu", "VENV=/shared/opd-gpu"], cwd=REPO, capture_output=True, text=True
    )
    assert "--venv /shared/opd-gpu" in real.stdout and "touch /shared/opd-gpu/.opd-gpu-env" in real.stdout
