"""python -m opd.launch.local_slurm up|down|status [--dir DIR] [--nodes N]

A real SLURM cluster on this one host, for tests and laptops: the submit/requeue/accounting paths of the
launchers run against the same daemons as a site's cluster instead of a mock. ``up`` starts munged,
mariadbd, slurmdbd, slurmctld and one slurmd per node (``node1``..``nodeN``, all on this host), waits until
each answers, and prints ``export SLURM_CONF=...``: clients (sbatch, squeue, sacct, submitit) only need
that variable. ``up`` is idempotent (only daemons not alive by their pid file are started); ``down`` stops
exactly the daemons whose pid files are in the state directory, never anything found by name.

Everything (configs, pid files, logs, spool, munge key and socket, the MariaDB data and socket) lives in
the state directory: ``--dir``, else ``$OPD_SLURM_DIR``, else ``~/.cache/opd/slurm``. Ports are
``$OPD_SLURM_PORT_BASE`` (default 16800) plus an offset, away from a system SLURM's defaults: MariaDB +6,
slurmctld +17, slurmdbd +19, slurmd of nodeK +20+K. Must run as root (slurmd launches jobs as their users).
Needs the Debian packages slurmctld slurmd slurm-client slurmdbd munge mariadb-server. Stdlib only.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

CLUSTER = "opdlocal"
PARTITION = "debug"
DEFAULT_PORT_BASE = 16800
NODE_CPUS = 8  # more than a laptop may have: SlurmdParameters=config_overrides lets a node declare it
NODE_MEMORY_MB = 12000
UP_TIMEOUT_S = 90.0  # per daemon; a cold MariaDB on a busy 2-core runner takes a few seconds
DOWN_TIMEOUT_S = 30.0  # per stage, after SIGTERM, before SIGKILL
PROBE_INTERVAL_S = 0.2
PACKAGES = "slurmctld slurmd slurm-client slurmdbd munge mariadb-server"


class LocalSlurmError(RuntimeError):
    """A daemon did not start or answer; the message names it and ends with its log's last lines."""


def state_dir(dir: str | os.PathLike | None = None) -> Path:
    """Absolute: the paths end up in configs read by daemons whose working directory is elsewhere."""
    if dir is None:
        dir = os.environ.get("OPD_SLURM_DIR") or Path.home() / ".cache" / "opd" / "slurm"
    return Path(dir).expanduser().resolve()


def conf_path(dir: str | os.PathLike | None = None) -> Path:
    """The ``slurm.conf`` clients must see as ``SLURM_CONF``."""
    return state_dir(dir) / "slurm.conf"


@dataclass(frozen=True)
class _Daemon:
    name: str  # also the key in up()/status() results
    exe: str  # /proc/PID/exe basename is this or this-<suffix> (Debian: slurmctld-wlm, slurmd-wlm)
    pid_file: Path
    log: Path
    node: str | None = None  # slurmd only: its cmdline must name the node (pid reuse by a sibling slurmd)


