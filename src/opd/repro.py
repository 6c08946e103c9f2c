"""The tiny task's reproduction benchmarks (``python -m opd.tip repro``, ``python -m opd.paced repro``): OPD
of the tiny student under several variants, the same steps and seeds, through verl on CPU; held-out accuracy
curves, a Markdown table (mean and spread over seeds) and a plot.

A variant is a list of verl overrides, normally a file of a config group under ``configs/`` (the one home of
each setting, which the SLURM sweeps use too). Finished runs are reused, so an interrupted benchmark
continues where it stopped; every variant runs once before the next seed, so a stopped benchmark still
compares them all. Imports no torch (the runs are subprocesses).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

METRICS_FILE = "metrics.jsonl"  # opd.runtime.METRICS_FILE (not imported: it pulls in the data checks)
VAL_ACCURACY = "val-core/tiny_arith/acc/mean@1"  # opd.demo.VAL_ACCURACY


def read_jsonl(path: Path, tag: str = "repro") -> list[dict]:
    """Records of a JSON-lines file; a malformed line is named and skipped (a run may be writing it)."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError as error:
            print(f"[{tag}] {path}:{number}: skipped, not JSON ({error.msg})", file=sys.stderr)
    return records


def group_overrides(group: str, name: str) -> list[str]:
    """verl-side overrides of ``configs/<group>/<name>.yaml`` (its ``verl:`` leaves; lists stay whole)."""
    from omegaconf import OmegaConf

    from opd.launch import CONFIGS
    from opd.launch.overrides import tree_overrides

    path = Path(CONFIGS) / group / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in path.parent.glob("*.yaml"))
        raise FileNotFoundError(f"no {group} {name!r} ({path}); choose from {known}")
    return tree_overrides(OmegaConf.to_container(OmegaConf.load(path))["verl"])


@dataclass
class Comparison:
    """What a benchmark compares and reports."""

    tag: str  # log prefix and the run names' prefix
    title: str  # the plot's title
    variants: dict[str, list[str]]  # name -> its verl overrides
    base: Callable[[Path, int], list[str]]  # (run dir, seed) -> overrides shared by every variant
    # table columns beyond accuracy: header -> (metric key, format), averaged over training steps and seeds
    columns: dict[str, tuple[str, str]] = field(default_factory=dict)
    legend: str = ""  # a column header whose value goes into the plot's legend


def add_arguments(parser, steps: int, test_freq: int, out: str, seeds_help: str) -> None:
    """The options every repro command shares: --steps, --test-freq, --seeds, --out."""
    parser.add_argument("--steps", type=int, default=steps, help=f"OPD steps per run (default {steps})")
    parser.add_argument(
        "--test-freq", type=int, default=test_freq, help=f"validate every N steps (default {test_freq})"
    )
    parser.add_argument("--seeds", default="0,1,2", help=f"comma-separated seeds ({seeds_help})")
    parser.add_argument("--out", type=Path, default=Path(out), help=f"runs, table and plot (default {out})")


def finished(run_dir: Path, steps: int) -> bool:
    path = run_dir / METRICS_FILE
    return path.is_file() and any(
        r.get("step") == steps and VAL_ACCURACY in r.get("data", {}) for r in read_jsonl(path)
    )


