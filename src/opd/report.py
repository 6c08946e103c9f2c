"""python -m opd.report DIR [--out OUT_DIR] [--metric KEY]          (make report SWEEP=DIR)

A sweep's, a submission's or a run's results side by side: one row per run with the overrides that tell the
runs apart, the final and best value of every validation metric per data source (``val-core/<source>/...``
of verl's validation, or ``eval_results.json`` of an evaluation), steps done and planned, wall time, peak
memory and tokens/s, as Markdown (``report.md``) and CSV (``report.csv``), with plots: validation curves per
run (``val_curves.png``), training curves (``train_curves.png``: the OPD divergence, else the reward) and the
final value of the primary metric by run (``final.png``).

DIR is any of:

- a sweep or submission directory (``jobs.tsv``, as ``make sweep-*`` and ``make submit`` print): its runs,
  in submission order, each with its sweep point;
- a run directory (``metrics.jsonl``, ``eval_results.json`` or ``config.yaml``): that run;
- any other directory: every run directory below it (a pipeline's stages, a folder of local runs).

It reads only what runs write (``metrics.jsonl``, ``training_plan.json``, ``config.yaml``, ``overrides.txt``,
``logs/<job>.<attempt>/done.json``, ``eval_results.json``), imports no torch, and works while runs are going:
a run that has not finished is marked ``partial`` (``failed`` when its job recorded an error). A run whose
files cannot be read is named with the file and the reason, and the other runs are still reported.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path

from opd.launch import JOBS_FILE  # opd.launch itself imports only pathlib

METRICS_FILE = "metrics.jsonl"
EVAL_FILE = "eval_results.json"
RUN_MARKERS = (METRICS_FILE, EVAL_FILE, "config.yaml")
VALIDATION_PREFIX = "val-core/"
# training curves, first present wins: the OPD divergence, then GRPO's reward
TRAIN_CURVE_KEYS = ("opd/divergence", "critic/score/mean")
THROUGHPUT_KEY = "perf/throughput"  # verl: tokens per second per device of the step
STEP_TIME_KEYS = ("timing_s/step", "timing_s/testing")
# peak device memory: verl's allocator peaks (GPU) and the OPD phases' own (GPU); CPU runs record neither
MEMORY_KEY = re.compile(r"^(perf/max_memory_(allocated|reserved)_gb|opd/\w+_peak_memory_gb)$")
SEARCH_DEPTH = 4  # how far below DIR run directories are looked for


class ReportError(Exception):
    """DIR holds no run to report."""


@dataclass
class Run:
    """One run directory and what its files say."""

    path: Path
    point: str = ""  # the sweep point (jobs.tsv) or the login overrides (overrides.txt)
    job: str = ""
    steps: dict[int, dict] = field(default_factory=dict)  # step -> merged metrics of that step
    planned_steps: int | None = None
    eval_results: dict = field(default_factory=dict)  # source -> {metric: value}
    job_error: str | None = None
    job_done: bool = False
    problem: str | None = None  # why the run could not be read

    @property
    def last_step(self) -> int | None:
        return max(self.steps, default=None)

    @property
    def status(self) -> str:
        if self.problem:
            return "unreadable"
        if self.job_error:
            return "failed"
        if self.eval_results or self.job_done:
            return "done"
        if (
            self.planned_steps is not None
            and self.last_step is not None
            and self.last_step >= self.planned_steps
        ):
            return "done"
        return "partial"

    def series(self, key: str) -> list[tuple[int, float]]:
        return [(step, data[key]) for step, data in sorted(self.steps.items()) if _number(data.get(key))]


def _number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# ---- reading runs ----------------------------------------------------------------------------------------


def read_metrics(path: Path) -> dict[int, dict]:
    """``metrics.jsonl`` -> {step: metrics}; verl may log a step in several lines (merged). The last line may
    be half-written by a running job and is skipped; any other bad line raises ValueError naming it."""
    steps: dict[int, dict] = {}
    lines = path.read_text(encoding="utf-8").split("\n")
    complete = lines[:-1]  # text after the last newline is a line still being written
    for number, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as error:
            raise ValueError(f"{path}:{number}: not JSON ({error.msg}); the file is damaged") from None
        if not isinstance(record, dict) or not isinstance(record.get("data"), dict):
            raise ValueError(f'{path}:{number}: expected {{"step": N, "data": {{...}}}}, got {line[:80]!r}')
        step = record.get("step")
        if not isinstance(step, int):
            raise ValueError(f"{path}:{number}: step {step!r} is not an integer")
        steps.setdefault(step, {}).update(record["data"])
    return steps


def _planned_steps(path: Path) -> int | None:
    # the trainer writes it into trainer.default_local_dir: the run directory under SLURM, checkpoints/ in
    # the local runs of opd.demo and the tests
    for plan in (path / "training_plan.json", path / "checkpoints" / "training_plan.json"):
        if plan.is_file():
            return int(json.loads(plan.read_text())["total_training_steps"])
    config = path / "config.yaml"
    if config.is_file():
        import yaml

        steps = ((yaml.safe_load(config.read_text()) or {}).get("trainer") or {}).get("total_training_steps")
        return int(steps) if isinstance(steps, int) else None
    return None


def _job_outcome(path: Path, job: str) -> tuple[bool, str | None]:
    """(finished, error) of the job's last attempt (``logs/<job>.<attempt>/done.json``)."""
    pattern = f"{job}.*/done.json" if job else "*/done.json"
    attempts = sorted((path / "logs").glob(pattern), key=_attempt_number)
    if not attempts:
        return False, None
    done = json.loads(attempts[-1].read_text())
    if done.get("error") or done.get("code"):
        return False, done.get("error") or f"exit code {done.get('code')}"
    return True, None