class _Layout:
    """Every path and port of one state directory."""

    def __init__(self, root: Path, nodes: int | None = None):
        if any(c.isspace() for c in str(root)):
            raise LocalSlurmError(f"state directory {root} contains whitespace, which slurm.conf cannot hold")
        self.root = root
        self.conf = root / "slurm.conf"
        self.dbd_conf = root / "slurmdbd.conf"  # found next to SLURM_CONF by slurmdbd
        self.run = root / "run"
        self.logs = root / "log"
        self.spool = root / "spool"
        self.munge = root / "munge"
        self.munge_key = self.munge / "munge.key"
        self.munge_socket = self.munge / "munge.socket.2"
        self.mariadb = root / "mariadb"
        self.datadir = self.mariadb / "data"
        self.mariadb_socket = self.mariadb / "mariadb.sock"
        self.db_password_file = self.mariadb / "slurm.password"
        self.datadir_marker = self.mariadb / "datadir-initialised"
        self.db_ready_marker = self.mariadb / "slurm-user-created"
        for sock in (self.munge_socket, self.mariadb_socket):
            if len(str(sock).encode()) > 107:  # sun_path is 108 bytes with the terminating NUL
                raise LocalSlurmError(
                    f"socket path {sock} is too long for a unix socket; use a shorter --dir"
                )
        if nodes is None:  # status/down: the nodes of the config the cluster was started with
            try:
                nodes = sum(line.startswith("NodeName=") for line in self.conf.read_text().splitlines()) or 2
            except FileNotFoundError:
                nodes = 2
        try:
            base = int(os.environ.get("OPD_SLURM_PORT_BASE") or DEFAULT_PORT_BASE)
        except ValueError:
            raise LocalSlurmError(
                f"OPD_SLURM_PORT_BASE={os.environ['OPD_SLURM_PORT_BASE']!r} is not a port"
            ) from None
        self.mariadb_port = base + 6
        self.slurmctld_port = base + 17
        self.slurmdbd_port = base + 19
        self.nodes = [f"node{k}" for k in range(1, nodes + 1)]
        self.slurmd_ports = {n: base + 20 + k for k, n in enumerate(self.nodes, start=1)}
        if nodes < 1 or max([self.slurmctld_port, *self.slurmd_ports.values()]) > 65535:
            raise LocalSlurmError(f"bad node count {nodes} or port base {base}")

        def daemon(name: str, exe: str, node: str | None = None) -> _Daemon:
            return _Daemon(name, exe, self.run / f"{name}.pid", self.logs / f"{name}.log", node)

        self.munged = daemon("munged", "munged")
        self.mariadbd = daemon("mariadbd", "mariadbd")
        self.slurmdbd = daemon("slurmdbd", "slurmdbd")
        self.slurmctld = daemon("slurmctld", "slurmctld")
        self.slurmds = [daemon(f"slurmd-{n}", "slurmd", n) for n in self.nodes]

    def daemons(self) -> list[_Daemon]:
        """Start order. Includes slurmds of nodes an earlier ``up --nodes`` had and this one does not."""
        known = {d.name for d in self.slurmds}
        extra = [
            _Daemon(p.stem, "slurmd", p, self.logs / f"{p.stem}.log", p.stem.removeprefix("slurmd-"))
            for p in sorted(self.run.glob("slurmd-*.pid"))
            if p.stem not in known
        ]
        return [self.munged, self.mariadbd, self.slurmdbd, self.slurmctld, *self.slurmds, *extra]

    def env(self) -> dict[str, str]:
        """The caller's environment, minus SLURM_* (e.g. from an enclosing job), plus our SLURM_CONF."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("SLURM_")}
        env["SLURM_CONF"] = str(self.conf)
        return env


# ---------------------------------------------------------------------------------------------- processes


def _pid_of(d: _Daemon) -> int | None:
    """The daemon's PID if its pid file names a live process that is that daemon, else None.

    Stopped daemons linger briefly as zombies (not alive), and a stale pid file may name a reused PID (the
    exe and, for a slurmd, the node in its cmdline must match).
    """
    try:
        pid = int(d.pid_file.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None
    return pid if _is_running(pid, d) else None


def _is_running(pid: int, d: _Daemon) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        exe = os.path.basename(os.readlink(f"/proc/{pid}/exe")).removesuffix(" (deleted)")
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:  # gone, or a zombie whose exe link no longer resolves
        return False
    if stat.rsplit(")", 1)[-1].split()[0] in ("Z", "X"):
        return False
    if exe != d.exe and not exe.startswith(d.exe + "-"):
        return False
    return d.node is None or d.node.encode() in cmdline


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()[-lines:]
    except OSError:
        return f"(no log at {path})"
    return "\n".join(text) or "(log is empty)"


def _fail(what: str, log: Path, why: str) -> LocalSlurmError:
    return LocalSlurmError(f"{what} {why}; last lines of {log}:\n{_tail(log)}")


def _run(argv: list[str], env: dict[str, str], timeout: float, **kw) -> subprocess.CompletedProcess:
    """A short client command; its output is captured (never the daemons', see ``_start``)."""
    if "input" not in kw:
        kw["stdin"] = subprocess.DEVNULL
    try:
        return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, **kw)
    except subprocess.TimeoutExpired as e:  # TimeoutExpired holds bytes even with text=True
        out, err = (
            x.decode(errors="replace") if isinstance(x, bytes) else x or "" for x in (e.stdout, e.stderr)
        )
        return subprocess.CompletedProcess(argv, 124, out, err)


