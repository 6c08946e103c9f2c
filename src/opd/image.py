"""Checks that run inside the opd image (containers/Dockerfile).

    python -m opd.image verify [--device cuda|cpu]          # make container-verify, on a GPU node
    python -m opd.image versions --freeze FILE torch=2.9.1 ... # the build's check that the labels tell the truth
    python -m opd.image lock [--variant sglang|vllm]          # make container-lock: re-resolve a lock
    python -m opd.image gpu-env [--venv DIR] [--dry-run]      # make setup ENV=gpu: the image's stack in a venv

``verify`` answers "is this image what it claims, and does it work here": every installed package against
the image's lock (``$OPD_IMAGE_CONSTRAINTS``), ``pip check``, a CUDA device visible, verl importable with
its workers, and one optimisation step of the OPD loss on the device, checked against an fp64 reference.
Each check prints one line; the exit status is the number of failed checks.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from opd.launch import REPO


def canonical(name: str) -> str:
    """PEP 503 name: the form pip compares (``Flash_Attn`` == ``flash-attn``)."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_pins(path: Path) -> dict[str, str]:
    """``name==version`` lines of a constraints or freeze file (comments, options and URLs skipped)."""
    pins = {}
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;]+)", line)
        if match:
            pins[canonical(match.group(1))] = match.group(3)
    return pins


def installed_versions() -> dict[str, str]:
    return {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}


def same_version(have: str, pinned: str) -> bool:
    """``==`` as pip reads it: a pin without a local label matches any (``2.13.0`` matches ``2.13.0+cpu``)."""
    from packaging.version import InvalidVersion, Version

    try:
        have_v, pinned_v = Version(have), Version(pinned)
    except InvalidVersion:
        return have == pinned
    return have_v == pinned_v or (pinned_v.local is None and have_v.public == pinned_v.public)


def compare(expected: dict[str, str], installed: dict[str, str]) -> list[str]:
    """Problems, one line each; ``absent`` expects a package not to be installed."""
    problems = []
    for name, version in sorted(expected.items()):
        have = installed.get(canonical(name))
        if version == "absent":
            if have is not None:
                problems.append(f"{name}: expected absent, installed {have}")
        elif have is None:
            problems.append(f"{name}: expected {version}, not installed")
        elif not same_version(have, version):
            problems.append(f"{name}: expected {version}, installed {have}")
    return problems


def versions_main(args: argparse.Namespace) -> int:
    expected = dict(item.split("=", 1) for item in args.expected)
    problems = compare(expected, read_pins(args.freeze))
    for line in problems:
        print(f"[opd.image] version mismatch: {line}", file=sys.stderr)
    if problems:
        print(
            "[opd.image] the image's labels and the installed packages disagree: make the version ARGs of "
            "containers/Dockerfile equal the lock (tests/test_containers.py checks the defaults)",
            file=sys.stderr,
        )
        return 1
    print(f"[opd.image] versions as labelled: {', '.join(f'{k} {v}' for k, v in sorted(expected.items()))}")
    return 0


# --- lock -----------------------------------------------------------------------------------------------

# The image's platform: CPython of the base image (Ubuntu 24.04: 3.12, glibc 2.39) on x86-64. pip matches a
# given --platform exactly, so every manylinux tag that glibc accepts is listed.
LOCK_PYTHON = "3.12"
LOCK_PLATFORMS = (
    *(f"manylinux_2_{minor}_x86_64" for minor in range(39, 4, -1)),
    *("manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64", "linux_x86_64"),
)
# Dependencies published only as sdists (hydra's parser runtime): pip resolves for another platform only
# from wheels, so these are built here first (pure Python) at the version constraints/cpu.txt pins.
SDIST_ONLY = ("antlr4-python3-runtime",)


@dataclass(frozen=True)
class Variant:
    """One GPU image: the extra that brings its rollout engine, the top-level pins its resolution starts
    from, its lock, and the packages it holds at other versions than constraints/cpu.txt, with the reason
    (one version of each package across environments otherwise; tests/test_containers.py allows only these)."""

    extra: str
    pins: tuple[str, ...]
    lock: Path
    differs_from_cpu: dict[str, str]