def _attempt_number(done: Path) -> int:
    """``logs/<job>.<attempt>/done.json`` -> attempt (0 where the directory is named otherwise)."""
    attempt = done.parent.name.rsplit(".", 1)[-1]
    return int(attempt) if attempt.isdigit() else 0


def _login_overrides(path: Path) -> str:
    """The login overrides a run was submitted with (``overrides.txt``'s first section)."""
    file = path / "overrides.txt"
    if not file.is_file():
        return ""
    section = file.read_text().split("# verl overrides")[0]
    return " ".join(line for line in section.splitlines() if line and not line.startswith("#"))


def read_run(path: Path, point: str = "", job: str = "") -> Run:
    run = Run(path=path, point=point or _login_overrides(path), job=job)
    try:
        if (path / METRICS_FILE).is_file():
            run.steps = read_metrics(path / METRICS_FILE)
        if (path / EVAL_FILE).is_file():
            results = json.loads((path / EVAL_FILE).read_text()).get("results")
            if not isinstance(results, dict):
                raise ValueError(f'{path / EVAL_FILE}: no "results" mapping')
            run.eval_results = results
        run.planned_steps = _planned_steps(path)
        run.job_done, run.job_error = _job_outcome(path, job)
    except (OSError, ValueError, KeyError, TypeError) as error:
        run.problem = str(error)
    return run


def find_runs(directory: Path) -> list[Run]:
    """The runs of DIR (see the module docstring), in submission order or else path order."""
    directory = directory.expanduser()
    if not directory.is_dir():
        raise ReportError(f"{directory} is not a directory: pass a sweep, submission or run directory")
    if (directory / JOBS_FILE).is_file():
        runs = []
        for line in (directory / JOBS_FILE).read_text().splitlines():
            if line.strip():
                job, path, point = (line.split("\t") + ["", ""])[:3]
                runs.append(read_run(Path(path), point, job))
        return runs
    if any((directory / marker).is_file() for marker in RUN_MARKERS):
        return [read_run(directory)]
    found = sorted(
        {
            marker.parent
            for depth in range(1, SEARCH_DEPTH + 1)
            for name in RUN_MARKERS
            for marker in directory.glob("/".join(["*"] * depth) + "/" + name)
            if "code" not in marker.relative_to(directory).parts  # the submitted package's configs
        }
    )
    # a run's own subdirectories (checkpoints, logs) are no runs of their own
    found = [path for path in found if not any(other in path.parents for other in found)]
    if not found:
        raise ReportError(
            f"no runs under {directory}: none of {', '.join(RUN_MARKERS)} within {SEARCH_DEPTH} levels "
            f"(pass a directory printed by make sweep-*/make submit, or a run directory)"
        )
    return [read_run(path) for path in found]


