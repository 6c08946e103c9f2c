"""Container recipes and container-aware jobs.

Recipes: the Dockerfile lints clean, the Apptainer definition parses, and the pins agree across the
Dockerfile, the definition, the image's lock and the CPU constraints. Jobs: the exec command a run
records (binds, environment allowlist, --nv, digest), checked by running it through a FAKE apptainer
(tests/fake_apptainer: Apptainer cannot be installed here) that records what the container would get and
then runs the command on the host with that environment.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from conftest import REPO
from opd.image import LOCK, LOCK_PYTHON, VARIANTS, canonical, compare, read_pins
from opd.launch import CONFIGS, SubmissionError

DOCKERFILE = REPO / "containers" / "Dockerfile"
DEFINITION = REPO / "containers" / "opd.def"
FAKE_APPTAINER = REPO / "tests" / "fake_apptainer"
CPU_PINS = read_pins(REPO / "constraints" / "cpu.txt")
GPU_PINS = read_pins(LOCK)


def dockerfile_args() -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S*)$", DOCKERFILE.read_text(), flags=re.M))


# --- recipes --------------------------------------------------------------------------------------------


def test_dockerfile_lints_clean_with_hadolint():
    result = subprocess.run(
        [str(Path(sys.executable).parent / "hadolint"), str(DOCKERFILE)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_version_labels_and_base_are_the_locks_pins():
    args = dockerfile_args()
    for arg, value in args.items():
        if arg.endswith("_VERSION") and arg != "FLASH_ATTN_VERSION":
            package = canonical(arg.removesuffix("_VERSION"))
            assert GPU_PINS.get(package, "absent") == value, (
                f"ARG {arg}={value}, {LOCK.name}: {GPU_PINS.get(package)}"
            )
    assert {"torch", "sglang", "verl", "transformers", "tensordict", "ray"} <= {
        canonical(a.removesuffix("_VERSION")) for a in args if a.endswith("_VERSION")
    }
    assert re.fullmatch(r"nvidia/cuda:[\w.-]+@sha256:[0-9a-f]{64}", args["BASE_IMAGE"])  # pinned by digest
    # flash-attn's wheel matches its label, the locked torch (major.minor) and the base image's Python
    torch_minor = ".".join(GPU_PINS["torch"].split(".")[:2])
    wheel = args["FLASH_ATTN_WHEEL"].rsplit("/", 1)[1]
    assert wheel.startswith(f"flash_attn-{args['FLASH_ATTN_VERSION']}+cu12torch{torch_minor}")
    assert f"-cp{LOCK_PYTHON.replace('.', '')}-" in wheel


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_locks_share_one_version_of_every_common_package(variant):
    lock = read_pins(VARIANTS[variant].lock)
    differing = {n: (CPU_PINS[n], lock[n]) for n in set(CPU_PINS) & set(lock) if CPU_PINS[n] != lock[n]}
    assert set(differing) == set(VARIANTS[variant].differs_from_cpu), differing
    for pin in VARIANTS[variant].pins:  # the resolution's starting points hold
        name, version = pin.split("==")
        assert lock[canonical(name)] == version
    assert lock["verl"] == CPU_PINS["verl"] == "0.7.1" and lock["transformers"] == "4.57.1"


def fake_buildah_build(tmp_path, *args: str, **env: str) -> list[str]:
    """``containers/build.sh`` with a FAKE buildah (records its arguments; no image is built): the
    build arguments each variant derives from its lock."""
    fake = tmp_path / "bin" / "buildah"
    fake.parent.mkdir(exist_ok=True)
    fake.write_text('#!/bin/bash\necho "$*" >> "$(dirname "$0")/calls"\n')
    fake.chmod(0o755)
    environment = {**os.environ, "PATH": f"{fake.parent}:{os.environ['PATH']}", "TAG": "t", **env}
    result = subprocess.run(["bash", str(REPO / "containers" / "build.sh"), *args], env=environment,
                            capture_output=True, text=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    [bud] = [line for line in (fake.parent / "calls").read_text().splitlines() if line.startswith("bud ")]
    return bud.split()


@pytest.mark.parametrize(("mode", "rollout", "lock"), [
    ("gpu", "vllm", VARIANTS["vllm"].lock), ("cpu", "", REPO / "constraints" / "cpu.txt"),
])  # fmt: skip
def test_variant_builds_take_their_version_labels_from_their_lock_fake_buildah(tmp_path, mode, rollout, lock):
    bud = fake_buildah_build(tmp_path, mode, ROLLOUT=rollout, OPD_CONTAINER_CACHE=str(tmp_path / "cache"))
    args = dict(bud[i + 1].split("=", 1) for i, a in enumerate(bud) if a == "--build-arg")
    pins = read_pins(lock)
    assert args["CONSTRAINTS"] == str(lock.relative_to(REPO))
    # every argument is one the Dockerfile declares, and the lock reaches the build (context and COPY)
    declared = set(re.findall(r"^ARG (\w+)", DOCKERFILE.read_text(), flags=re.M))
    assert set(args) <= declared, set(args) - declared
    copied = [
        s
        for line in re.findall(r"^COPY (.+)$", DOCKERFILE.read_text(), flags=re.M)
        for s in line.split()[:-1]
    ]
    sent = [line[1:] for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    for sources in (copied, sent):
        assert any(
            args["CONSTRAINTS"] == s or args["CONSTRAINTS"].startswith(s.rstrip("/") + "/") for s in sources
        )
    for package in ("torch", "verl", "transformers", "tensordict", "ray"):
        assert args[f"{package.upper()}_VERSION"] == pins[package]
    assert args["SGLANG_VERSION"] == "absent"
    assert args.get("VLLM_VERSION", "absent") == pins.get("vllm", "absent")


def test_apptainer_definition_parses_and_bootstraps_from_the_image_by_digest():
    from spython.main.parse.parsers import SingularityParser

    recipe = SingularityParser(str(DEFINITION)).recipe["spython-base"]
    assert recipe.fromHeader == "{{ image }}@{{ digest }}"  # spython lower-cases the header
    assert any("python -m opd.image verify" in line for line in recipe.install)  # %test: the lock, pip check
    text = DEFINITION.read_text()
    assert re.search(r"^Bootstrap: docker$", text, flags=re.M)
    published = dict(
        line.split("=", 1) for line in (REPO / "containers" / "published.env").read_text().splitlines()
        if line and not line.startswith("#")
    )  # fmt: skip
    default_image = re.search(r"^%arguments\n\s+IMAGE=(\S+)$", text, flags=re.M).group(1)
    assert default_image == published["IMAGE_NAME"]
    assert published["IMAGE_DIGEST"] == "" or re.fullmatch(r"sha256:[0-9a-f]{64}", published["IMAGE_DIGEST"])


def test_version_check_of_the_build_names_every_mismatch(tmp_path):
    freeze = tmp_path / "freeze.txt"
    freeze.write_text("torch==2.9.1\nverl==0.7.1\nFlash_Attn==2.8.3\n")
    assert compare({"torch": "2.9.1", "flash-attn": "2.8.3", "sglang": "absent"}, read_pins(freeze)) == []
    problems = compare({"torch": "2.9.0", "sglang": "0.5.6", "verl": "absent"}, read_pins(freeze))
    assert problems == [
        "sglang: expected 0.5.6, not installed",
        "torch: expected 2.9.0, installed 2.9.1",
        "verl: expected absent, installed 0.7.1",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "opd.image", "versions", "--freeze", str(freeze), "torch=2.9.0"],
        capture_output=True, text=True,
    )  # fmt: skip
    assert result.returncode == 1 and "torch: expected 2.9.0, installed 2.9.1" in result.stderr


def test_image_verify_on_cpu_passes_here_against_the_cpu_lock_and_fails_on_a_wrong_pin(tmp_path):
    """``make container-verify``'s checks, on this machine's stack (no GPU: --device cpu)."""
    env = {**os.environ, "OPD_IMAGE_CONSTRAINTS": str(REPO / "constraints" / "cpu.txt")}
    result = subprocess.run(
        [sys.executable, "-m", "opd.image", "verify", "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "5/5 checks passed" in result.stdout and "after one step" in result.stdout
    wrong = tmp_path / "lock.txt"
    wrong.write_text("verl==0.6.0\n")
    env["OPD_IMAGE_CONSTRAINTS"] = str(wrong)
    result = subprocess.run(
        [sys.executable, "-m", "opd.image", "verify", "--device", "cpu"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1 and "FAIL lock: 1 packages differ" in result.stdout
    assert "verl: expected 0.6.0, installed 0.7.1" in result.stdout


# --- jobs in the container ------------------------------------------------------------------------------


def login(*overrides: str):
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose(config_name="launch", overrides=list(overrides))


def records(log: Path) -> list[dict]:
    return [
        json.loads(p.read_text()) for p in sorted(log.glob("*.json")) if not p.name.endswith(".pull.json")
    ]


@pytest.fixture
def fake_apptainer(tmp_path, monkeypatch) -> Path:
    """The fake on PATH, an image file, and the image's PATH (this interpreter's bin first)."""
    log = tmp_path / "apptainer_calls"
    monkeypatch.setenv("PATH", f"{FAKE_APPTAINER}:{os.environ['PATH']}")
    monkeypatch.setenv("FAKE_APPTAINER_LOG", str(log))
    monkeypatch.setenv("FAKE_APPTAINER_PATH", f"{Path(sys.executable).parent}:/usr/bin:/bin")
    image = tmp_path / "images" / "opd.sif"
    image.parent.mkdir()
    image.write_bytes(os.urandom(1 << 16))
    monkeypatch.setenv("OPD_IMAGE", str(image))
    return log


def test_run_in_apptainer_records_digest_binds_and_composes_inside_the_image_fake_apptainer(
    fake_apptainer, tiny_assets, tiny_math_data, tmp_path, monkeypatch
):
    from opd.launch.rundir import prepare

    monkeypatch.setenv("DATA_DIR", str(tiny_math_data))
    monkeypatch.setenv("NCCL_DEBUG", "INFO")
    monkeypatch.setenv("MY_SECRET_TOKEN", "do-not-pass")
    image = Path(os.environ["OPD_IMAGE"])
    run_dir = prepare(
        login("experiment=tiny_opd", "container=apptainer"), tmp_path / "run", ["container=apptainer"]
    )

    launch = OmegaConf.to_container(OmegaConf.load(run_dir / "launch.yaml"))
    sha256 = hashlib.sha256(image.read_bytes()).hexdigest()
    assert launch["container"]["digest"] == f"sha256:{sha256}"
    assert (image.parent / "opd.sif.sha256").read_text().split()[0] == sha256  # hashed once, cached
    binds = launch["container"]["binds"]
    # the run dir, the checkout (code: bind), the data and the tiny models the config names
    for path in (run_dir, REPO, tiny_math_data, tiny_assets / "student", tiny_assets / "teacher"):
        assert any(path == Path(b) or Path(b) in path.parents for b in binds), (path, binds)
    assert not any(b in ("/", "/usr", "/etc") for b in binds)

    # the config was composed by the image's python, through the same wrapper, without --nv
    [compose_call] = records(fake_apptainer)
    assert compose_call["command"][:3] == ["python", "-m", "opd.launch.compose"]
    assert "--cleanenv" in compose_call["options"] and "--nv" not in compose_call["options"]
    assert compose_call["image"] == str(image) and set(compose_call["binds"]) <= set(binds)
    inside = compose_call["env"]
    assert inside["DATA_DIR"] == str(tiny_math_data) and inside["NCCL_DEBUG"] == "INFO"
    assert inside["HF_HUB_OFFLINE"] == "1" and inside["PYTHONPATH"] == str(REPO / "src")
    assert inside["OPD_CONTAINER_DIGEST"] == f"sha256:{sha256}" and "MY_SECRET_TOKEN" not in inside
    assert OmegaConf.load(run_dir / "config.yaml").data.train_files.startswith(str(tiny_math_data))

    # each node's command in rerun.sbatch: srun ... container_exec.sh apptainer IMAGE --option --nv ...
    srun = next(
        line for line in (run_dir / "rerun.sbatch").read_text().splitlines() if line.startswith("exec srun ")
    )
    stat = image.stat()
    verify = f"--verify {stat.st_size}:{int(stat.st_mtime)}:{sha256}"
    assert f"jobs/container_exec.sh apptainer {image} {verify} --option --nv --option --cleanenv" in srun
    assert srun.endswith(f"-- python -m opd.launch.node {run_dir}")
    assert "--pass 'SLURM_*'" in srun and "--pass 'NCCL_*'" in srun and "--pass DATA_DIR" in srun


def test_container_exec_passes_per_task_scheduler_gpu_and_allowlisted_variables_only_fake_apptainer(
    fake_apptainer, tmp_path
):
    env = {
        **os.environ,
        "SLURM_PROCID": "1",
        "SLURM_JOB_ID": "42",
        "SLURMD_NODENAME": "node2",
        "CUDA_VISIBLE_DEVICES": "2,3",
        "NCCL_SOCKET_IFNAME": "ib0",
        "DATA_DIR": "/data/math",
        "MY_SECRET_TOKEN": "do-not-pass",
        "FAKE_APPTAINER_SKIP": "true",
    }
    command = [
        "bash", str(REPO / "jobs" / "container_exec.sh"), "apptainer", os.environ["OPD_IMAGE"],
        "--option", "--nv", "--option", "--cleanenv", "--bind", str(tmp_path), "--bind", str(REPO),
        "--pass", "SLURM_*", "--pass", "SLURMD_*", "--pass", "CUDA_VISIBLE_DEVICES", "--pass", "NCCL_*",
        "--pass", "DATA_DIR", "--set", "HF_HUB_OFFLINE=1", "--", "true", "--flag",
    ]  # fmt: skip
    assert subprocess.run(command, env=env).returncode == 0
    [call] = records(fake_apptainer)
    assert call["options"] == ["--nv", "--cleanenv"] and call["binds"] == [str(tmp_path), str(REPO)]
    assert call["command"] == ["true", "--flag"]
    passed = {k: v for k, v in call["env"].items() if k not in ("HOME", "PATH")}
    assert passed == {
        "SLURM_PROCID": "1", "SLURM_JOB_ID": "42", "SLURMD_NODENAME": "node2", "CUDA_VISIBLE_DEVICES": "2,3",
        "NCCL_SOCKET_IFNAME": "ib0", "DATA_DIR": "/data/math", "HF_HUB_OFFLINE": "1",
    }  # fmt: skip


def test_missing_apptainer_is_refused_at_submission_not_in_the_job(tiny_math_data, tmp_path, monkeypatch):
    from opd.launch.rundir import prepare

    monkeypatch.setenv("PATH", str(Path(sys.executable).parent) + ":/usr/bin:/bin")  # no apptainer here
    monkeypatch.setenv("DATA_DIR", str(tiny_math_data))
    monkeypatch.setenv("OPD_IMAGE", "docker://ghcr.io/opd-project/opd@sha256:" + "a" * 64)
    with pytest.raises(
        SubmissionError, match=r"needs the `apptainer` executable.*module load apptainer.*container=none"
    ):
        prepare(login("experiment=tiny_grpo", "container=apptainer"), tmp_path / "run", [])
    assert (
        not (tmp_path / "run" / "rerun.sbatch").exists() and not (tmp_path / "run" / "config.yaml").exists()
    )


@pytest.mark.parametrize(
    ("image", "error"),
    [
        ("docker://ghcr.io/opd-project/opd:latest", r"not pinned: use docker://<name>@sha256"),
        ("/nowhere/opd.sif", r"/nowhere/opd.sif does not exist.*make container-pull"),
        (None, r"names no image: export OPD_IMAGE="),
    ],
)
def test_unpinned_or_missing_image_is_refused_with_the_fix_fake_apptainer(
    fake_apptainer, tiny_math_data, tmp_path, monkeypatch, image, error
):
    from opd.launch.rundir import prepare

    monkeypatch.setenv("DATA_DIR", str(tiny_math_data))
    if image is None:
        monkeypatch.delenv("OPD_IMAGE")
    else:
        monkeypatch.setenv("OPD_IMAGE", image)
    with pytest.raises(SubmissionError, match=error):
        prepare(login("experiment=tiny_grpo", "container=apptainer"), tmp_path / "run", [])
    assert records(fake_apptainer) == []  # refused before anything ran in the image


def test_pinned_docker_reference_and_a_pulled_sifs_source_are_recorded_by_digest():
    from opd.launch.container import image_digest, pulled_from

    digest = "sha256:" + "0123456789abcdef" * 4
    assert image_digest(f"docker://ghcr.io/opd-project/opd@{digest}") == digest
    assert (
        pulled_from(f"/shared/sif/opd-{digest.removeprefix('sha256:')}.sif") == digest
    )  # make container-pull
    assert pulled_from("/shared/sif/mine.sif") is None


def test_node_started_outside_the_container_enters_it_like_rerun_sbatch_fake_apptainer(
    fake_apptainer, tmp_path, monkeypatch
):
    """The submitit launcher's task calls opd.launch.node.run in the submitting Python: it must run the
    node inside the image, by the same command as rerun.sbatch's srun line."""
    from opd.launch import node, rundir

    launch = {
        "container": {
            "runtime": "apptainer", "image": os.environ["OPD_IMAGE"], "options": ["--nv", "--cleanenv"],
            "binds": [str(tmp_path)], "pass": ["SLURM_*"], "set": {}, "python": "python", "digest": "sha256:x",
        },
        "env_allowlist": [],
        "python": sys.executable,
    }  # fmt: skip
    OmegaConf.save(OmegaConf.create(launch), tmp_path / "launch.yaml")
    monkeypatch.setenv("FAKE_APPTAINER_SKIP", "opd.launch.node")
    monkeypatch.setenv("SLURM_PROCID", "0")
    assert node.run(tmp_path) == 0
    [call] = records(fake_apptainer)
    assert call["command"] == ["python", "-m", "opd.launch.node", str(tmp_path)]
    assert call["env"]["SLURM_PROCID"] == "0" and call["env"]["OPD_CONTAINER_DIGEST"] == "sha256:x"
    command = rundir.node_command(launch, tmp_path)
    assert command[command.index("--") + 1 :] == call["command"]


