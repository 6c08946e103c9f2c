"""python -m opd.demo [--steps N] [--out DIR]   (also: make demo)

The embedded default: build (or reuse) the tiny assets, then run a short experiment on them through
verl on CPU and print a before/after table. Until the OPD entry point lands this is tiny GRPO on the
student; the same overrides drive the CPU end-to-end tests, so the demo is what the tests exercise.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from opd.runtime import METRICS_FILE

VAL_ACCURACY = "val-core/tiny_arith/acc/mean@1"


def tiny_grpo_overrides(assets: Path, run_dir: Path, steps: int, save_freq: int = -1, test_freq: int = -1):
    """verl overrides for a small GRPO run of the tiny student on CPU (one training process)."""
    return [
        *tiny_run_overrides(assets, run_dir, steps, save_freq, test_freq),
        "trainer.experiment_name=tiny_grpo",
    ]


def tiny_opd_overrides(assets: Path, run_dir: Path, steps: int, save_freq: int = -1, test_freq: int = -1):
    """verl + opd overrides for a small OPD run (student distilled from the tiny teacher) on CPU."""
    return [
        *tiny_run_overrides(assets, run_dir, steps, save_freq, test_freq),
        f"opd.teacher_path={assets / 'teacher'}",
        "trainer.experiment_name=tiny_opd",
    ]


def tiny_run_overrides(assets: Path, run_dir: Path, steps: int, save_freq: int, test_freq: int) -> list[str]:
    """Sizes, data and student shared by every tiny CPU run."""
    return [
        "platform=cpu",
        f"data.train_files={assets / 'data' / 'train.parquet'}",
        f"data.val_files={assets / 'data' / 'val.parquet'}",
        "data.train_batch_size=8",
        "data.val_batch_size=256",
        "data.max_prompt_length=96",
        "data.max_response_length=24",
        f"actor_rollout_ref.model.path={assets / 'student'}",
        "actor_rollout_ref.rollout.n=4",
        "actor_rollout_ref.rollout.temperature=1.0",
        "actor_rollout_ref.actor.ppo_mini_batch_size=8",
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu=8",  # divides the mini-batch for any rollout.n
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu=32",
        "actor_rollout_ref.ref.log_prob_micro_batch_size_per_gpu=32",
        "actor_rollout_ref.actor.optim.lr=1e-4",
        "actor_rollout_ref.actor.optim.weight_decay=0.0",
        f"trainer.total_training_steps={steps}",
        f"trainer.save_freq={save_freq}",
        f"trainer.test_freq={test_freq}",
        "trainer.val_before_train=true",
        f"trainer.default_local_dir={run_dir / 'checkpoints'}",
        f"hydra.run.dir={run_dir}",
    ]


def run_entry(module: str, overrides: list[str], log_path: Path) -> int:
    """Run an entry point in a fresh process (its own Ray cluster), teeing output to ``log_path``."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module, *overrides],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
        )
        for line in process.stdout:
            log.write(line)
            if "Training Progress" in line or "error" in line.lower():
                print(line.rstrip()[-160:], flush=True)
        return process.wait()


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="GRPO training steps (default 8)")
    parser.add_argument(
        "--out", type=Path, default=Path("outputs/demo"), help="run directory (default outputs/demo)"
    )
    args = parser.parse_args(argv)

    import opd.tiny

    started = time.time()
    assets = Path(opd.tiny.default_dir())
    accuracy = opd.tiny.build(assets)
    run_dir = args.out.resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    print(f"[demo] assets: {assets}\n[demo] run dir: {run_dir}; GRPO on the tiny student, {args.steps} steps")
    code = run_entry(
        "opd.main_grpo",
        tiny_grpo_overrides(assets, run_dir, args.steps, test_freq=args.steps),
        run_dir / "train.log",
    )
    if code != 0:
        print(f"[demo] training failed (exit {code}); see {run_dir / 'train.log'}", file=sys.stderr)
        return code
    validations = [
        (m["step"], m["data"][VAL_ACCURACY]) for m in read_metrics(run_dir) if VAL_ACCURACY in m["data"]
    ]
    (before_step, before), (after_step, after) = validations[0], validations[-1]
    result = {
        "teacher_val_accuracy": accuracy["teacher"]["val_accuracy"],
        "student_val_accuracy_before": before,
        "student_val_accuracy_after": after,
        "steps": after_step,
        "seconds": round(time.time() - started, 1),
        "algorithm": "grpo",
    }
    (run_dir / "demo_result.json").write_text(json.dumps(result, indent=2))
    rows = [
        ("teacher", result["teacher_val_accuracy"]),
        (f"student before (step {before_step})", before),
        (f"student after GRPO (step {after_step})", after),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\n| {'model':<{width}} | held-out accuracy |\n|{'-' * (width + 2)}|-------------------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value:17.3f} |")
    print(f"\n[demo] {result['seconds']} s; results in {run_dir / 'demo_result.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