def _start(argv: list[str], d: _Daemon, env: dict[str, str], port: int | None) -> None:
    """Run a self-daemonizing daemon's launcher.

    The daemon inherits the launcher's open descriptors: if those were our stdout/stderr, a caller reading
    them through a pipe (``| tee``, a CI step, ``capture_output``) would wait until the daemons exit. So
    stdin is /dev/null, output goes to the daemon's log, and nothing else is inherited (close_fds).
    """
    if port is not None:
        _check_port(port, d)
    d.pid_file.unlink(missing_ok=True)  # stale: a reused PID must not pass for the new daemon
    with open(d.log, "ab") as out:
        try:
            rc = subprocess.run(
                argv, env=env, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                close_fds=True, timeout=UP_TIMEOUT_S,
            ).returncode  # fmt: skip
        except subprocess.TimeoutExpired:
            rc = 124
    if rc != 0:
        raise _fail(d.name, d.log, f"failed to start (exit {rc}: {' '.join(argv)})")


def _spawn_detached(argv: list[str], d: _Daemon, env: dict[str, str], port: int) -> int:
    """Start a daemon that does not fork itself (mariadbd) as a child of init, not of this process.

    Started from Python directly it would be our child and, once stopped, a zombie of a long-lived caller
    (pytest). ``sh`` backgrounds it and exits; ``setsid`` puts it in its own session so a Ctrl-C at the
    terminal that ran ``up`` does not reach it. Descriptors as in ``_start``.
    """
    _check_port(port, d)
    d.pid_file.unlink(missing_ok=True)
    script = 'log=$1; shift; setsid "$@" </dev/null >>"$log" 2>&1 & echo $!'
    r = _run(["sh", "-c", script, "sh", str(d.log), *argv], env, 30, close_fds=True)
    if r.returncode != 0 or not r.stdout.strip().isdigit():
        raise _fail(d.name, d.log, f"failed to start ({r.stderr.strip()})")
    return int(r.stdout)


def _wait(d: _Daemon, probe, timeout: float, pid: int | None = None):
    """Poll ``probe()`` (truthy when ready) until a wall-clock deadline.

    Fails early, rather than at the deadline, if the daemon died while starting (e.g. on a config error):
    seen alive by its pid file and then not, or ``pid`` (known when we spawned it) gone.
    """
    deadline = time.monotonic() + timeout
    seen = False
    while True:
        result = probe()
        if result:
            return result
        alive = _pid_of(d) is not None
        seen = seen or alive
        if (seen and not alive) or (pid is not None and not _is_running(pid, d)):
            raise _fail(d.name, d.log, "exited while starting")
        if time.monotonic() > deadline:
            raise _fail(d.name, d.log, f"not ready after {timeout:.0f}s")
        time.sleep(PROBE_INTERVAL_S)


def _check_port(port: int, d: _Daemon) -> None:
    """Fail at once, not at a readiness deadline, when another program (another local cluster) has the port."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the daemons do: TIME_WAIT is no conflict
        try:
            s.bind(("", port))
        except OSError as e:
            raise LocalSlurmError(
                f"{d.name} cannot start: port {port} is in use ({e.strerror}); another local cluster? "
                "Stop it, or give this one other ports with OPD_SLURM_PORT_BASE"
            ) from None


def _kill(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:  # exited since we looked
        pass


def _stop(daemons: list[_Daemon], timeout: float) -> list[str]:
    """SIGTERM all of ``daemons``, wait for them with a deadline, SIGKILL what is left."""
    pids = {d.name: pid for d in daemons if (pid := _pid_of(d)) is not None}
    for pid in pids.values():
        _kill(pid, signal.SIGTERM)
    by_name = {d.name: d for d in daemons}
    for sig_deadline in (timeout, 5.0):  # SIGTERM's grace, then how long a SIGKILL may take
        deadline = time.monotonic() + sig_deadline
        while any(_is_running(p, by_name[n]) for n, p in pids.items()) and time.monotonic() < deadline:
            time.sleep(PROBE_INTERVAL_S)
        left = [n for n, p in pids.items() if _is_running(p, by_name[n])]
        if not left:
            break
        for n in left:
            _kill(pids[n], signal.SIGKILL)
    left = [n for n, p in pids.items() if _is_running(p, by_name[n])]
    if left:
        raise LocalSlurmError(f"{', '.join(left)} still running after SIGKILL")
    for d in daemons:  # so that a later PID reuse cannot look like a live daemon
        d.pid_file.unlink(missing_ok=True)
    return sorted(pids)


# ---------------------------------------------------------------------------------------------- configs


def _slurm_conf(L: _Layout) -> str:
    host = socket.gethostname()
    nodes = "\n".join(
        f"NodeName={n} NodeHostname={host} NodeAddr=127.0.0.1 Port={L.slurmd_ports[n]} "
        f"CPUs={NODE_CPUS} RealMemory={NODE_MEMORY_MB} State=UNKNOWN"
        for n in L.nodes
    )
    return f"""\