def test_a_docker_image_is_converted_once_at_submission_to_a_sif_named_by_its_digest_fake_apptainer(
    fake_apptainer, tiny_math_data, tmp_path, monkeypatch
):
    from opd.launch.rundir import prepare

    digest = "sha256:" + "b" * 64
    monkeypatch.setenv("DATA_DIR", str(tiny_math_data))
    monkeypatch.setenv("OPD_IMAGE", f"docker://ghcr.io/opd-project/opd@{digest}")
    with pytest.raises(SubmissionError, match=r"set SIF_DIR to a directory the nodes share"):
        prepare(login("experiment=tiny_grpo", "container=apptainer"), tmp_path / "refused", [])
    monkeypatch.setenv("SIF_DIR", str(tmp_path / "sif"))
    sif = tmp_path / "sif" / f"opd-{'b' * 64}.sif"
    for name in ("a", "b"):  # two runs (or sweep points) of the same image: one conversion
        run_dir = prepare(login("experiment=tiny_grpo", "container=apptainer"), tmp_path / name, [])
        container = OmegaConf.to_container(OmegaConf.load(run_dir / "launch.yaml"))["container"]
        assert container["image"] == str(sif) and container["pulled_from"] == digest
        assert container["digest"] == "sha256:" + hashlib.sha256(sif.read_bytes()).hexdigest()
        assert (
            str(sif) in (run_dir / "rerun.sbatch").read_text()
            and "docker://" not in (run_dir / "rerun.sbatch").read_text()
        )
    pulls = [json.loads(p.read_text())["pull"] for p in fake_apptainer.glob("*.pull.json")]
    assert pulls == [[str(sif) + ".partial", f"docker://ghcr.io/opd-project/opd@{digest}"]]


