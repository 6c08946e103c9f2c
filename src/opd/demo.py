"""python -m opd.demo [--task math|agent] [--steps N] [--loss-type T] [--teacher-signal S] [--out DIR]   (make demo, make demo-agent)

The embedded default experiment: build (or reuse) the tiny assets, then distil the tiny teacher into the
tiny student on its own rollouts with ``python -m opd.main_opd`` through verl on CPU (Ray, FSDP workers,
the ``hf`` rollout), and report held-out accuracy before and after as a table, ``demo_result.json`` and
``demo_curve.png`` (validation accuracy and divergence by step). The tiny-run overrides below also drive
the CPU end-to-end tests, so the demo is what the tests exercise.

Demo settings (measured on a 2-core machine): 128 prompts per step, one sample each (OPD needs no group of
samples), mini-batches of 64 prompts and two passes over each batch (four optimizer steps per rollout),
lr 2e-3 after 5 warm-up steps, 60 steps (~6 s each). The student starts at the steep part of its learning
curve (see ``opd.tiny.recipe``), so the teacher's signal lifts it by tens of points within that budget.

``--task agent`` runs agent OPD on the tiny agent task instead (``opd.tiny.agent_task``, ``make tiny-agent``):
the student plans train trips by calling DeepPlanning's ``query_train_info`` through verl's tool agent loop
over the generated databases, the teacher scores the student's own tokens, and the tool's answers are masked
out of the loss. Held-out success is read through the same loop (greedy).
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
AGENT_VAL_ACCURACY = "val-core/tiny_travel/acc/mean@1"
DIVERGENCE = "opd/divergence"


def tiny_opd_overrides(assets: Path, run_dir: Path, steps: int, save_freq: int = -1, test_freq: int = -1):
    """verl + opd overrides for a small OPD run (student distilled from the tiny teacher) on CPU."""
    return [
        *tiny_run_overrides(assets, run_dir, steps, save_freq, test_freq),
        f"opd.teacher_path={assets / 'teacher'}",
        "trainer.experiment_name=tiny_opd",
    ]


def tiny_run_overrides(
    assets: Path,
    run_dir: Path,
    steps: int,
    save_freq: int,
    test_freq: int,
    prompt_length: int = 96,
    response_length: int = 24,
    rollout_n: int = 4,
) -> list[str]:
    """Sizes, data and student shared by every tiny CPU run (math and agent)."""
    return [
        "platform=cpu",
        f"data.train_files={assets / 'data' / 'train.parquet'}",
        f"data.val_files={assets / 'data' / 'val.parquet'}",
        "data.train_batch_size=8",
        "data.val_batch_size=256",
        f"data.max_prompt_length={prompt_length}",
        f"data.max_response_length={response_length}",
        f"actor_rollout_ref.model.path={assets / 'student'}",
        f"actor_rollout_ref.rollout.n={rollout_n}",
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


def tiny_agent_overrides(
    assets: Path, run_dir: Path, steps: int, save_freq: int = -1, test_freq: int = -1
) -> list[str]:
    """verl + opd overrides for agent OPD of the tiny agent student (``opd.tiny.agent_build``) on CPU: the
    ``opd_agent`` recipe with the tiny task's data, databases, tool and reward."""
    from opd.tiny import recipe

    return [
        "experiment=opd_agent",
        *tiny_run_overrides(
            assets,
            run_dir,
            steps,
            save_freq,
            test_freq,
            prompt_length=recipe.AGENT_PROMPT_LENGTH,
            response_length=recipe.AGENT_RESPONSE_LENGTH,
            rollout_n=1,
        ),
        f"opd.max_length={recipe.AGENT_PROMPT_LENGTH + recipe.AGENT_RESPONSE_LENGTH}",
        f"opd.teacher_path={assets / 'teacher'}",
        f"agent.database_dir={assets / 'database'}",
        "agent.tool_names=[query_train_info]",
        "reward.custom_reward_function.path=pkg://opd.tiny.agent_task",
        "actor_rollout_ref.rollout.multi_turn.max_assistant_turns=4",
        f"actor_rollout_ref.rollout.multi_turn.max_tool_response_length={recipe.AGENT_MAX_TOOL_CHARS}",
        "actor_rollout_ref.rollout.val_kwargs.n=1",
        "actor_rollout_ref.rollout.val_kwargs.do_sample=false",
        "trainer.experiment_name=tiny_opd_agent",
    ]