VARIANTS = {
    "sglang": Variant(
        extra="gpu",
        pins=("torch==2.9.1", "sglang==0.5.6", "verl==0.7.1", "transformers==4.57.1"),
        lock=REPO / "containers" / "constraints.txt",
        differs_from_cpu={
            "torch": "the CUDA build 2.9.1, which sglang 0.5.6 pins; CPU machines use the CPU wheel 2.13.0"
        },
    ),
    "vllm": Variant(
        extra="vllm",
        pins=("torch==2.9.0", "vllm==0.12.0", "verl==0.7.1", "transformers==4.57.1"),
        lock=REPO / "containers" / "constraints-vllm.txt",
        differs_from_cpu={
            "torch": "the CUDA build 2.9.0, which vllm 0.12.0 pins; CPU machines use the CPU wheel 2.13.0"
        },
    ),
}
LOCK = VARIANTS["sglang"].lock


def resolve(constraints: Path, requirements: list[str], python: str, pinned: bool = False) -> list[dict]:
    """pip's resolution of ``requirements`` under ``constraints`` for the image's platform and CPython
    ``python`` (metadata only, no wheels downloaded): the report's ``install`` items.

    ``pinned``: every package is pinned by ``constraints``. pip (23.2) then checks some pinned wheels'
    Requires-Python against the running interpreter instead of ``python`` (airportsdata's >=3.12 fails
    from 3.11), so that check is skipped: the lock was resolved for ``python`` already."""
    with tempfile.TemporaryDirectory() as tmp:
        report, wheels = Path(tmp) / "report.json", Path(tmp) / "wheels"
        pins = read_pins(constraints)
        sdists = [f"{name}=={pins[name]}" for name in SDIST_ONLY if name in pins]
        subprocess.run(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(wheels), *sdists],
            check=True,
        )
        command = [sys.executable, "-m", "pip", "install", "--dry-run", "--ignore-installed", "--quiet"]
        command += ["--report", str(report), "--target", str(Path(tmp) / "target"), "--only-binary=:all:"]
        command += ["--find-links", str(wheels), "-c", str(constraints)]
        command += ["--python-version", python, "--implementation", "cp"]
        command += [arg for platform in LOCK_PLATFORMS for arg in ("--platform", platform)]
        command += ["--ignore-requires-python"] if pinned else []
        command += requirements
        print(f"[opd.image] resolving for CPython {python} x86-64: {' '.join(command[4:])}", flush=True)
        subprocess.run(command, check=True)
        return json.loads(report.read_text())["install"]


def lock_main(args: argparse.Namespace) -> int:
    """Resolve ``.[train,launch,<extra>]`` of a variant for the image's platform with pip's resolver
    (metadata only, no wheels downloaded), holding every package constraints/cpu.txt shares at its version
    there, and write every package of the result as ``name==version``."""
    variant = VARIANTS[args.variant]
    with tempfile.TemporaryDirectory() as tmp:
        cpu_pins = read_pins(REPO / "constraints" / "cpu.txt")
        shared = Path(tmp) / "cpu-shared.txt"
        shared.write_text(
            "".join(f"{n}=={v}\n" for n, v in cpu_pins.items() if n not in variant.differs_from_cpu)
        )
        installed = resolve(shared, [*variant.pins, f"{REPO}[train,launch,{variant.extra}]"], args.python)
    pins = sorted(
        (canonical(item["metadata"]["name"]), item["metadata"]["version"])
        for item in installed
        if canonical(item["metadata"]["name"]) != "opd"
    )
    header = [
        f"# The {args.variant} GPU image's lock: every Python package of containers/Dockerfile, exact (pip install -c).",
        f"# Resolved for CPython {args.python} x86-64 from {' '.join(variant.pins)} and .[train,launch,"
        f"{variant.extra}]",
        f"# by `make container-lock` (python -m opd.image lock --variant {args.variant}). Shared packages keep",
        f"# their constraints/cpu.txt versions, except {', '.join(variant.differs_from_cpu)} (opd.image.VARIANTS).",
        "# flash-attn is installed from its release wheel (FLASH_ATTN_WHEEL), not from this file.",
    ]
    variant.lock.write_text("\n".join(header + [f"{name}=={version}" for name, version in pins]) + "\n")
    print(f"[opd.image] wrote {len(pins)} pins to {variant.lock}")
    return 0


# --- gpu-env --------------------------------------------------------------------------------------------


def url_wheels() -> dict[str, str]:
    """Wheels the image installs from a URL, not from the lock (``ARG *_WHEEL=https://...`` of the
    Dockerfile): name -> URL."""
    text = (REPO / "containers" / "Dockerfile").read_text()
    return {
        m.group(1).lower(): m.group(2) for m in re.finditer(r"^ARG (\w+)_WHEEL=(https?://\S+)$", text, re.M)
    }


