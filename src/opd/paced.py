"""python -m opd.paced repro [--steps 24] [--seeds 0,1,2] [--variants unweighted,paced,...] [--out outputs/paced_repro]
   (also: make repro-paced)

PACED (``opd.sample_weighting``, ``opd.schedule``; README "Sample weighting (PACED)").

``repro``: the reproduction benchmark on the tiny task: OPD of the tiny student with 32 prompts x 4 samples
per step, unweighted or with pass-rate weights (``configs/sample_weighting/``), each with reverse KL
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
            # the demo's learning settings (opd.demo) at 4 samples per prompt: 128 rollouts per step, two
            # optimizer steps per epoch (verl counts ppo_mini_batch_size in prompts), two epochs
            "data.train_batch_size=32",
            "actor_rollout_ref.rollout.n=4",
            "actor_rollout_ref.actor.ppo_mini_batch_size=16",
            "actor_rollout_ref.actor.ppo_epochs=2",
            "actor_rollout_ref.actor.optim.lr=2e-3",
            "actor_rollout_ref.actor.optim.lr_warmup_steps=5",
            "opd.loss_type=reverse_kl",
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
        f"Tiny task, {args.steps} OPD steps (reverse KL from hidden states; schedule: forward KL for the first "
        f"30% of steps), 32 prompts x 4 samples per step, seeds {args.seeds}; held-out accuracy (greedy) of the "
        "tiny student (a dash: not logged, the run drops no prompt):"
    )
    return run(comparison, args, intro)


def main(argv: list[str] | None = None) -> int:
    from opd.repro import add_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    r = sub.add_parser(
        "repro", help="the tiny task's comparison: unweighted / PACED x KL schedule (table + plot)"
    )
    add_arguments(r, steps=24, test_freq=8, out="outputs/paced_repro", seeds_help="data order")
    r.add_argument(
        "--variants",
        default=",".join(DEFAULT_VARIANTS),
        help=f"comma-separated, of {', '.join(VARIANTS)} (default: {','.join(DEFAULT_VARIANTS)})",
    )
    args = parser.parse_args(argv)
    return run_repro(args)


if __name__ == "__main__":
    sys.exit(main())