def run_entry(module: str, overrides: list[str], log_path: Path) -> int:
    """Run an entry point in a fresh process (its own Ray cluster), teeing output to ``log_path``.

    The entry runs in its own session: if this caller is interrupted (Ctrl-C, a test's timeout), the whole
    tree (python, its Ray daemons and workers) is killed with it instead of running on unowned."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "w") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", module, *overrides],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            env=env,
            text=True,
            start_new_session=True,
        )
        try:
            for line in process.stdout:
                log.write(line)
                if "Training Progress" in line or "Traceback" in line or "Error:" in line:
                    print(line.rstrip()[-160:], flush=True)
            return process.wait()
        finally:
            kill_session(process)


def kill_session(process: subprocess.Popen) -> None:
    """SIGKILL every process of ``process``'s session (started with ``start_new_session``), if any is left."""
    import signal

    try:
        os.killpg(process.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    process.wait()


def read_metrics(run_dir: Path) -> list[dict]:
    path = run_dir / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def demo_overrides(loss_type: str, teacher_signal: str) -> list[str]:
    """Settings that make the student learn within the demo's budget (see the module docstring)."""
    return [
        "data.train_batch_size=128",
        "actor_rollout_ref.rollout.n=1",
        "actor_rollout_ref.actor.ppo_mini_batch_size=64",
        "actor_rollout_ref.actor.ppo_epochs=2",
        "actor_rollout_ref.actor.optim.lr=2e-3",
        "actor_rollout_ref.actor.optim.lr_warmup_steps=5",
        f"opd.loss_type={loss_type}",
        f"opd.teacher_signal={teacher_signal}",
        "trainer.experiment_name=tiny_opd_demo",
    ]


AGENT_DEMO_STEPS = 100


def agent_demo_overrides(loss_type: str, teacher_signal: str) -> list[str]:
    """Agent demo settings: 32 tasks per step, one rollout each, two optimizer steps per rollout."""
    return [
        "data.train_batch_size=32",
        "actor_rollout_ref.actor.ppo_mini_batch_size=16",
        "actor_rollout_ref.actor.optim.lr=1e-3",
        "actor_rollout_ref.actor.optim.lr_warmup_steps=3",
        f"opd.loss_type={loss_type}",
        f"opd.teacher_signal={teacher_signal}",
        "trainer.experiment_name=tiny_opd_agent_demo",
    ]


def validation_curve(metrics: list[dict], key: str = VAL_ACCURACY) -> list[dict]:
    """(step, held-out accuracy, mean divergence of that step's update) for every validated step."""
    return [
        {"step": m["step"], "val_accuracy": m["data"][key], "divergence": m["data"].get(DIVERGENCE)}
        for m in metrics
        if key in m["data"]
    ]


def plot_curve(metrics: list[dict], path: Path, key: str = VAL_ACCURACY) -> None:
    """Held-out accuracy (validated steps) and the divergence (every step) against the training step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = validation_curve(metrics, key)
    losses = [(m["step"], m["data"][DIVERGENCE]) for m in metrics if DIVERGENCE in m["data"]]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(10, 4))
    acc_ax.plot([c["step"] for c in curve], [c["val_accuracy"] for c in curve], marker="o")
    acc_ax.set(xlabel="step", ylabel="held-out accuracy (greedy)", title="student accuracy", ylim=(0, 1))
    loss_ax.plot([s for s, _ in losses], [v for _, v in losses])
    loss_ax.set(xlabel="step", ylabel="divergence per token", title="OPD loss")
    for ax in (acc_ax, loss_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--task", choices=("math", "agent"), default="math", help="math (default) | agent (tool calls)"
    )
    parser.add_argument("--steps", type=int, default=None, help="OPD training steps (default 60; agent 100)")
    parser.add_argument(
        "--test-freq", type=int, default=None, help="validate every N steps (default 10; agent 20)"
    )
    parser.add_argument(
        "--loss-type", default="forward_kl", help="reverse_kl | forward_kl | jsd (default forward_kl)"
    )
    parser.add_argument(
        "--teacher-signal", default="hidden", help="logits | hidden | topk | sampled (default hidden)"
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="run directory (default outputs/demo, agent: outputs/demo_agent)",
    )
    args = parser.parse_args(argv)
    agent = args.task == "agent"
    steps = args.steps or (AGENT_DEMO_STEPS if agent else 60)
    test_freq = args.test_freq or (20 if agent else 10)
    out = args.out or Path("outputs/demo_agent" if agent else "outputs/demo")
    key = AGENT_VAL_ACCURACY if agent else VAL_ACCURACY

    import opd.tiny

    started = time.time()
    if agent:
        from opd.tiny.agent_build import build_agent, default_agent_dir

        assets = default_agent_dir()
        accuracy = build_agent(assets)
    else:
        assets = Path(opd.tiny.default_dir())
        accuracy = opd.tiny.build(assets)
    run_dir = out.resolve()
    if (run_dir / METRICS_FILE).exists():  # a new run, not a resumed one: keep the curve to this run only
        (run_dir / METRICS_FILE).unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    print(
        f"[demo] assets: {assets}\n[demo] run dir: {run_dir}\n"
        f"[demo] {'agent ' if agent else ''}OPD ({args.loss_type}, teacher signal {args.teacher_signal}) of the "
        f"tiny student, {steps} steps"
    )
    if agent:
        overrides = [
            *tiny_agent_overrides(assets, run_dir, steps, test_freq=test_freq),
            *agent_demo_overrides(args.loss_type, args.teacher_signal),
        ]
    else:
        overrides = [
            *tiny_opd_overrides(assets, run_dir, steps, test_freq=test_freq),
            *demo_overrides(args.loss_type, args.teacher_signal),
        ]
    overrides.append("trainer.resume_mode=disable")
    code = run_entry("opd.main_opd", overrides, run_dir / "train.log")
    if code != 0:
        print(f"[demo] training failed (exit {code}); see {run_dir / 'train.log'}", file=sys.stderr)
        return code
    metrics = read_metrics(run_dir)
    curve = validation_curve(metrics, key)
    before, after = curve[0], curve[-1]
    result = {
        "teacher_val_accuracy": accuracy["teacher"]["val_accuracy"],
        "student_val_accuracy_before": before["val_accuracy"],
        "student_val_accuracy_after": after["val_accuracy"],
        "gain_points": round(100 * (after["val_accuracy"] - before["val_accuracy"]), 1),
        "steps": after["step"],
        "task": args.task,
        "loss_type": args.loss_type,
        "teacher_signal": args.teacher_signal,
        "curve": curve,
        "seconds": round(time.time() - started, 1),
    }
    (run_dir / "demo_result.json").write_text(json.dumps(result, indent=2))
    plot_curve(metrics, run_dir / "demo_curve.png", key)
    rows = [
        ("teacher", result["teacher_val_accuracy"]),
        (f"student before (step {before['step']})", before["val_accuracy"]),
        (f"student after OPD (step {after['step']})", after["val_accuracy"]),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"\n| {'model':<{width}} | held-out accuracy |\n|{'-' * (width + 2)}|-------------------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value:17.3f} |")
    print(
        f"\n[demo] {result['gain_points']:+.1f} points in {result['seconds']} s; "
        f"{run_dir / 'demo_result.json'}, {run_dir / 'demo_curve.png'}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
