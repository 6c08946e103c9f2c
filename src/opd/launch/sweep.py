"""python -m opd.launch.sweep experiment=NAME [sweep=NAME] [overrides]   (make sweep-opd, make sweep-grpo)

Start a sweep and return once its jobs are queued: the Hydra multirun (``opd.launch.multirun``) runs in
the background, because the submitit launcher blocks until every job ends; its log is
``SWEEP_DIR/launcher.log``. Prints the sweep directory and one line per job (id, run directory,
overrides). ``verl.<key>=a,b`` arguments sweep verl keys (written ``++verl.<key>`` for Hydra). A sweep
with a run that would fail (missing model, teacher or data) is refused with exit 2, nothing queued.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from opd.launch import CONFIGS, JOBS_FILE, REFUSED_FILE
from opd.launch.cancel import LAUNCHER_PID_FILE

LOG_FILE = "launcher.log"
SUBMIT_TIMEOUT_S = float(os.environ.get("OPD_SUBMIT_TIMEOUT_S", 900))


def hydra_arguments(args: list[str]) -> list[str]:
    """``verl.x=v`` -> ``++verl.x=v``: verl keys are added to the login config's empty ``verl`` node."""
    return [f"++{a}" if a.startswith("verl.") else a for a in args]


def sweep_dir(overrides: list[str]) -> Path:
    """The sweep directory the multirun will use, fixed here so that this process can watch it."""
    from hydra import compose, initialize_config_dir
    from hydra.core.override_parser.overrides_parser import OverridesParser

    # as Hydra's sweeper does: the sweep directory comes from the overrides that are not swept (a=1,2)
    fixed = [
        text
        for text, parsed in zip(overrides, OverridesParser.create().parse_overrides(overrides), strict=True)
        if not parsed.is_sweep_override()
    ]
    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        cfg = compose(config_name="launch", overrides=fixed, return_hydra_config=True)
    return Path(str(cfg.hydra.sweep.dir)).resolve()


def main(argv: list[str] | None = None) -> None:
    from hydra.errors import HydraException

    overrides = hydra_arguments(sys.argv[1:] if argv is None else argv)
    try:
        directory = sweep_dir(overrides)
    except HydraException as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    directory.mkdir(parents=True, exist_ok=True)
    log_path = directory / LOG_FILE
    with open(log_path, "a") as log:
        child = subprocess.Popen(
            [sys.executable, "-m", "opd.launch.multirun", "-m", f"hydra.sweep.dir={directory}", *overrides],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    (directory / LAUNCHER_PID_FILE).write_text(f"{child.pid}\n")
    print(f"sweep: {directory}\nlauncher: pid {child.pid}, log {log_path}", flush=True)
    jobs = directory / JOBS_FILE
    shown = 0
    deadline = time.monotonic() + SUBMIT_TIMEOUT_S
    while not jobs.exists():
        shown = _show_progress(log_path, shown)
        if child.poll() is not None and not jobs.exists():
            _show_progress(log_path, shown)
            refused = directory / REFUSED_FILE
            if refused.exists():
                print(f"error: {refused.read_text().strip()}", file=sys.stderr)
                sys.exit(2)
            print(f"error: the launcher exited (code {child.returncode}) before submitting; see {log_path}",
                  file=sys.stderr)  # fmt: skip
            sys.exit(1)
        if time.monotonic() > deadline:
            # Stopped, not left running: a launcher that submits after this command said it failed
            # invites the same sweep submitted twice.
            os.killpg(child.pid, signal.SIGTERM)
            child.wait()
            if jobs.exists():  # it submitted while being stopped
                break
            print(f"error: nothing submitted after {SUBMIT_TIMEOUT_S:.0f} s; the launcher (pid {child.pid}) was "
                  f"stopped, so nothing will be: see {log_path}, and raise OPD_SUBMIT_TIMEOUT_S for sweeps this "
                  "large", file=sys.stderr)  # fmt: skip
            sys.exit(1)
        time.sleep(0.5)
    for line in jobs.read_text().splitlines():
        job_id, run_dir, point = (line.split("\t") + [""])[:3]
        print(f"  job {job_id}  {run_dir}  {point}")
    print(f"status: make status SWEEP={directory}\ncancel: make cancel SWEEP={directory}")


def _show_progress(log_path: Path, shown: int) -> int:
    """Echo the launcher's ``preparing`` / error lines as they appear (composition takes seconds per run)."""
    lines = log_path.read_text(errors="replace").splitlines()
    for line in lines[shown:]:
        if "preparing" in line or "error" in line.lower() or "refused" in line:
            print(f"  {line.strip()[-200:]}", flush=True)
    return len(lines)


if __name__ == "__main__":
    main()
