"""One Ray cluster per SLURM job: pinned ports, private temp dir and auth token, readiness by deadline.

Started by ``opd.launch.node`` on every node of an allocation. Shared hosts are the norm on clusters
(several jobs, several users per node), so nothing here uses Ray's defaults that collide there:
fixed default ports (6379, 8265, 10001, random worker ports), ``/tmp/ray`` and ``~/.ray/auth_token``,
``address='auto'`` and ``ray stop``. Ray is imported only inside functions (login nodes may lack it).
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

LOWEST_PORT = 10000
# Two slots per band so that two "nodes" of one job on the same host (the test cluster) never share
# ports; nodes on distinct hosts (real clusters) cannot collide anyway.
SLOTS_PER_BAND = 2
SLOT_SIZE = 256
BAND_SIZE = SLOTS_PER_BAND * SLOT_SIZE
# Offsets inside a node's slot; worker processes (one port each) take the rest.
PORT_OFFSETS = {
    "port": 0,  # GCS (head only)
    "node-manager-port": 1,
    "object-manager-port": 2,
    "runtime-env-agent-port": 3,
    "dashboard-agent-grpc-port": 4,
    "dashboard-agent-listen-port": 5,
    "metrics-export-port": 6,
    "ray-client-server-port": 7,  # head only
    "dashboard-port": 8,  # head only: --include-dashboard=false still starts a minimal dashboard process
}
FIRST_WORKER_OFFSET = 16
HEAD_ONLY = {"port", "ray-client-server-port", "dashboard-port"}


class ClusterError(RuntimeError):
    """The job's Ray cluster could not be brought up or lost a node; the message says which and where."""


EPHEMERAL_FILE = "/proc/sys/net/ipv4/ip_local_port_range"
# Where automatic layouts may start: below 10,000 sit many services' well-known ports (databases,
# web servers); the last resort goes down to 2,048, still clear of the privileged ports.
FALLBACK_LOWEST_PORT = 2048


def ephemeral_range(text: str | None = None) -> tuple[int, int]:
    """This host's ephemeral port range (the kernel hands these out for outgoing connections: a Ray
    port in it can be taken by any process's connection before Ray binds it)."""
    try:
        if text is None:
            text = Path(EPHEMERAL_FILE).read_text()
        low, high = (int(field) for field in text.split()[:2])
        return low, high
    except (OSError, ValueError):
        return 32768, 60999  # Linux's default


@dataclass(frozen=True)
class PortLayout:
    """Ports ``[low, high)`` cut into bands of ``BAND_SIZE``: one band per job (by job id), one slot per
    node of the job on a host. ``cluster.ray_ports: [low, high]`` fixes the range (a site whose
    firewall opens one range); null derives it from each host's ephemeral range."""

    low: int
    high: int
    origin: str

    @classmethod
    def from_config(cls, ports: list | None, ephemeral: tuple[int, int] | None = None) -> PortLayout:
        if ports:
            if len(ports) != 2 or not all(isinstance(p, int) for p in ports):
                raise ClusterError(
                    f"cluster.ray_ports={ports}: give two port numbers [low, high] (high excluded)"
                )
            layout = cls(int(ports[0]), int(ports[1]), "cluster.ray_ports")
            if not 1024 <= layout.low < layout.high <= 65536 or layout.bands < 1:
                raise ClusterError(
                    f"cluster.ray_ports={ports} holds no band of {BAND_SIZE} ports between 1024 and 65536: "
                    f"give a range at least {BAND_SIZE} wide (one band per concurrent job on a host)"
                )
            return layout
        return cls.automatic(ephemeral or ephemeral_range())

    @classmethod
    def automatic(cls, ephemeral: tuple[int, int]) -> PortLayout:
        """From ``LOWEST_PORT`` up to the ephemeral range; if that has no room (a floor of 9,000, as on
        some GPU nodes), above the range's top; else from ``FALLBACK_LOWEST_PORT`` up to it."""
        floor, ceiling = ephemeral
        candidates = [
            cls(LOWEST_PORT, floor, f"below the ephemeral range {floor}-{ceiling}"),
            cls(ceiling + 1, 65536, f"above the ephemeral range {floor}-{ceiling}"),
            cls(FALLBACK_LOWEST_PORT, floor, f"below the ephemeral range {floor}-{ceiling}"),
        ]
        for layout in candidates:
            if layout.bands >= 1:
                return layout
        raise ClusterError(
            f"the ephemeral port range {floor}-{ceiling} of {socket.gethostname()} leaves no room for a band of "
            f"{BAND_SIZE} Ray ports: set cluster.ray_ports: [low, high] to a range your site keeps free"
        )

    @property
    def bands(self) -> int:
        return max(0, (self.high - self.low) // BAND_SIZE)

    def slot_ports(self, job_id: int, node_rank: int, shift: int = 0) -> dict[str, int]:
        """Ports of one node: band ``(job_id + shift) mod bands``, slot ``node_rank mod 2``."""
        band = (job_id + shift) % self.bands
        base = self.low + band * BAND_SIZE + (node_rank % SLOTS_PER_BAND) * SLOT_SIZE
        ports = {name: base + offset for name, offset in PORT_OFFSETS.items()}
        ports["min-worker-port"] = base + FIRST_WORKER_OFFSET
        ports["max-worker-port"] = base + SLOT_SIZE - 1
        return ports

    def free_ports(self, job_id: int, node_rank: int, head: bool) -> dict[str, int]:
        """The job's own band if its ports are free on this host, else the next free band.

        Job ids that differ by a multiple of the band count map to the same band; probing turns that
        rare aliasing into a shift instead of a collision."""
        for shift in range(self.bands):
            ports = self.slot_ports(job_id, node_rank, shift)
            fixed = [
                p for name, p in ports.items() if name in PORT_OFFSETS and (head or name not in HEAD_ONLY)
            ]
            workers = range(ports["min-worker-port"], ports["max-worker-port"] + 1)
            if all(_port_free(p) for p in [*fixed, *workers]):
                return ports
        raise ClusterError(
            f"no free Ray port band in {self.low}-{self.high - 1} ({self.origin}) on {socket.gethostname()}"
        )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("", port))
        except OSError:
            return False
    return True


