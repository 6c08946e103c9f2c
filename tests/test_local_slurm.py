"""``opd.launch.local_slurm``: a real single-host SLURM cluster that runs jobs and records them in sacct.

Here: its settings and refusals (fast). The cluster itself (up, idempotence, restart, a 2-node job in
sacct) is tested at the top of test_slurm_launch.py, on the one cluster every SLURM test shares.
"""

from __future__ import annotations

import os

import pytest

from opd.launch import local_slurm


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