# ---- the table -------------------------------------------------------------------------------------------


def distinguishing_overrides(runs: list[Run]) -> list[str]:
    """Per run, the overrides whose value differs between the runs (all of them for a single run)."""
    parsed = [dict(_split(o) for o in run.point.split()) for run in runs]
    keys = sorted({key for overrides in parsed for key in overrides})
    varying = (
        [k for k in keys if len({overrides.get(k) for overrides in parsed}) > 1] if len(runs) > 1 else keys
    )
    return [
        " ".join(f"{k.lstrip('+')}={overrides[k]}" for k in varying if k in overrides) for overrides in parsed
    ]


def _split(override: str) -> tuple[str, str]:
    key, _, value = override.partition("=")
    return key, value


def validation_keys(runs: list[Run]) -> list[str]:
    # the spread of best@N over bootstrap draws (".../std") is no result of its own
    keys = {
        key
        for run in runs
        for data in run.steps.values()
        for key in data
        if key.startswith(VALIDATION_PREFIX) and not key.endswith("/std")
    }
    return sorted(keys)


def eval_keys(runs: list[Run]) -> list[str]:
    keys = set()
    for run in runs:
        for source, scores in run.eval_results.items():
            keys |= {
                f"eval/{source}/{metric}"
                for metric, value in scores.items()
                if metric != "problems" and _number(value)
            }
    return sorted(keys)


def rows(runs: list[Run]) -> list[dict]:
    """One dict per run: the report's columns (numbers unrounded)."""
    overrides = distinguishing_overrides(runs)
    val_keys, ev_keys = validation_keys(runs), eval_keys(runs)
    table = []
    for run, differs in zip(runs, overrides, strict=True):
        row: dict = {
            "run": str(run.path),
            "job": run.job,
            "overrides": differs,
            "status": run.status,
            "step": run.last_step,
            "planned_steps": run.planned_steps,
        }
        for key in val_keys:
            series = run.series(key)
            row[f"final {key}"] = series[-1][1] if series else None
            row[f"best {key}"] = max(value for _, value in series) if series else None
        for key in ev_keys:
            _, source, metric = key.split("/", 2)
            row[key] = run.eval_results.get(source, {}).get(metric)
        seconds = [value for key in STEP_TIME_KEYS for _, value in run.series(key)]
        row["wall_s"] = sum(seconds) if seconds else None
        memory = [
            v for data in run.steps.values() for k, v in data.items() if MEMORY_KEY.match(k) and _number(v)
        ]
        row["peak_memory_gb"] = max(memory) if memory else None
        throughput = [value for _, value in run.series(THROUGHPUT_KEY)]
        row["tokens_per_s"] = sum(throughput) / len(throughput) if throughput else None
        row["problem"] = run.problem or run.job_error or ""
        table.append(row)
    return table


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value.is_integer() and abs(value) >= 100:
            return f"{value:.0f}"
        return f"{value:.4g}" if abs(value) < 100 else f"{value:.1f}"
    return str(value)


def markdown(table: list[dict], directory: Path) -> str:
    if not table:
        return f"# Report: {directory}\n\nNo runs.\n"
    columns = [
        c for c in table[0] if c not in ("run", "problem") and any(r[c] not in (None, "") for r in table)
    ]
    names = [Path(r["run"]).name if len(table) > 1 else r["run"] for r in table]
    header = ["run", *columns]
    lines = [
        f"# Report: {directory}",
        "",
        f"{len(table)} run(s): "
        + ", ".join(
            f"{sum(r['status'] == s for r in table)} {s}" for s in sorted({r["status"] for r in table})
        ),
        "",
        "| " + " | ".join(header) + " |",
        "|" + "|".join("---" for _ in header) + "|",
    ]
    for name, row in zip(names, table, strict=True):
        lines.append("| " + " | ".join([name, *(_cell(row[c]) for c in columns)]) + " |")
    problems = [(name, row["problem"]) for name, row in zip(names, table, strict=True) if row["problem"]]
    if problems:
        lines += ["", "Problems:", ""] + [f"- {name}: {problem}" for name, problem in problems]
    lines += [
        "",
        "final/best: the last and the highest value of a validation metric over the validated steps; "
        "wall_s: the steps' and validations' time; tokens_per_s: verl's perf/throughput, mean over steps; "
        "'-': not recorded (peak memory is recorded on GPU only).",
    ]
    return "\n".join(lines) + "\n"