def interface_address(name: str) -> str:
    """The IPv4 address of network interface ``name`` (e.g. ``ib0``) on this host."""
    import fcntl
    import struct

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            packed = fcntl.ioctl(
                sock.fileno(), 0x8915, struct.pack("256s", name.encode()[:15])
            )  # SIOCGIFADDR
        except OSError as error:
            known = ", ".join(n for _, n in socket.if_nameindex())
            raise ClusterError(
                f"cluster.network_interface={name}: {socket.gethostname()} has no IPv4 address on it ({error}); "
                f"its interfaces: {known}"
            ) from None
    return socket.inet_ntoa(packed[20:24])


def node_address(network_interface: str | None) -> str | None:
    """The address Ray advertises for this node (``--node-ip-address``): null leaves Ray's own choice
    (the interface of the default route); ``hostname``: the address the node's name resolves to;
    anything else names an interface (the fabric the nodes reach each other on: ``ib0``, ``hsn0``)."""
    if not network_interface:
        return None
    if network_interface == "hostname":
        return socket.gethostbyname(socket.gethostname())
    return interface_address(network_interface)


@dataclass
class JobIdentity:
    """Who this process is inside the allocation (SLURM's variables; a plain local run is job pid, 1 node)."""

    job_id: int  # unique per job, array tasks included: the port band derives from it
    name: str  # as squeue and sacct show it: 123, or 122_1 for a task of an array job (sweeps)
    cluster: str  # job ids are unique per cluster only (two test clusters may share a host)
    node_rank: int
    nnodes: int
    attempt: int

    @classmethod
    def from_env(cls) -> JobIdentity:
        env = os.environ
        job_id = int(env.get("SLURM_JOB_ID") or env.get("OPD_JOB_ID") or os.getpid())
        array = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        return cls(
            job_id=job_id,
            name=f"{array[0]}_{array[1]}" if all(array) else str(job_id),
            cluster=env.get("SLURM_CLUSTER_NAME", "local")[:16],
            node_rank=int(env.get("SLURM_NODEID", 0)),
            nnodes=int(env.get("SLURM_JOB_NUM_NODES", env.get("SLURM_NNODES", 1))),
            attempt=int(env.get("SLURM_RESTART_COUNT", 0)),
        )

    @property
    def tag(self) -> str:
        """``<job>.<restart count>``: one log directory per attempt of a job."""
        return f"{self.name}.{self.attempt}"


