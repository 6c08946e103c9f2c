"""The suite's own rules (tests/conftest.py, pyproject's pytest-timeout settings), checked on small inner
pytest runs with the project's conftest: a hung test fails within its budget and leaves no process behind,
an e2e test without a budget and a fast test that would start a SLURM cluster fail before they run, and a
fast test that leaves a Ray daemon behind fails."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil

from conftest import REPO


def inner_pytest(tmp_path: Path, test_source: str, *args: str) -> tuple[subprocess.CompletedProcess, float]:
    """Run ``test_source`` as a test file next to a copy of the project's conftest, with pyproject's
    pytest settings (timeouts included); returns the result and its wall time."""
    shutil.copy(REPO / "tests" / "conftest.py", tmp_path / "conftest.py")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    (tmp_path / "test_inner.py").write_text(textwrap.dedent(test_source))
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-p", "no:xdist", "-q", "test_inner.py"]
        + ["-o", "testpaths=.", *args],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return result, time.monotonic() - started


def test_a_hung_subprocess_fails_its_test_within_the_budget_and_its_tree_is_killed(tmp_path):
    pids = tmp_path / "pids"
    result, seconds = inner_pytest(
        tmp_path,
        f"""
        import pytest
        from conftest import run_logged

        @pytest.mark.timeout(3)
        def test_hangs(tmp_path):
            # bash starts a grandchild that never ends, records both pids, then waits forever
            script = "sleep 1000 & echo $$ $! > {pids}; wait"
            run_logged(["bash", "-c", script], {{}}, tmp_path / "log")
        """,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Timeout (>3.0s)" in result.stdout, result.stdout
    assert seconds < 60  # pytest's start-up, then 3 s
    for pid in map(int, pids.read_text().split()):
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE, pid


def test_e2e_test_without_a_budget_and_fast_test_with_an_e2e_fixture_fail_before_running(tmp_path):
    marker = tmp_path / "ran"
    result, _ = inner_pytest(
        tmp_path,
        f"""
        import pytest

        @pytest.mark.e2e
        def test_e2e_without_budget():
            open({str(marker)!r}, "a").write("e2e ")

        def test_fast_with_a_cluster(slurm_cluster):
            open({str(marker)!r}, "a").write("fast ")
        """,
    )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "an e2e test needs its own budget: @pytest.mark.timeout(seconds)" in result.stdout
    assert "uses ['slurm_cluster'] (a SLURM cluster or a verl run): mark it e2e" in result.stdout
    assert not marker.exists()  # neither test body ran, and no cluster was started for the fast one
    assert "2 error" in result.stdout or "2 failed" in result.stdout, result.stdout


def test_a_fast_test_that_leaves_a_ray_daemon_behind_fails(tmp_path):
    # a process named like Ray's node manager (a copy of sleep): the check goes by process name
    raylet = tmp_path / "raylet"
    shutil.copy(shutil.which("sleep"), raylet)
    result, _ = inner_pytest(
        tmp_path,
        f"""
        import subprocess

        def test_leaves_a_daemon():
            subprocess.Popen([{str(raylet)!r}, "30"])
        """,
    )
    try:
        assert result.returncode == 1, result.stdout + result.stderr
        assert "a fast test started Ray (['raylet'])" in result.stdout, result.stdout
    finally:
        for process in psutil.process_iter(["exe"]):
            if process.info["exe"] == str(raylet):
                os.kill(process.pid, 9)
