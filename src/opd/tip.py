"""python -m opd.tip plot RUN_DIR [--out PNG]   (also: make plot-tokens RUN=RUN_DIR)
python -m opd.tip repro [--steps 30] [--seeds 0,1,2] [--rules all,entropy_50,...] [--out outputs/tip_repro]
   (also: make repro-tip)

Token importance (``opd.token_selection``; README "Token selection").

``plot``: a run's diagnostics: the quadrant scatter of sampled tokens (normalised student entropy against
divergence, kept tokens marked) at the first and last sampled steps, and the four quadrants' shares and the
kept fraction over training. Reads only what a run writes: ``metrics.jsonl`` (``opd/tokens/*``,
``opd/selected_token_fraction``) and, when ``opd.token_selection.sample_pairs > 0``,
``token_pairs.jsonl``. Imports no torch.

``repro``: the reproduction benchmark on the tiny task: OPD of the tiny student with each selection of
``configs/token_selection/`` (every token, entropy 50%, Soft-OR 50%, Q3 20%, random 50%), the same steps and
seeds, through verl on CPU with the demo's settings (``opd.demo``); held-out accuracy curves, a Markdown
table (mean and spread over seeds) and a plot under ``--out``. Finished runs are reused, so an interrupted
benchmark continues where it stopped. On SLURM the same comparison is ``make sweep-opd EXP=opd_tip
SWEEP=tip_rules``.

Quadrants: Q1 high entropy / high divergence, Q2 high / low, Q3 low entropy / high divergence (confident
and wrong), Q4 low / low; high means above the threshold (default: the median of each micro-batch).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from opd.repro import METRICS_FILE  # the run files' one home on the login side (no torch)

PAIRS_FILE = "token_pairs.jsonl"  # opd.distill.trainer.TOKEN_PAIRS_FILE
QUADRANTS = ("q1", "q2", "q3", "q4")
LABELS = {
    "q1": "Q1 high H, high D",
    "q2": "Q2 high H, low D",
    "q3": "Q3 low H, high D (confident, wrong)",
    "q4": "Q4 low H, low D",
}


def read_jsonl(path: Path) -> list[dict]:
    from opd.repro import read_jsonl as read

    return read(path, "tip")


def quadrant_series(run_dir: Path) -> list[dict]:
    """Per training step (the last record of a step wins, as after a resume): the four shares and the
    kept fraction."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist: is {run_dir} a run directory (it holds metrics.jsonl)?"
        )
    by_step = {}
    for record in read_jsonl(path):
        data = record.get("data", {})
        if "opd/tokens/q1_share" in data:
            by_step[record["step"]] = {
                "step": record["step"],
                **{q: data[f"opd/tokens/{q}_share"] for q in QUADRANTS},
                "kept": data.get("opd/selected_token_fraction", 1.0),
            }
    if not by_step:
        raise ValueError(
            f"{path} has no opd/tokens/* metrics: the run is not an OPD run, or predates the quadrant metrics"
        )
    return [by_step[s] for s in sorted(by_step)]


def token_pairs(run_dir: Path) -> dict[int, dict]:
    """step -> {entropy, divergence, kept} lists (empty when the run sampled none)."""
    path = run_dir / PAIRS_FILE
    if not path.is_file():
        return {}
    return {r["step"]: r for r in read_jsonl(path)}