def reachable(url: str, timeout_s: float = 10.0) -> str | None:
    """None if ``url`` answers a HEAD request, else why not."""
    import urllib.request

    try:
        urllib.request.urlopen(urllib.request.Request(url, method="HEAD"), timeout=timeout_s).close()
        return None
    except Exception as error:  # DNS, proxy, firewall, HTTP error: all mean "cannot fetch it from here"
        return str(error)


def gpu_env_main(args: argparse.Namespace) -> int:
    """``make setup ENV=gpu``: a venv with the GPU image's stack (its lock, its extras, its URL wheels) on
    a filesystem the GPU nodes share, for sites that run jobs without a container. ``--dry-run`` resolves
    it with pip against the lock for the image's platform and installs nothing."""
    variant = VARIANTS[args.variant]
    extras = f"train,launch,{variant.extra}"
    wheels = url_wheels()
    if args.dry_run:
        installed = resolve(variant.lock, [f"{REPO}[{extras}]"], LOCK_PYTHON, pinned=True)
        pins = read_pins(variant.lock)
        resolved = {canonical(i["metadata"]["name"]): i["metadata"]["version"] for i in installed}
        resolved.pop("opd", None)
        off = [f"{n} {v} (lock: {pins.get(n, 'absent')})" for n, v in resolved.items() if pins.get(n) != v]
        print(
            f"[opd.image] {len(resolved)} packages resolve for CPython {LOCK_PYTHON} against {variant.lock}"
        )
        if off:
            print("[opd.image] not as locked: " + ", ".join(off))
        for name, url in wheels.items():
            problem = reachable(url)
            state = (
                "reachable" if problem is None else f"NOT CHECKED, this machine cannot reach it ({problem})"
            )
            print(f"[opd.image] {name} is pinned by URL, not by the lock: {url}: {state}")
        return 1 if off else 0
    venv = Path(args.venv).resolve()
    steps = [
        [args.python_bin, "-m", "venv", str(venv)],
        [
            str(venv / "bin" / "python"),
            "-m",
            "pip",
            "install",
            "-c",
            str(variant.lock),
            "-e",
            f"{REPO}[{extras}]",
        ],
        *(
            [str(venv / "bin" / "python"), "-m", "pip", "install", "--no-deps", url]
            for url in wheels.values()
        ),
        [str(venv / "bin" / "python"), "-m", "pip", "check"],
    ]
    for step in steps:
        print(f"[opd.image] {' '.join(step)}", flush=True)
        if subprocess.run(step).returncode != 0:
            print(f"error: failed: {' '.join(step)}", file=sys.stderr)
            return 1
    print(
        f"[opd.image] GPU environment ready: {venv}\n"
        f"  submit from it (each run records the Python it was submitted with, and its jobs run that Python):\n"
        f"  make sweep-opd VENV={venv} ARGS='cluster=<your site> ...'"
    )
    return 0


# --- verify ---------------------------------------------------------------------------------------------


def check_lock() -> str:
    lock = os.environ.get("OPD_IMAGE_CONSTRAINTS")
    if not lock or not Path(lock).is_file():
        raise RuntimeError(
            f"OPD_IMAGE_CONSTRAINTS={lock!r} is not a file: run this inside the opd image "
            "(make container-verify), whose lock it names"
        )
    problems = compare(read_pins(Path(lock)), installed_versions())
    if problems:
        raise RuntimeError(f"{len(problems)} packages differ from {lock}: " + "; ".join(problems[:10]))
    return f"{len(read_pins(Path(lock)))} packages as pinned in {lock}"


def check_pip() -> str:
    result = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True)
    if result.returncode != 0:
        raise RuntimeError((result.stdout + result.stderr).strip())
    return result.stdout.strip()


def check_cuda(device: str) -> str:
    import torch

    if device == "cpu":
        return f"skipped (--device cpu); torch {torch.__version__}"
    if not torch.cuda.is_available():
        raise RuntimeError(
            f"no CUDA device visible (torch {torch.__version__}, CUDA_VISIBLE_DEVICES="
            f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): run it on a GPU node with the GPUs passed in, "
            "e.g. srun --gpus-per-node=1 make container-verify (apptainer exec --nv)"
        )
    names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return f"torch {torch.__version__}, CUDA {torch.version.cuda}, {len(names)} device(s): {', '.join(names)}"


