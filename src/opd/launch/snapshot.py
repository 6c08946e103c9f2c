"""The code a run executes: a copy of the package taken at submission, and the git record beside it.

A job imports the live checkout only at submission (composing its config). In the job, every node, the
driver and Ray's workers import the snapshot (``PYTHONPATH=<snapshot>/src``, set before the nodes start):
a requeued attempt, or a ``rerun.sbatch`` months later, runs the code of its first attempt whatever the
checkout has become. A sweep takes one snapshot for all its points (``SWEEP_DIR/code``; each run
directory links ``code`` to it); ``make submit`` takes one per run (``RUN_DIR/code``).

``git.txt`` beside it names the commit, branch, the full diff of uncommitted changes and the untracked
files, so the snapshot can also be traced back to the repository.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

from opd.launch import REPO

PARTS = (
    "src",
    "jobs",
    "configs",
)  # the package (and the launcher plugin), the job scripts, the login configs
IGNORE = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
DIRECTORY = "code"


def take(destination: Path) -> Path:
    """Copy ``PARTS`` of the checkout into ``destination`` (once: an existing snapshot is kept)."""
    destination = Path(destination)
    if (destination / "src" / "opd").is_dir():
        return destination
    partial = destination.with_name(destination.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    for part in PARTS:
        shutil.copytree(REPO / part, partial / part, ignore=IGNORE, symlinks=True)
    os.replace(partial, destination)
    return destination


def link(run_dir: Path, snapshot: Path) -> Path:
    """``RUN_DIR/code``: the snapshot itself, or a relative link to a sweep's shared one."""
    own = run_dir / DIRECTORY
    if snapshot.resolve() != own.resolve() and not own.exists():
        own.symlink_to(os.path.relpath(snapshot, run_dir))
    return own


def git_description() -> str:
    """Commit, branch, and the full diff (tracked changes) and untracked files of the submitting checkout:
    enough to rebuild the code a run used from the commit it names."""

    def git(*args: str) -> str:
        result = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, text=True)
        return result.stdout.strip() if result.returncode == 0 else ""

    sha = git("rev-parse", "HEAD")
    if not sha:
        return f"{REPO} is not a git checkout\n"
    stat = git("diff", "--stat", "HEAD")
    untracked = git("ls-files", "--others", "--exclude-standard")
    return (
        f"commit {sha}\nbranch {git('rev-parse', '--abbrev-ref', 'HEAD')}\n"
        f"dirty {'yes' if stat or untracked else 'no'}\n\n{stat}\n"
        + (f"\nuntracked:\n{untracked}\n" if untracked else "")
        + (f"\n# git diff HEAD\n{git('diff', 'HEAD')}\n" if stat else "")
    )