def run(comparison: Comparison, args, intro: str) -> int:
    """Every (seed, variant) run that is not finished yet, then the table and the plot under ``args.out``
    (``args``: the options of ``add_arguments``)."""
    from opd.demo import run_entry

    tag = comparison.tag
    out, steps, seeds = args.out.resolve(), args.steps, [int(s) for s in args.seeds.split(",")]
    started = time.time()
    for seed in seeds:
        for name, overrides in comparison.variants.items():
            run_dir = out / f"{name}_seed{seed}"
            if finished(run_dir, steps):
                print(f"[{tag}] {run_dir.name}: done before, reused", flush=True)
                continue
            if (run_dir / METRICS_FILE).exists():
                (run_dir / METRICS_FILE).unlink()  # an unfinished run restarts from scratch
            run_dir.mkdir(parents=True, exist_ok=True)
            print(f"[{tag}] {run_dir.name}: {steps} steps ({time.time() - started:.0f} s so far)", flush=True)
            code = run_entry(
                "opd.main_opd",
                [
                    *comparison.base(run_dir, seed),
                    *overrides,
                    f"trainer.experiment_name={tag}_{name}_seed{seed}",
                    "trainer.resume_mode=disable",
                ],
                run_dir / "train.log",
            )
            if code != 0:
                print(
                    f"[{tag}] {run_dir.name} failed (exit {code}); see {run_dir / 'train.log'}",
                    file=sys.stderr,
                )
                return code
    results = summarise(comparison, seeds, out)
    table = "\n".join([intro, "", *table_lines(comparison, results)])
    (out / "table.md").write_text(table + "\n")
    (out / "results.json").write_text(
        json.dumps({"seeds": list(seeds), "steps": steps, "results": results}, indent=2)
    )
    plot(comparison, results, out / "curves.png")
    print(
        "\n" + table + f"\n\n[{tag}] {out / 'table.md'}, {out / 'curves.png'} ({time.time() - started:.0f} s)"
    )
    return 0


def summarise(comparison: Comparison, seeds: Sequence[int], out: Path) -> dict:
    results = {}
    for name in comparison.variants:
        runs = []
        for seed in seeds:
            records = read_jsonl(out / f"{name}_seed{seed}" / METRICS_FILE, comparison.tag)
            curve = [(r["step"], r["data"][VAL_ACCURACY]) for r in records if VAL_ACCURACY in r["data"]]
            train = [r["data"] for r in records if "opd/divergence" in r["data"]]
            means = {}
            for header, (key, _) in comparison.columns.items():
                values = [d[key] for d in train if key in d]
                means[header] = statistics.mean(values) if values else None  # not logged by this variant

            runs.append({"seed": seed, "curve": curve, **means})
        finals = [run["curve"][-1][1] for run in runs]
        results[name] = {
            "runs": runs,
            "before": statistics.mean(run["curve"][0][1] for run in runs),
            "after_mean": statistics.mean(finals),
            "after_std": statistics.stdev(finals) if len(finals) > 1 else 0.0,
            "after_min": min(finals),
            "after_max": max(finals),
            **{header: _mean([run[header] for run in runs]) for header in comparison.columns},
        }
    return results


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.mean(present) if present else None


def _format(value: float | None, fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def table_lines(comparison: Comparison, results: dict) -> list[str]:
    headers = ["variant", "before", "after (mean ± std)", "min-max", "gain (points)", *comparison.columns]
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for name, r in results.items():
        extra = [_format(r[header], fmt) for header, (_, fmt) in comparison.columns.items()]
        lines.append(
            f"| {name} | {r['before']:.3f} | {r['after_mean']:.3f} ± {r['after_std']:.3f} | "
            f"{r['after_min']:.3f}-{r['after_max']:.3f} | {100 * (r['after_mean'] - r['before']):+.1f} | "
            + " | ".join(extra)
            + (" |" if extra else "|")
        )
    return lines


def plot(comparison: Comparison, results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, r in results.items():
        steps = [s for s, _ in r["runs"][0]["curve"]]
        per_step = list(zip(*[[a for _, a in run["curve"]] for run in r["runs"]], strict=False))
        mean = [sum(v) / len(v) for v in per_step]
        label = name
        if comparison.legend:
            _, fmt = comparison.columns[comparison.legend]
            label = f"{name} ({comparison.legend} {_format(r[comparison.legend], fmt)})"
        line = ax.plot(steps[: len(mean)], mean, marker="o", label=label)[0]
        ax.fill_between(
            steps[: len(mean)],
            [min(v) for v in per_step],
            [max(v) for v in per_step],
            color=line.get_color(),
            alpha=0.15,
        )
    ax.set(
        xlabel="step", ylabel="held-out accuracy (greedy)", title=f"{comparison.title} (band: seeds' range)"
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
