"""Build the tiny assets into a directory atomically, or reuse a complete build with the same key.

Layout of a build::

    data/train.parquet, data/val.parquet   verl RL rows
    teacher/, student/                     save_pretrained model + tokenizer
    accuracy.json                          val accuracy and sizes of both models
    build.json                             manifest, written last; its key says what was built
"""

from __future__ import annotations

import fcntl
import json
import os
import random
import shutil
import time
from contextlib import contextmanager
from pathlib import Path

from opd.tiny import recipe
from opd.tiny.recipe import BUILDER_VERSION, build_key

MANIFEST = "build.json"
ACCURACY = "accuracy.json"


def default_dir(seed: int = 0) -> Path:
    """``$OPD_TINY_DIR`` if set, else ``~/.cache/opd/tiny/<key>`` (so a recipe change never reuses old assets)."""
    if os.environ.get("OPD_TINY_DIR"):
        return Path(os.environ["OPD_TINY_DIR"]).expanduser()
    return Path.home() / ".cache" / "opd" / "tiny" / build_key(seed)


def is_complete_build(out_dir: Path, seed: int) -> bool:
    """Whether ``out_dir`` holds a finished build of the current recipe for ``seed``."""
    try:
        manifest = json.loads((out_dir / MANIFEST).read_text())
    except (OSError, ValueError):
        return False
    return manifest.get("key") == build_key(seed) and (out_dir / ACCURACY).is_file()


def build(out_dir: str | os.PathLike | None = None, seed: int = 0, force: bool = False) -> dict:
    """Build (or reuse) the assets in ``out_dir`` (default: ``default_dir(seed)``); returns accuracy.json.

    Refuses to replace a non-empty directory that is not a build unless ``force``.
    """
    out = Path(out_dir).expanduser().absolute() if out_dir is not None else default_dir(seed).absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    with _exclusive_lock(out.parent / f".{out.name}.lock"):
        if not force and is_complete_build(out, seed):
            print(f"opd.tiny: reusing the build in {out} (key {build_key(seed)})", flush=True)
            return json.loads((out / ACCURACY).read_text())
        if (
            not force
            and out.exists()
            and not (out / MANIFEST).exists()
            and (out.is_file() or any(out.iterdir()))
        ):
            raise FileExistsError(
                f"{out} is not empty and is not a tiny-assets build (no {MANIFEST}); "
                "choose another directory or pass --force (force=True) to replace it"
            )
        staging = out.parent / f".{out.name}.building-{os.getpid()}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        try:
            accuracy = _build_into(staging, seed)
            manifest = {"key": build_key(seed), "builder_version": BUILDER_VERSION, "seed": seed}
            (staging / MANIFEST).write_text(
                json.dumps({**manifest, "recipe": recipe.recipe()}, indent=2) + "\n"
            )
            _replace(out, staging)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    print(format_table(accuracy), flush=True)
    return accuracy


@contextmanager
def _exclusive_lock(path: Path):
    """Serialise builds of the same directory across processes (e.g. parallel test workers)."""
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _replace(out: Path, staging: Path) -> None:
    """Move the finished staging directory to ``out``, removing what was there only afterwards."""
    if not out.exists():
        os.rename(staging, out)
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(staging, out)
    if old.is_dir():
        shutil.rmtree(old)
    else:
        old.unlink()


def _build_into(root: Path, seed: int) -> dict:
    """Data, tokenizer, then teacher and student trained in parallel worker processes."""
    # Imported here so that default_dir() and reuse checks do not pay for torch/transformers.
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import numpy as np
    import torch

    from opd.tiny.task import make_splits, response_for, write_splits
    from opd.tiny.tokenizer import train_tokenizer
    from opd.tiny.train import train_and_save

    started = time.perf_counter()
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    splits = make_splits(seed, n_train=recipe.N_TRAIN, n_val=recipe.N_VAL)
    write_splits(splits, root / "data")
    train = splits["train"]
    corpus = [
        f"user\n{prompt[0]['content']}\nassistant\n{response_for(reward['ground_truth'])}"
        for prompt, reward in zip(train["prompt"], train["reward_model"], strict=True)
    ]
    tokenizer = train_tokenizer(corpus, recipe.VOCAB_SIZE)
    for role in ("teacher", "student"):
        tokenizer.save_pretrained(root / role)
    print(
        f"opd.tiny: data and tokenizer ({len(tokenizer)} tokens) ready; training teacher and student",
        flush=True,
    )

    jobs = {
        "teacher": (recipe.TEACHER, recipe.TEACHER_SFT, seed),
        "student": (recipe.STUDENT, recipe.STUDENT_SFT, seed + 1),
    }
    with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {role: pool.submit(train_and_save, role, str(root), *job) for role, job in jobs.items()}
        results = {role: future.result() for role, future in futures.items()}

    teacher, student = results["teacher"]["val_accuracy"], results["student"]["val_accuracy"]
    if teacher < recipe.TEACHER_MIN_ACCURACY or student > recipe.STUDENT_MAX_ACCURACY:
        raise RuntimeError(
            f"tiny build missed its targets (teacher {teacher:.3f} < {recipe.TEACHER_MIN_ACCURACY} "
            f"or student {student:.3f} > {recipe.STUDENT_MAX_ACCURACY}); the recipe needs retuning"
        )
    accuracy = {
        "builder_version": BUILDER_VERSION,
        "key": build_key(seed),
        "seed": seed,
        **results,
        "vocab_size": len(tokenizer),
        "n_train": len(splits["train"]),
        "n_val": len(splits["val"]),
        "seconds": round(time.perf_counter() - started, 1),
    }
    (root / ACCURACY).write_text(json.dumps(accuracy, indent=2) + "\n")
    return accuracy


def format_table(accuracy: dict) -> str:
    """A few lines summarising both models."""
    lines = [f"{'model':8} {'params':>8} {'val_acc':>8} {'format':>7} {'steps':>6} {'train_s':>8}"]
    for role in ("teacher", "student"):
        m = accuracy[role]
        lines.append(
            f"{role:8} {m['params']:>8,} {m['val_accuracy']:>8.3f} {m['format_rate']:>7.3f} "
            f"{m['steps']:>6} {m['train_seconds']:>8.1f}"
        )
    lines.append(f"n_train={accuracy['n_train']} n_val={accuracy['n_val']} build {accuracy['seconds']:.0f}s")
    return "\n".join(lines)