def check_verl() -> str:
    started = time.perf_counter()
    import verl
    import verl.trainer.ppo.ray_trainer  # noqa: F401
    import verl.workers.fsdp_workers  # noqa: F401

    return f"verl {verl.__version__} trainer and FSDP workers import in {time.perf_counter() - started:.1f} s"


def check_opd_loss(device: str, n: int = 256, vocab: int = 32_000, hidden: int = 64) -> str:
    """One SGD step of a small student head under the OPD reverse KL, on ``device``: the loss matches an
    fp64 autograd reference and the step lowers it."""
    import torch

    from opd.distill.losses import reduce_divergence, token_divergence
    from opd.distill.teacher_signal import TeacherSignal

    dev = torch.device("cuda" if device == "cuda" else "cpu")
    generator = torch.Generator().manual_seed(0)
    hidden_N_H = torch.randn(n, hidden, generator=generator).to(dev)
    head_V_H = (torch.randn(vocab, hidden, generator=generator) * 0.3).to(dev).requires_grad_()
    teacher_N_V = (torch.randn(n, vocab, generator=generator) * 2).to(dev)
    signal = TeacherSignal.from_logits(teacher_N_V, dtype=torch.float32, device=dev)

    def loss_of(head: torch.Tensor) -> torch.Tensor:
        return reduce_divergence(token_divergence(hidden_N_H @ head.T, signal, "reverse_kl")[0])

    loss = loss_of(head_V_H)
    loss.backward()
    with torch.no_grad():
        z = (hidden_N_H @ head_V_H.T).double()
        s, t = torch.log_softmax(z, -1), torch.log_softmax(teacher_N_V.double(), -1)
        reference = (s.exp() * (s - t)).sum(-1).mean().item()
        error = abs(loss.item() - reference) / abs(reference)
        if not error < 1e-4:
            raise RuntimeError(
                f"loss {loss.item():.6f} vs fp64 reference {reference:.6f}: relative error {error:.2e}"
            )
        head_V_H -= 1.0 * head_V_H.grad
        after = loss_of(head_V_H).item()
    if not after < loss.item():
        raise RuntimeError(f"one SGD step did not lower the loss: {loss.item():.6f} -> {after:.6f}")
    return f"{dev.type}: reverse KL {loss.item():.4f} -> {after:.4f} after one step (fp64 rel. error {error:.1e})"


def verify_main(args: argparse.Namespace) -> int:
    checks = [
        ("lock", check_lock),
        ("pip check", check_pip),
        ("cuda", lambda: check_cuda(args.device)),
        ("verl", check_verl),
        ("opd loss", lambda: check_opd_loss(args.device)),
    ]
    failed = 0
    for name, check in checks:
        try:
            print(f"[opd.image] ok   {name}: {check()}", flush=True)
        except Exception as error:  # every check runs and reports; the status counts the failures
            failed += 1
            print(f"[opd.image] FAIL {name}: {error}", flush=True)
    print(f"[opd.image] {len(checks) - failed}/{len(checks)} checks passed")
    return failed


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m opd.image", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    verify = commands.add_parser("verify", help="versions, pip check, CUDA, verl import, one OPD loss step")
    verify.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    versions = commands.add_parser(
        "versions", help="check NAME=VERSION (or NAME=absent) against a freeze file"
    )
    versions.add_argument("--freeze", type=Path, required=True)
    versions.add_argument("expected", nargs="+", metavar="NAME=VERSION")
    lock = commands.add_parser(
        "lock", help="re-resolve the image's pins (needs PyPI; downloads metadata only)"
    )
    lock.add_argument("--variant", choices=sorted(VARIANTS), default="sglang")
    lock.add_argument("--python", default=LOCK_PYTHON)
    gpu_env = commands.add_parser(
        "gpu-env", help="build a venv from the GPU image's lock (make setup ENV=gpu), or --dry-run resolve it"
    )
    gpu_env.add_argument("--variant", choices=sorted(VARIANTS), default="sglang")
    gpu_env.add_argument("--venv", default=".venv-gpu")
    gpu_env.add_argument("--python-bin", default=f"python{LOCK_PYTHON}", help="the CPython the lock is for")
    gpu_env.add_argument("--dry-run", action="store_true")
    args = parser.parse_args(argv)
    commands = {"verify": verify_main, "versions": versions_main, "lock": lock_main, "gpu-env": gpu_env_main}
    return commands[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