# Written by `python -m opd.launch.local_slurm up`, which rewrites it: edit the module, not this file.
ClusterName={CLUSTER}
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={L.slurmctld_port}
SlurmUser=root
# munged of this state dir, not /run/munge. cred_expire: a requeued job may restart only this many
# seconds after its previous run's credential was issued (default 120, too slow for tests).
AuthType=auth/munge
AuthInfo=socket={L.munge_socket},cred_expire=10
CredType=cred/munge
# No cgroups: works in containers and sandboxes; jobs are tracked by process parentage.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
DefMemPerCPU=1000
# Jobs may be requeued (preemption/failure tests); KillWait: seconds from SIGTERM to SIGKILL at a job's end.
JobRequeue=1
KillWait=5
# A node marked DOWN (not responding while its slurmd was stopped) returns as soon as it registers again.
ReturnToService=2
MpiDefault=none
MailProg=/bin/true
# Nodes declare the CPUs/memory below whatever this host has.
SlurmdParameters=config_overrides
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort={L.slurmdbd_port}
# For the slurmdbd connection munge's socket is taken from here, not from AuthInfo.
AccountingStoragePass={L.munge_socket}
JobAcctGatherType=jobacct_gather/none
StateSaveLocation={L.spool}/slurmctld
SlurmdSpoolDir={L.spool}/slurmd-%n
SlurmctldPidFile={L.slurmctld.pid_file}
SlurmctldLogFile={L.slurmctld.log}
SlurmdPidFile={L.run}/slurmd-%n.pid
SlurmdLogFile={L.logs}/slurmd-%n.log
{nodes}
PartitionName={PARTITION} Nodes={",".join(L.nodes)} Default=YES MaxTime=INFINITE State=UP
"""


def _slurmdbd_conf(L: _Layout, password: str) -> str:
    return f"""\
