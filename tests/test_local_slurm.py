"""``opd.launch.local_slurm``: a real single-host SLURM cluster that runs jobs and records them in sacct.

The cluster tests start their own cluster in a temporary state directory, on ports away from a
developer's ``~/.cache/opd/slurm`` one, and stop it at the end of the module (a few seconds each way).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from opd.launch import local_slurm

TEST_PORT_BASE = "17800"  # not the default 16800: a laptop cluster may be up while tests run


def test_state_dir_from_argument_then_env_then_home(monkeypatch, tmp_path):
    monkeypatch.setenv("OPD_SLURM_DIR", str(tmp_path / "from-env"))
    assert local_slurm.conf_path(tmp_path / "arg") == tmp_path / "arg" / "slurm.conf"
    assert local_slurm.conf_path() == tmp_path / "from-env" / "slurm.conf"
    monkeypatch.delenv("OPD_SLURM_DIR")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert local_slurm.conf_path() == tmp_path / "home" / ".cache" / "opd" / "slurm" / "slurm.conf"


def test_up_refuses_non_root_with_a_reason(monkeypatch, tmp_path):
    monkeypatch.setattr(os, "geteuid", lambda: 1000)
    with pytest.raises(local_slurm.LocalSlurmError, match="must run as root"):
        local_slurm.up(tmp_path)
    assert not (tmp_path / "slurm.conf").exists()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    if os.geteuid() != 0 or not shutil.which("slurmctld", path=os.environ.get("PATH", "") + ":/usr/sbin"):
        pytest.skip("needs root and the SLURM/munge/MariaDB packages")
    state = tmp_path_factory.mktemp("slurm")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPD_SLURM_PORT_BASE", TEST_PORT_BASE)
        try:
            yield local_slurm.up(state), state
        finally:
            local_slurm.down(state)


def client_env(info) -> dict[str, str]:
    return {**os.environ, "SLURM_CONF": info["slurm_conf"]}


@pytest.mark.slurm
def test_up_is_idempotent_and_status_reports_it(cluster):
    first, state = cluster
    assert first["nodes"] == ["node1", "node2"]
    again = local_slurm.up(state)
    assert again["started"] == []
    assert again["pids"] == first["pids"] and all(first["pids"].values())
    st = local_slurm.status(state)
    assert st["up"] and st["daemons"] == first["pids"]
    assert st["nodes"] == {"node1": "idle", "node2": "idle"}


@pytest.mark.slurm
def test_sbatch_wrap_job_completes_and_is_accounted(cluster, tmp_path):
    info, _ = cluster
    env = client_env(info)
    out = tmp_path / "job.out"
    job_id = subprocess.run(
        ["sbatch", "--parsable", "-N2", "-o", str(out), "--wrap", "srun hostname; echo done"],
        env=env, cwd=tmp_path, capture_output=True, text=True, check=True,
    ).stdout.strip().split(";")[0]  # fmt: skip
    deadline = time.monotonic() + 60
    state = ""
    while state != "COMPLETED" and time.monotonic() < deadline:
        state = subprocess.run(
            ["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "State"], env=env, capture_output=True, text=True
        ).stdout.strip()
        time.sleep(0.5)
    assert state == "COMPLETED"
    assert out.read_text().splitlines()[-1] == "done"


@pytest.mark.slurm
def test_up_through_a_pipe_restarts_only_the_missing_daemon(cluster):
    """A restarted daemon must not hold the caller's pipe open (``up | tee`` or a CI step would hang)."""
    info, state = cluster
    before = local_slurm.status(state)["daemons"]
    os.kill(before["slurmd-node2"], signal.SIGTERM)
    deadline = time.monotonic() + 30
    while local_slurm.status(state)["daemons"]["slurmd-node2"] and time.monotonic() < deadline:
        time.sleep(0.1)
    r = subprocess.run(
        [sys.executable, "-m", "opd.launch.local_slurm", "up", "--dir", str(state)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert r.stdout.splitlines()[-1] == f"export SLURM_CONF={Path(info['slurm_conf'])}"
    assert "started slurmd-node2" in r.stderr
    after = local_slurm.status(state)
    assert after["up"]
    assert {k: v for k, v in after["daemons"].items() if k != "slurmd-node2"} == {
        k: v for k, v in before.items() if k != "slurmd-node2"
    }
    assert after["daemons"]["slurmd-node2"] != before["slurmd-node2"]
