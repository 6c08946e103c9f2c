"""Jobs inside the pinned image: the ``container`` config (configs/container/) made into a command.

Every command that must run on the image's stack (the login side's config composition, each node's
``opd.launch.node``) is prefixed by ``jobs/container_exec.sh RUNTIME IMAGE [options] -- ...``. The script
runs on the host of each srun task, so the per-task variables (SLURM_PROCID, CUDA_VISIBLE_DEVICES, ...)
are the task's own; it forwards the allowlisted ones into ``apptainer exec --cleanenv``.

Decided at submission, recorded in ``launch.yaml`` (``container.digest``, ``container.binds``):
- the image: a SIF file (its sha256, cached next to it in ``<sif>.sha256`` by ``make container-pull``) or
  ``docker://name@sha256:<digest>``, converted once at submission to ``SIF_DIR/opd-<digest>.sif``; a tag
  is refused, it can move; the job checks the SIF is still the one recorded before it starts;
- the binds: the run directory, the checkout (``code: bind``), every existing absolute path named by the
  run's recorded variables, verl overrides or resolved config (models, data, caches), and ``binds``,
  with the real paths behind their symlinks (Hugging Face cache snapshots link into ``blobs/``);
- a missing runtime executable or image file refuses the run before anything is queued.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

from opd.launch import REPO, SubmissionError

EXEC_SCRIPT = REPO / "jobs" / "container_exec.sh"
DIGEST = re.compile(r"sha256:[0-9a-f]{64}")
INSIDE = "OPD_CONTAINER_DIGEST"  # set inside the container (to the image's digest): the node is in it
# Host directories never bound: the image brings its own system; /proc, /sys, /dev come with apptainer.
SYSTEM_DIRS = {"", "bin", "boot", "dev", "etc", "lib", "lib32", "lib64", "proc", "run", "sbin", "sys", "usr"}


def enabled(container: dict) -> bool:
    return bool(container.get("runtime"))


def check_runtime(container: dict) -> str:
    """The runtime's path on this (login) node; it also composes the run's config inside the image."""
    runtime = container["runtime"]
    found = shutil.which(runtime)
    if found is None:
        raise SubmissionError(
            f"container={container.get('name', runtime)} needs the `{runtime}` executable, and this node has "
            f"none on PATH: load it before submitting (e.g. `module load {runtime}`; the GPU nodes need it too, "
            "see cluster.setup) or run without a container (container=none)"
        )
    return found


def image_digest(image: str | None) -> str:
    """``sha256:<hex>`` of the image: from a pinned ``docker://`` reference, or a SIF file's content."""
    if not image:
        raise SubmissionError(
            "the container config names no image: export OPD_IMAGE=/path/to/opd.sif (make container-pull) "
            "or OPD_IMAGE=docker://<name>@sha256:<digest>"
        )
    if "://" in image:
        scheme, _, reference = image.partition("://")
        found = DIGEST.search(reference)
        if scheme != "docker" or not found or not reference.endswith(found.group(0)):
            raise SubmissionError(
                f"image {image} is not pinned: use docker://<name>@sha256:<digest> (a tag can move between "
                "runs) or a SIF file from `make container-pull`"
            )
        return found.group(0)
    path = Path(image)
    if not path.is_file():
        raise SubmissionError(
            f"image {image} does not exist on this node: pull it to the shared filesystem "
            "(make container-pull SIF_DIR=...) and export OPD_IMAGE=<the .sif it prints>"
        )
    return sif_sha256(path)


def pulled_from(image: str) -> str | None:
    """The Docker image digest a SIF was pulled from, when ``make container-pull`` named it
    (``opd-<hex>.sif``): a new pull of the same digest holds the same image but, apptainer stamping
    times into the file, another sha256."""
    found = re.fullmatch(r"opd-([0-9a-f]{64})\.sif", Path(image).name) if "://" not in image else None
    return f"sha256:{found.group(1)}" if found else None