# Written by `python -m opd.launch.local_slurm up`, which rewrites it: edit the module, not this file.
AuthType=auth/munge
AuthInfo=socket={L.munge_socket}
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort={L.slurmdbd_port}
SlurmUser=root
LogFile={L.slurmdbd.log}
PidFile={L.slurmdbd.pid_file}
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort={L.mariadb_port}
StorageUser=slurm
StoragePass={password}
StorageLoc=slurm_acct_db
"""


def _write(path: Path, text: str, mode: int, may_change: bool) -> None:
    """Atomically, with ``mode`` from creation on (slurmdbd.conf holds a password and must be 0600)."""
    try:
        if path.read_text() == text:
            os.chmod(path, mode)
            return
        if not may_change:
            raise LocalSlurmError(
                f"{path} would change (other --nodes or OPD_SLURM_PORT_BASE?) while daemons of {path.parent} "
                f"are running; run `python -m opd.launch.local_slurm down --dir {path.parent}` first"
            )
    except FileNotFoundError:
        pass
    tmp = path.with_name(path.name + ".tmp")
    tmp.unlink(missing_ok=True)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def _secret(path: Path, nbytes: int, mode: int = 0o400) -> bytes:
    """Created once, never readable by others (munged refuses a key that is)."""
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "wb") as f:
            f.write(secrets.token_hex(nbytes).encode())
    os.chmod(path, mode)
    return path.read_bytes()


# ---------------------------------------------------------------------------------------------- daemons


def _ensure_munged(L: _Layout, env: dict[str, str], started: list[str], timeout: float) -> None:
    d = L.munged
    if _pid_of(d) is None:
        _secret(L.munge_key, 64)  # munged wants >= 32 bytes; it hashes the key, any bytes will do
        _start(
            [
                "munged",
                f"--socket={L.munge_socket}",
                f"--key-file={L.munge_key}",
                f"--pid-file={d.pid_file}",
                f"--log-file={d.log}",
                f"--seed-file={L.munge / 'munged.seed'}",
                # munged refuses a socket whose directory path is not traversable by all (e.g. under
                # /root, mode 0700): only root uses this cluster's socket, so go ahead anyway.
                "--force",
            ],
            d,
            env,
            None,  # a unix socket only
        )
        started.append(d.name)

    def probe() -> bool:
        cred = _run(["munge", "-n", "-S", str(L.munge_socket)], env, 10)
        return (
            cred.returncode == 0
            and _run(["unmunge", "-S", str(L.munge_socket)], env, 10, input=cred.stdout).returncode == 0
        )

    _wait(d, probe, timeout)


def _mariadb_client(L: _Layout) -> list[str]:
    # --no-defaults: no /etc/mysql/*.cnf of a system server; as root over the socket (unix_socket auth).
    return ["mariadb", "--no-defaults", f"--socket={L.mariadb_socket}", "--user=root"]


def _ensure_mariadbd(L: _Layout, env: dict[str, str], started: list[str], timeout: float) -> None:
    d = L.mariadbd
    pid = None
    if _pid_of(d) is None:
        if not L.datadir_marker.exists():
            shutil.rmtree(L.datadir, ignore_errors=True)  # a half-initialised one from an interrupted up
            L.db_ready_marker.unlink(missing_ok=True)
            r = _run(
                [
                    "mariadb-install-db", "--no-defaults", f"--datadir={L.datadir}", "--user=root",
                    "--skip-test-db", "--auth-root-authentication-method=socket",
                ],
                env, timeout,
            )  # fmt: skip
            L.logs.joinpath("mariadb-install-db.log").write_text(r.stdout + r.stderr)
            if r.returncode != 0:
                raise _fail(
                    "mariadb-install-db", L.logs / "mariadb-install-db.log", f"failed (exit {r.returncode})"
                )
            L.datadir_marker.touch()
        pid = _spawn_detached(
            [
                "mariadbd",
                "--no-defaults",  # must come first: ignore a system server's /etc/mysql config
                f"--datadir={L.datadir}",
                f"--socket={L.mariadb_socket}",
                f"--pid-file={d.pid_file}",
                f"--log-error={d.log}",
                "--user=root",  # otherwise it refuses to run as root
                "--bind-address=127.0.0.1",
                f"--port={L.mariadb_port}",
                "--skip-name-resolve",  # 127.0.0.1 matches the 'slurm'@'127.0.0.1' grant without DNS
                # slurmdbd's recommendation. Its "not recommended values: innodb_buffer_pool_size" error at
                # start stays: it wants gigabytes, which a test database does not need.
                "--innodb-lock-wait-timeout=900",
            ],
            d,
            env,
            L.mariadb_port,
        )
        started.append(d.name)
    ping = ["mariadb-admin", "--no-defaults", f"--socket={L.mariadb_socket}", "ping"]
    _wait(d, lambda: _run(ping, env, 10).returncode == 0, timeout, pid)
    if not L.db_ready_marker.exists():  # once per datadir; the statements are idempotent if interrupted
        password = L.db_password_file.read_text().strip()
        sql = "".join(
            f"CREATE USER IF NOT EXISTS 'slurm'@'{h}' IDENTIFIED BY '{password}';"
            f"ALTER USER 'slurm'@'{h}' IDENTIFIED BY '{password}';"
            f"GRANT ALL ON slurm_acct_db.* TO 'slurm'@'{h}';"
            for h in ("127.0.0.1", "localhost")
        )
        r = _run([*_mariadb_client(L), "-e", "CREATE DATABASE IF NOT EXISTS slurm_acct_db;" + sql], env, 30)
        if r.returncode != 0:
            raise LocalSlurmError(f"creating the slurm database user failed: {r.stderr.strip()}")
        L.db_ready_marker.touch()


def _ensure_slurmdbd(L: _Layout, env: dict[str, str], started: list[str], timeout: float) -> None:
    d = L.slurmdbd
    if _pid_of(d) is None:
        _start(["slurmdbd"], d, env, L.slurmdbd_port)  # reads slurmdbd.conf from SLURM_CONF's directory
        started.append(d.name)

    def clusters() -> list[str] | None:
        r = _run(["sacctmgr", "-n", "-P", "show", "cluster", "format=cluster"], env, 10)
        return r.stdout.split() if r.returncode == 0 else None

    # Ready when it answers sacctmgr (on its first start, after creating its tables in MariaDB).
    _wait(d, lambda: clusters() is not None, timeout)
    if CLUSTER not in (clusters() or []):
        # Registered before slurmctld's first start so that its accounting has a cluster to go to.
        r = _run(["sacctmgr", "-i", "add", "cluster", CLUSTER], env, 30)
        if CLUSTER not in (clusters() or []):
            raise LocalSlurmError(f"sacctmgr add cluster {CLUSTER} failed: {(r.stdout + r.stderr).strip()}")


def _ensure_slurmctld(L: _Layout, env: dict[str, str], started: list[str], timeout: float) -> None:
    d = L.slurmctld
    if _pid_of(d) is None:
        _start(["slurmctld"], d, env, L.slurmctld_port)
        started.append(d.name)
    _wait(d, lambda: "is UP" in _run(["scontrol", "ping"], env, 10).stdout, timeout)


def _node_states(env: dict[str, str]) -> dict[str, str]:
    r = _run(["sinfo", "-h", "-N", "-o", "%N %t"], env, 10)
    return (
        dict(line.split() for line in r.stdout.splitlines() if len(line.split()) == 2)
        if r.returncode == 0
        else {}
    )


def _registered_since(env: dict[str, str], node: str, since: float) -> bool:
    """Whether the node's slurmd registered after ``since`` (a node whose slurmd just died still looks idle)."""
    r = _run(["scontrol", "-o", "show", "node", node], env, 10)
    field = next((f for f in r.stdout.split() if f.startswith("SlurmdStartTime=")), "=None")
    try:  # local time, whole seconds
        return time.mktime(time.strptime(field.split("=", 1)[1], "%Y-%m-%dT%H:%M:%S")) >= int(since)
    except ValueError:
        return False