def plot(run_dir: Path, out: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = quadrant_series(run_dir)
    pairs = token_pairs(run_dir)
    scatter_steps = sorted({min(pairs), max(pairs)}) if pairs else []
    fig, axes = plt.subplots(1, 1 + len(scatter_steps), figsize=(5.5 * (1 + len(scatter_steps)), 4.5))
    axes = list(axes) if len(scatter_steps) else [axes]
    for ax, step in zip(axes, scatter_steps, strict=False):
        record = pairs[step]
        kept = record["kept"]
        for flag, colour, name in ((0, "0.6", "dropped"), (1, "tab:red", "kept")):
            xs = [h for h, k in zip(record["entropy"], kept, strict=True) if k == flag]
            ys = [d for d, k in zip(record["divergence"], kept, strict=True) if k == flag]
            ax.scatter(xs, ys, s=6, c=colour, alpha=0.6, label=f"{name} ({len(xs)})")
        for values, line in ((record["entropy"], ax.axvline), (record["divergence"], ax.axhline)):
            line(sorted(values)[len(values) // 2], color="k", lw=0.8, ls="--")
        ax.set(
            xlabel="student entropy / log V",
            ylabel="divergence per token (nats)",
            title=f"step {step}: sampled tokens (dashed: medians)",
        )
        ax.set_yscale("symlog", linthresh=1e-4)
        ax.set_ylim(bottom=0)
        ax.legend(loc="upper right", fontsize=8)
    ax = axes[-1]
    steps = [s["step"] for s in series]
    shares = [[s[q] for s in series] for q in QUADRANTS]
    if len(steps) < 30:  # stacked bars: readable for a few steps (a stack plot of one step is invisible)
        bottom = [0.0] * len(steps)
        for q, values in zip(QUADRANTS, shares, strict=True):
            ax.bar(steps, values, bottom=bottom, label=LABELS[q], alpha=0.8, width=0.8)
            bottom = [b + v for b, v in zip(bottom, values, strict=True)]
    else:
        ax.stackplot(steps, *shares, labels=[LABELS[q] for q in QUADRANTS], alpha=0.8)
    ax.plot(steps, [s["kept"] for s in series], color="k", lw=2, marker="o", label="kept fraction")
    ax.set(xlabel="step", ylabel="share of target tokens", title="quadrant shares over training", ylim=(0, 1))
    ax.legend(loc="lower left", fontsize=7)
    for a in axes:
        a.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


# --- the reproduction benchmark ----------------------------------------------------------------------------

REPRO_RULES = ("all", "entropy_50", "soft_or_50", "q3_20", "random_50")  # configs/token_selection/*.yaml


def run_repro(args) -> int:
    import opd.tiny
    from opd.demo import demo_overrides, tiny_opd_overrides
    from opd.repro import Comparison, group_overrides, run

    assets = Path(opd.tiny.default_dir())
    opd.tiny.build(assets)
    # unknown names fail before any run
    variants = {rule: group_overrides("token_selection", rule) for rule in args.rules.split(",")}

    def base(run_dir: Path, seed: int) -> list[str]:
        return [
            *tiny_opd_overrides(assets, run_dir, args.steps, test_freq=args.test_freq),
            *demo_overrides(args.loss_type, "hidden"),
            f"opd.token_selection.seed={seed}",
            f"data.seed={seed}",
        ]

    comparison = Comparison(
        tag="tip",
        title="TIP token selection, tiny task",
        variants=variants,
        base=base,
        columns={
            "kept fraction": ("opd/selected_token_fraction", ".3f"),
            "student phase s/step": ("opd/student_seconds", ".2f"),
        },
        legend="kept fraction",
    )
    intro = (
        f"Tiny task, {args.steps} OPD steps ({args.loss_type} from hidden states), seeds {args.seeds}; held-out "
        "accuracy (greedy) of the tiny student:"
    )
    return run(comparison, args, intro)


def main(argv: list[str] | None = None) -> int:
    from opd.repro import add_arguments

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plot", help="quadrant scatter and shares of a run directory (PNG)")
    p.add_argument("run_dir", type=Path)
    p.add_argument("--out", type=Path, help="PNG path (default RUN_DIR/token_quadrants.png)")
    r = sub.add_parser("repro", help="the tiny task's comparison of selection rules (table + plot)")
    add_arguments(r, steps=30, test_freq=10, out="outputs/tip_repro", seeds_help="data order, random rule")
    r.add_argument("--rules", default=",".join(REPRO_RULES), help="configs/token_selection/ names")
    r.add_argument(
        "--loss-type", default="forward_kl", help="the divergence (default: the demo's forward_kl)"
    )
    args = parser.parse_args(argv)
    if args.command == "repro":
        return run_repro(args)
    try:
        out = plot(args.run_dir, args.out or args.run_dir / "token_quadrants.png")
    except (FileNotFoundError, ValueError) as error:
        print(f"[tip] {error}", file=sys.stderr)
        return 2
    print(f"[tip] {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
