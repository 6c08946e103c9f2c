"""python -m opd.paced plot RUN_DIR [--out PNG]   (also: make plot-paced RUN=RUN_DIR)
python -m opd.paced repro [--steps 30] [--seeds 0,1,2] [--variants unweighted,paced,...] [--out outputs/paced_repro]
   (also: make repro-paced)

PACED (``opd.sample_weighting``, ``opd.schedule``; README "Sample weighting (PACED)").

``plot``: a run's pass rates over training: the prompts per pass-rate bin at each step (never solved, by
quarter, always solved), the kept prompts and the teacher tokens saved; and the divergence per step,
coloured by the schedule's stage. Reads only ``metrics.jsonl``; imports no torch.

``repro``: the reproduction benchmark on the tiny task: OPD of the tiny student with 32 prompts x 4 samples
per step, unweighted or with pass-rate weights (``configs/sample_weighting/``), each with forward KL
throughout or forward KL for the first 30% of steps then reverse KL (``configs/divergence_schedule/``),
through verl on CPU (``opd.repro``); the variant ``self`` adds self-distillation (the teacher a frozen copy of
the student with the answer in its prompt, PACED-weighted, the schedule). Held-out accuracy curves, a
Markdown table (mean and spread over seeds, the prompts kept and the teacher's tokens saved per step) and a
plot under ``--out``; finished runs are reused. On SLURM the same comparison is ``make sweep-opd
EXP=opd_paced SWEEP=paced``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd.repro import METRICS_FILE  # the run files' one home on the login side (no torch)

BINS = ("0", "0-25", "25-50", "50-75", "75-100", "1")  # opd.distill.weights.PASS_RATE_BINS (no torch here)
LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd")


def pass_rate_series(run_dir: Path) -> list[dict]:
    """Per training step: the pass-rate bins' shares, kept prompts, teacher tokens saved and the divergence
    with the loss type it was."""
    from opd.repro import read_jsonl

    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: give a run directory (it holds {METRICS_FILE})")
    series = {}
    for record in read_jsonl(path, "paced"):
        data = record.get("data", {})
        if "paced/pass_rate/0" not in data:
            continue
        loss_type = next((t for t in LOSS_TYPES if f"opd/divergence/{t}" in data), None)
        series[record["step"]] = {
            "step": record["step"],
            "bins": [data[f"paced/pass_rate/{b}"] for b in BINS],
            "kept": data.get("paced/kept_prompt_fraction", 0.0),
            "saved": data.get("opd/teacher_tokens_saved", 0.0),
            "divergence": data.get("opd/divergence"),
            "loss_type": loss_type,
        }
    if not series:
        raise ValueError(
            f"{path} has no paced/* metrics: the run did not use opd.sample_weighting.method=paced"
        )
    return [series[s] for s in sorted(series)]


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = pass_rate_series(run_dir)
    steps = [s["step"] for s in series]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 4.5))
    bottom = [0.0] * len(steps)
    colours = plt.get_cmap("RdYlGn")([i / (len(BINS) - 1) for i in range(len(BINS))])
    for i, name in enumerate(BINS):
        values = [s["bins"][i] for s in series]
        left.bar(
            steps,
            values,
            bottom=bottom,
            width=0.9,
            color=colours[i],
            label=f"pass rate {name}%"
            if "-" in name
            else ("never solved" if name == "0" else "always solved"),
        )
        bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    left.plot(steps, [s["kept"] for s in series], color="k", lw=2, marker="o", label="prompts kept")
    left.set(
        xlabel="step", ylabel="share of prompts", title="prompts by pass rate (kept: 0 < p < 1)", ylim=(0, 1)
    )
    left.legend(loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=7)  # outside: the bars fill the axes
    saved = right.twinx()
    saved.bar(steps, [s["saved"] for s in series], color="0.85", width=0.9, label="teacher tokens saved")
    saved.set_ylabel("teacher tokens saved per step")
    right.set_zorder(saved.get_zorder() + 1)
    right.patch.set_visible(False)
    for loss_type in LOSS_TYPES:
        points = [(s["step"], s["divergence"]) for s in series if s["loss_type"] == loss_type]
        if points:
            right.plot(*zip(*points, strict=True), marker="o", ls="", label=loss_type)
    right.set(xlabel="step", ylabel="divergence (nats)", title="divergence per step, by the schedule's stage")
    right.legend(loc="upper right", fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# name -> (configs/sample_weighting, configs/divergence_schedule, extra verl overrides)
VARIANTS = {
    "unweighted": ("none", "constant", []),
    "paced": ("paced", "constant", []),
    "schedule": ("none", "forward_then_reverse", []),
    "paced_schedule": ("paced", "forward_then_reverse", []),
    "self": (
        "paced",
        "forward_then_reverse",
        ["opd.teacher=self", "opd.teacher_path=null", "opd.teacher_context.field=reward_model.ground_truth"],
    ),
}
DEFAULT_VARIANTS = ("unweighted", "paced", "schedule", "paced_schedule")


def variant_overrides(name: str) -> list[str]:
    from opd.repro import group_overrides

    if name not in VARIANTS:
        raise KeyError(f"unknown variant {name!r}; choose from {sorted(VARIANTS)}")
    weighting, schedule, extra = VARIANTS[name]
    return [
        *group_overrides("sample_weighting", weighting),
        *group_overrides("divergence_schedule", schedule),
        *extra,
    ]


def run_repro(args) -> int:
    import opd.tiny
    from opd.demo import tiny_opd_overrides
    from opd.repro import Comparison, run

    assets = Path(opd.tiny.default_dir())
    opd.tiny.build(assets)
    try:  # unknown names fail before any run
        variants = {name: variant_overrides(name) for name in args.variants.split(",")}
    except (KeyError, FileNotFoundError) as error:
        print(f"[paced] {error}", file=sys.stderr)
        return 2

    def base(run_dir: Path, seed: int) -> list[str]:
        return [
            *tiny_opd_overrides(assets, run_dir, args.steps, test_freq=args.test_freq),
            # 128 rollouts per step as in the demo (opd.demo), as 32 prompts x 4 samples: two optimizer steps
            # per epoch (verl counts ppo_mini_batch_size in prompts), two epochs; forward KL (the divergence the
            # tiny student learns from); lr 1e-3, half the demo's: at 2e-3 each prompt's 4 samples made the
            # unweighted student worse (0.185 -> 0.095 after 16 steps, measured), while 128 prompts x 1 sample
            # at 2e-3 rose to 0.28; reverse KL alone barely moves it (0.185 -> 0.20 at 5e-4)
            "data.train_batch_size=32",
            "actor_rollout_ref.rollout.n=4",
            "actor_rollout_ref.actor.ppo_mini_batch_size=16",
            "actor_rollout_ref.actor.ppo_epochs=2",
            "actor_rollout_ref.actor.optim.lr=1e-3",
            "actor_rollout_ref.actor.optim.lr_warmup_steps=5",
            "opd.loss_type=forward_kl",
            "opd.teacher_signal=hidden",
            f"data.seed={seed}",
        ]

    comparison = Comparison(
        tag="paced",
        title="PACED weighting and KL schedule, tiny task",
        variants=variants,
        base=base,
        columns={
            "prompts kept": ("paced/kept_prompt_fraction", ".2f"),
            "teacher tokens saved/step": ("opd/teacher_tokens_saved", ".0f"),
            "student phase s/step": ("opd/student_seconds", ".2f"),
        },
    )
    intro = (
        f"Tiny task, {args.steps} OPD steps (forward KL from hidden states; schedule: forward KL for the first "
        f"30% of steps, then reverse KL), 32 prompts x 4 samples per step, lr 1e-3, seeds {args.seeds}; held-out accuracy (greedy) of the "
        "tiny student (a dash: not logged, the run drops no prompt):"
    )
    return run(comparison, args, intro)


def main(argv: list[str] | None = None) -> int:
    from opd.repro import add_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plot", help="pass rates, kept prompts and the divergence by stage of a run (PNG)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="PNG path (default RUN_DIR/pass_rates.png)")
    r = sub.add_parser(
        "repro", help="the tiny task's comparison: unweighted / PACED x KL schedule (table + plot)"
    )
    add_arguments(r, steps=30, test_freq=10, out="outputs/paced_repro", seeds_help="data order")
    r.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, of {', '.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})",
    )
    args = parser.parse_args(argv)
    if args.command == "repro":
        return run_repro(args)
    try:
        out = plot(args.run_dir, args.out or args.run_dir / "pass_rates.png")
    except (FileNotFoundError, ValueError) as error:
        print(f"[paced] {error}", file=sys.stderr)
        return 2
    print(f"[paced] {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