def _ensure_slurmds(L: _Layout, env: dict[str, str], started: list[str], timeout: float) -> None:
    t_start = time.time()
    new = set()
    for d in L.slurmds:
        if _pid_of(d) is None:
            (L.spool / d.name).mkdir(exist_ok=True)
            _start(["slurmd", "-N", d.node], d, env, L.slurmd_ports[d.node])
            started.append(d.name)
            new.add(d.node)
    # Ready = usable (a warm `up` may find nodes running jobs: mix/alloc) and, if started now, registered.
    usable = {"idle", "mix", "alloc"}
    deadline = time.monotonic() + timeout
    for d in L.slurmds:
        _wait(
            d,
            lambda d=d: (
                _node_states(env).get(d.node) in usable
                and (d.node not in new or _registered_since(env, d.node, t_start))
            ),
            max(deadline - time.monotonic(), 0.0),
        )


# ---------------------------------------------------------------------------------------------- API


def _check_host() -> None:
    if os.geteuid() != 0:
        raise LocalSlurmError(
            "local_slurm must run as root: slurmd starts every job as its submitting user, which needs root "
            "(e.g. `sudo -E python -m opd.launch.local_slurm up`)"
        )
    missing = [
        b
        for b in (
            "munged",
            "munge",
            "unmunge",
            "mariadbd",
            "mariadb-install-db",
            "mariadb",
            "mariadb-admin",
            "slurmdbd",
            "slurmctld",
            "slurmd",
            "sacctmgr",
            "scontrol",
            "sinfo",
            "setsid",
        )  # fmt: skip
        if shutil.which(b) is None and not Path("/usr/sbin", b).exists()
    ]
    if missing:
        raise LocalSlurmError(
            f"not installed: {' '.join(missing)} (Debian/Ubuntu: apt-get install {PACKAGES})"
        )