def test_the_job_refuses_an_image_file_changed_since_submission_fake_apptainer(fake_apptainer, tmp_path):
    image = Path(os.environ["OPD_IMAGE"])
    stat = image.stat()
    verify = f"{stat.st_size}:{int(stat.st_mtime)}:{hashlib.sha256(image.read_bytes()).hexdigest()}"

    def run():
        command = ["bash", str(REPO / "jobs" / "container_exec.sh"), "apptainer", str(image), "--verify", verify,
                   "--", "true"]  # fmt: skip
        return subprocess.run(command, capture_output=True, text=True, env={**os.environ})

    assert run().returncode == 0
    os.utime(image, (stat.st_atime, stat.st_mtime + 100))  # touched, same content: hashed again, accepted
    assert run().returncode == 0
    image.write_bytes(os.urandom(1 << 16))  # another image under the recorded name, written later
    os.utime(image, (stat.st_atime, stat.st_mtime + 200))  # (within the same second, size:mtime could match)
    result = run()
    assert result.returncode == 3 and "changed since submission" in result.stderr, result.stderr


def test_binds_include_the_real_paths_behind_a_hugging_face_snapshots_symlinks(tmp_path):
    from opd.launch.container import bind_list

    hub = tmp_path / "hub" / "models--org--name"
    (hub / "blobs").mkdir(parents=True)
    (hub / "blobs" / "abc").write_text("{}")
    snapshot = hub / "snapshots" / "rev"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").symlink_to("../../blobs/abc")
    linked = tmp_path / "models" / "student"  # a model directory that is itself a link
    linked.parent.mkdir()
    linked.symlink_to(snapshot)
    binds = bind_list([linked])
    assert str(linked) in binds and str(snapshot) in binds and str(hub / "blobs") in binds