def sif_sha256(path: Path) -> str:
    """The SIF's sha256; ``<sif>.sha256`` (written by ``make container-pull``, or here the first time)
    is trusted while it is newer than the SIF, so a 10 GB image is hashed once, not at every submission."""
    cache = path.with_name(path.name + ".sha256")
    if cache.is_file() and cache.stat().st_mtime >= path.stat().st_mtime:
        found = re.match(r"[0-9a-f]{64}\b", cache.read_text())
        if found:
            return "sha256:" + found.group(0)
    print(
        f"[opd] hashing {path} ({path.stat().st_size / 2**30:.1f} GiB) once; cached in {cache}",
        file=sys.stderr,
    )
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(1 << 24):
            digest.update(block)
    try:
        cache.write_text(f"{digest.hexdigest()}  {path.name}\n")
    except OSError:
        pass  # a read-only image directory: hash again next time
    return "sha256:" + digest.hexdigest()


# Config keys that name files or directories the job reads or writes (model.path, teacher_path, train_files,
# default_local_dir, ...); other strings that happen to be paths (e.g. verl's Prometheus file) are not bound.
PATH_KEY = re.compile(r"(path|paths|files|dir)$")


def _named_strings(tree, key: str = "") -> Iterable[tuple[str, str]]:
    if isinstance(tree, dict):
        for name, value in tree.items():
            yield from _named_strings(value, str(name))
    elif isinstance(tree, list | tuple):
        for value in tree:
            yield from _named_strings(value, key)
    elif isinstance(tree, str):
        yield key, tree


def host_paths(tree, every_key: bool = False) -> list[Path]:
    """Existing absolute paths among the values of ``tree`` under path-like keys (or all keys, for a
    dict of variables), as directories: a file's directory, so that files written next to it are seen."""
    found = []
    for key, text in _named_strings(tree):
        if not (every_key or PATH_KEY.search(key)) or not text.startswith("/") or "\n" in text:
            continue
        path = Path(os.path.normpath(text))
        if not path.exists():
            continue
        path = path if path.is_dir() else path.parent
        if len(path.parts) > 1 and path.parts[1] not in SYSTEM_DIRS:
            found.append(path)
    return found


def real_paths(path: Path) -> list[Path]:
    """``path`` and where it really lives: its real path, and for a directory the directories its
    symlinked entries point into (a Hugging Face snapshot's files link into ``../../blobs/``), which the
    container must see too for the links to resolve there."""
    found = [path]
    if os.path.realpath(path) != str(path):
        found.append(Path(os.path.realpath(path)))
    if path.is_dir():
        try:
            entries = list(os.scandir(path))
        except OSError:
            entries = []
        for entry in entries:
            if entry.is_symlink():
                target = Path(os.path.realpath(entry.path))
                found.append(target if target.is_dir() else target.parent)
    return found


def bind_list(paths: Iterable[str | Path]) -> list[str]:
    """Absolute, deduplicated, outermost first, with the real paths behind symlinks; a path inside
    another bound one is dropped."""
    named = {Path(os.path.abspath(p)) for p in paths if p}
    every = {real for path in named for real in real_paths(path)}
    resolved = sorted(every, key=lambda p: (len(p.parts), str(p)))
    binds: list[Path] = []
    for path in resolved:
        if any(c in str(path) for c in ":,"):
            raise SubmissionError(
                f"cannot bind {path} into the container: apptainer's --bind separates paths with ':' and ',' "
                "(rename or symlink it)"
            )
        if not any(path == b or b in path.parents for b in binds):
            binds.append(path)
    return [str(b) for b in binds]


_PULL_LOCK = threading.Lock()  # a sweep prepares its points in threads: one conversion per image


def convert_once(container: dict, runtime: str) -> str:
    """A ``docker://name@sha256:<hex>`` image as a SIF in ``sif_dir`` (``SIF_DIR``), converted here, once,
    at submission: converting on every node at job start races on shared caches and repeats minutes of
    work per node and attempt. The SIF is named by the digest, as ``make container-pull`` names it."""
    image = container["image"]
    digest = image_digest(image)
    if not container.get("sif_dir"):
        raise SubmissionError(
            f"image {image}: set SIF_DIR to a directory the nodes share (export SIF_DIR=/shared/sif): docker:// "
            "images are converted to a SIF once, at submission, not on every node"
        )
    sif = Path(container["sif_dir"]).resolve() / f"opd-{digest.removeprefix('sha256:')}.sif"
    with _PULL_LOCK:
        if not sif.is_file():
            sif.parent.mkdir(parents=True, exist_ok=True)
            partial = sif.with_name(sif.name + ".partial")
            print(f"[opd] converting {image} to {sif} once (apptainer pull)", file=sys.stderr, flush=True)
            result = subprocess.run(
                [runtime, "pull", "--force", str(partial), image], capture_output=True, text=True
            )
            if result.returncode != 0 or not partial.is_file():
                raise SubmissionError(f"{runtime} pull {image} failed: {result.stderr.strip()[-800:]}")
            os.replace(partial, sif)
    return str(sif)