def up(dir: str | os.PathLike | None = None, nodes: int = 2, *, timeout: float = UP_TIMEOUT_S) -> dict:
    """Start whatever of the cluster is not running and wait until all of it answers.

    Returns ``{"dir", "slurm_conf", "nodes", "started", "pids"}``; ``started`` lists the daemons this
    call started (empty when everything was already up). ``timeout`` is per daemon, in seconds.
    """
    _check_host()
    L = _Layout(state_dir(dir), nodes)
    for p in (L.root, L.run, L.logs, L.spool, L.spool / "slurmctld", L.mariadb):
        p.mkdir(parents=True, exist_ok=True)
    L.munge.mkdir(mode=0o755, exist_ok=True)
    os.chmod(L.munge, 0o755)  # munged: not writable by group/other, traversable by clients
    running = any(_pid_of(d) is not None for d in L.daemons())
    password = _secret(L.db_password_file, 16, 0o600).decode().strip()
    _write(L.conf, _slurm_conf(L), 0o644, may_change=not running)
    _write(L.dbd_conf, _slurmdbd_conf(L, password), 0o600, may_change=not running)
    env = L.env()
    if not shutil.which("munged"):  # daemons live in /usr/sbin, not on a plain user's PATH
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
    started: list[str] = []
    for ensure in (_ensure_munged, _ensure_mariadbd, _ensure_slurmdbd, _ensure_slurmctld, _ensure_slurmds):
        ensure(L, env, started, timeout)
    return {
        "dir": str(L.root),
        "slurm_conf": str(L.conf),
        "nodes": list(L.nodes),
        "started": started,
        "pids": {d.name: _pid_of(d) for d in L.daemons()},
    }


def down(dir: str | os.PathLike | None = None, *, timeout: float = DOWN_TIMEOUT_S) -> list[str]:
    """Stop the daemons whose pid files are in the state directory, in reverse start order.

    Returns the names of those that were running. Jobs still running keep their processes (slurmstepd and
    the job's): cancel them first if that matters.
    """
    L = _Layout(state_dir(dir))
    daemons = L.daemons()
    stages = [
        [d for d in daemons if d.exe == "slurmd"],
        [L.slurmctld],
        [L.slurmdbd],
        [L.mariadbd],
        [L.munged],
    ]
    return [name for stage in stages for name in _stop(stage, timeout)]


def status(dir: str | os.PathLike | None = None) -> dict:
    """``{"dir", "slurm_conf", "daemons": {name: pid or None}, "nodes": {node: sinfo state}, "up": bool}``."""
    L = _Layout(state_dir(dir))
    daemons = L.daemons()
    pids = {d.name: _pid_of(d) for d in daemons}
    nodes = _node_states(L.env()) if pids.get("slurmctld") else {}
    return {
        "dir": str(L.root),
        "slurm_conf": str(L.conf),
        "daemons": pids,
        "nodes": nodes,
        "up": all(pids.values())
        and bool(nodes)
        and all(s in ("idle", "mix", "alloc") for s in nodes.values()),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m opd.launch.local_slurm",
        description="A real single-host SLURM cluster for tests and laptops.",
    )
    parser.add_argument("command", choices=["up", "down", "status"])
    parser.add_argument("--dir", help="state directory (default: $OPD_SLURM_DIR or ~/.cache/opd/slurm)")
    parser.add_argument("--nodes", type=int, default=2, help="slurmd nodes for `up` (default: 2)")
    args = parser.parse_args(argv)
    try:
        if args.command == "up":
            t0 = time.monotonic()
            info = up(args.dir, args.nodes)
            started = ", ".join(info["started"]) or "nothing (all running)"
            print(f"cluster {CLUSTER} up in {time.monotonic() - t0:.1f}s: started {started}", file=sys.stderr)
            print(
                f"nodes: {' '.join(info['nodes'])} (partition {PARTITION}); state in {info['dir']}",
                file=sys.stderr,
            )
            print(f"export SLURM_CONF={info['slurm_conf']}")
            return 0
        if args.command == "down":
            stopped = down(args.dir)
            print(f"stopped: {', '.join(stopped) or 'nothing (none running)'}", file=sys.stderr)
            return 0
        st = status(args.dir)
        for name, pid in st["daemons"].items():
            print(f"{name:<16} {'running pid ' + str(pid) if pid else 'stopped'}")
        for node, state in st["nodes"].items():
            print(f"{node:<16} {state}")
        print(f"export SLURM_CONF={st['slurm_conf']}")
        return 0 if st["up"] else 3  # 3: "not running", as in LSB init scripts
    except LocalSlurmError as e:
        print(f"local_slurm {args.command}: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