def write_csv(table: list[dict], path: Path) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        columns = list(table[0]) if table else ["run"]
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        for row in table:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})


# ---- plots -----------------------------------------------------------------------------------------------


def primary_metric(table: list[dict], val_keys: list[str], ev_keys: list[str]) -> str | None:
    """The metric of the final-value plot: a validation accuracy's mean@N first, else the first metric."""
    for keys, prefix in ((val_keys, "final "), (ev_keys, "")):
        for key in sorted(keys, key=lambda k: ("/acc/" not in k, "mean@" not in k, k)):
            return prefix + key
    return None


def plot(runs: list[Run], table: list[dict], out: Path, metric: str | None = None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    labels = [row["overrides"] or Path(row["run"]).name for row in table]
    val_keys = validation_keys(runs)
    if val_keys:
        fig, axes = plt.subplots(1, len(val_keys), figsize=(5 * len(val_keys), 4), squeeze=False)
        for ax, key in zip(axes[0], val_keys, strict=True):
            for run, label in zip(runs, labels, strict=True):
                series = run.series(key)
                if series:
                    ax.plot(*zip(*series, strict=True), marker="o", label=label)
            ax.set_title(key.removeprefix(VALIDATION_PREFIX), fontsize=9)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out / "val_curves.png", plt))
    train_key = next((k for k in TRAIN_CURVE_KEYS if any(run.series(k) for run in runs)), None)
    if train_key:
        fig, ax = plt.subplots(figsize=(6, 4))
        for run, label in zip(runs, labels, strict=True):
            series = run.series(train_key)
            if series:
                ax.plot(*zip(*series, strict=True), label=label)
        ax.set_title(train_key)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        written.append(_save(fig, out / "train_curves.png", plt))
    metric = metric or primary_metric(table, val_keys, eval_keys(runs))
    if metric and any(row.get(metric) is not None for row in table):
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(table)), 4))
        values = [row.get(metric) or 0.0 for row in table]
        bars = ax.bar(
            range(len(table)), values, color=["C0" if r["status"] == "done" else "C7" for r in table]
        )
        ax.bar_label(bars, labels=[_cell(row.get(metric)) for row in table], fontsize=8)
        ax.set_xticks(range(len(table)), labels, rotation=20, ha="right", fontsize=7)
        ax.set_title(f"{metric.removeprefix('final ')}\n(grey: run not finished)", fontsize=9)
        fig.tight_layout()
        written.append(_save(fig, out / "final.png", plt))
    return written


def _save(fig, path: Path, plt) -> Path:
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


# ---- entry point -----------------------------------------------------------------------------------------


def report(directory: Path, out: Path | None = None, metric: str | None = None) -> dict:
    """Write the report of DIR into OUT (default DIR/report); returns the table and the files written."""
    runs = find_runs(directory)
    out = (out or directory / "report").expanduser()
    out.mkdir(parents=True, exist_ok=True)
    table = rows(runs)
    readable = [(run, row) for run, row in zip(runs, table, strict=True) if not run.problem]
    (out / "report.md").write_text(markdown(table, directory))
    write_csv(table, out / "report.csv")
    plots = plot([r for r, _ in readable], [row for _, row in readable], out, metric) if readable else []
    return {"rows": table, "files": [out / "report.md", out / "report.csv", *plots]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "directory", type=Path, help="a sweep/submission directory (jobs.tsv), a run, or a folder of runs"
    )
    parser.add_argument("--out", type=Path, default=None, help="where the report goes (default DIR/report)")
    parser.add_argument(
        "--metric", default=None, help="column of the final-value plot (default: first val-core accuracy)"
    )
    args = parser.parse_args(argv)
    try:
        result = report(args.directory, args.out, args.metric)
    except ReportError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print((args.out or args.directory / "report").joinpath("report.md").read_text(), end="")
    for row in result["rows"]:
        if row["problem"] and row["status"] == "unreadable":
            print(f"warning: {row['run']}: {row['problem']}", file=sys.stderr)
    print("wrote " + ", ".join(str(p) for p in result["files"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