def image_stat(image: str) -> str | None:
    """``size:mtime`` of a SIF file: the job checks it before starting and hashes the image again only if
    it changed (``jobs/container_exec.sh --verify``)."""
    if "://" in image:
        return None
    stat = Path(image).stat()
    return f"{stat.st_size}:{int(stat.st_mtime)}"


def resolve(container: dict, run_dir: Path, verl: dict, variables: dict[str, str]) -> None:
    """Check the runtime and the image, and record in ``container`` the image's digest and the binds the
    run needs before its config is composed (in the image): the run dir, the checkout, the paths named by
    the verl overrides and the recorded variables, and the config's own ``binds``."""
    runtime = check_runtime(container)
    source = container["image"] or ""
    if source.startswith("docker://"):
        container["image"] = convert_once(container, runtime)
    container["digest"] = image_digest(container["image"])
    container["pulled_from"] = (
        image_digest(source) if source.startswith("docker://") else pulled_from(container["image"])
    )
    container["image_stat"] = image_stat(container["image"])
    code = [REPO] if _code(container) == "bind" else []
    container["binds"] = bind_list(
        [run_dir, *code, *(container.get("binds") or [])]
        + host_paths(verl)
        + host_paths(variables, every_key=True)
    )


def bind_config_paths(container: dict, config: dict) -> None:
    """Add the paths that only the composed config names (recipe defaults)."""
    container["binds"] = bind_list(container["binds"] + host_paths(config))


def _code(container: dict) -> str:
    """``bind``: the submitting checkout's src/ runs on the image's packages; ``image``: the image's own opd."""
    code = container.get("code", "bind")
    if code not in ("bind", "image"):
        raise SubmissionError(
            f"container.code={code!r}: choose bind (the checkout's src/) or image (the image's opd)"
        )
    return code


def code_settings(container: dict, code: str | Path | None = None) -> dict[str, str]:
    """``code: bind``: the checkout's src/ (``code``: a run's snapshot of it) on the image's packages."""
    return {"PYTHONPATH": str(Path(code or REPO) / "src")} if _code(container) == "bind" else {}


def exec_prefix(
    container: dict, allowlist: Iterable[str], gpu: bool = True, code: str | Path | None = None
) -> list[str]:
    """``bash jobs/container_exec.sh ...  --`` for ``container`` (with ``binds`` already complete);
    ``gpu=False`` drops ``--nv`` (the login node composing the config has no GPU); ``code``: the run's
    code snapshot (its script and, with ``code: bind``, its package), else the checkout."""
    options = [o for o in container.get("options") or [] if gpu or o != "--nv"]
    settings = {
        **{k: str(v) for k, v in (container.get("set") or {}).items()},
        **code_settings(container, code),
    }
    settings[INSIDE] = container.get("digest") or "unrecorded"
    script = Path(code) / EXEC_SCRIPT.relative_to(REPO) if code else EXEC_SCRIPT
    prefix = ["bash", str(script), container["runtime"], container["image"]]
    if container.get("image_stat") and container.get("digest"):
        # the image file as recorded at submission: rehashed in the job only if its size or mtime moved
        prefix += ["--verify", f"{container['image_stat']}:{container['digest'].removeprefix('sha256:')}"]
    prefix += [arg for option in options for arg in ("--option", option)]
    prefix += [arg for path in container.get("binds") or [] for arg in ("--bind", path)]
    patterns = [*(container.get("pass") or []), *allowlist]
    prefix += [arg for pattern in dict.fromkeys(patterns) for arg in ("--pass", pattern)]
    prefix += [arg for name, value in settings.items() for arg in ("--set", f"{name}={value}")]
    return [*prefix, "--"]