def write_token(path: Path) -> None:
    """A per-job Ray auth token, readable by the job's user only (the run dir is shared with the nodes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as out:
        out.write(secrets.token_hex(32))


def ray_env(token_path: Path, address: str | None = None) -> dict[str, str]:
    """Environment for ray start and the driver: token auth from the job's file, never ~/.ray."""
    env = dict(os.environ, RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    env.pop("RAY_AUTH_TOKEN", None)
    env.pop("RAY_ADDRESS", None)
    if address:
        env["RAY_ADDRESS"] = address
    # Usage-stats reporting would try the network from compute nodes that often have none.
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    return env


def ray_start_command(
    ray: str,
    ports: dict[str, int],
    temp_dir: str,
    head_address: str | None,
    resources: dict,
    node_ip: str | None = None,
) -> list[str]:
    """``ray start --block`` with every port pinned; ``head_address=None`` starts the head; ``node_ip``:
    the address this node advertises (multi-NIC nodes: the one the other nodes can reach)."""
    command = [ray, "start", "--block", "--disable-usage-stats", f"--temp-dir={temp_dir}"]
    if node_ip:
        command.append(f"--node-ip-address={node_ip}")
    if head_address is None:
        command += ["--head", "--include-dashboard=false"]
    else:
        command += [f"--address={head_address}"]
    for name, port in ports.items():
        if head_address is None or name not in HEAD_ONLY:
            command.append(f"--{name}={port}")
    if resources.get("num_cpus") is not None:
        command.append(f"--num-cpus={resources['num_cpus']}")
    if resources.get("num_gpus") is not None:
        command.append(f"--num-gpus={resources['num_gpus']}")
    if resources.get("resources"):
        command.append(f"--resources={json.dumps(resources['resources'])}")
    return command


def spawn_group(command: list[str], **popen) -> subprocess.Popen:
    """Start ``command`` in its own process group (teardown stops exactly its processes) with SIGUSR2
    ignored: SLURM's pre-walltime USR2 reaches every process of a submitit job step, and only the job's
    handler should act on it (requeue), not kill Ray or verl, which inherit the ignored signal."""
    previous = signal.signal(signal.SIGUSR2, signal.SIG_IGN)
    try:
        return subprocess.Popen(command, stdin=subprocess.DEVNULL, start_new_session=True, **popen)
    finally:
        signal.signal(signal.SIGUSR2, previous)


def start_ray(command: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen:
    """``ray start --block`` in its own process group, output appended to ``log_path``."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "a") as log:  # the child keeps its own descriptor
        return spawn_group(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def stop_process_groups(*processes: subprocess.Popen | None, grace_s: float = 3.0) -> None:
    """SIGTERM the process groups of ``processes`` (started by ``spawn_group``: ``ray start``, the
    driver) together, then SIGKILL what is left after ``grace_s``.

    ``ray start --block`` alone drains for up to 30 s after SIGTERM and leaves GCS behind if killed;
    signalling whole groups, all at once, stops raylet, GCS, workers and driver within SLURM's KillWait."""
    groups = [p for p in processes if p is not None]
    for sig, wait in ((signal.SIGTERM, grace_s), (signal.SIGKILL, 5.0)):
        for process in groups:
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            groups = [p for p in groups if p.poll() is None or _group_alive(p.pid)]
            if not groups:
                return
            time.sleep(0.1)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def alive_nodes(address: str, token_path: Path) -> dict[str, str]:
    """node id -> node address of the nodes GCS reports alive (GCS only: no driver is started)."""
    os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_path))
    from ray._raylet import GcsClient  # pinned Ray (constraints); the public state API needs a dashboard

    info = GcsClient(address=address).get_all_node_info(timeout=5)
    return {node_id.hex(): f"{n.node_manager_address}" for node_id, n in info.items() if n.state == 0}


def wait_for(what: str, ready, deadline_s: float, log_hint: str, poll_s: float = 0.5, check_alive=None):
    """Poll ``ready()`` until it returns something truthy; raise ClusterError naming ``what`` at the deadline.

    ``check_alive()`` may raise to fail fast (a process that readiness depends on has died)."""
    deadline = time.monotonic() + deadline_s
    last_error = None
    while time.monotonic() < deadline:
        if check_alive is not None:
            check_alive()
        try:
            result = ready()
            if result:
                return result
        except Exception as error:  # GCS not up yet: retried until the deadline
            last_error = error
        time.sleep(poll_s)
    detail = f" (last error: {last_error})" if last_error else ""
    raise ClusterError(f"timed out after {deadline_s:.0f} s waiting for {what}{detail}; see {log_hint}")
