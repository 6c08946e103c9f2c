"""python -m opd.launch.pipeline submit NAME [size=tiny] [--local] [--dry-run] [overrides]   (make pipeline PIPELINE=NAME)
python -m opd.launch.pipeline resume PIPELINE_DIR [--local]                              (make pipeline RESUME=DIR)
python -m opd.launch.pipeline reproduce [--slurm]                                        (make reproduce-s2d)

A pipeline (``configs/pipeline/NAME.yaml``) is a chain of runs, each stage an experiment with overrides,
whose inputs are earlier stages' outputs, written ``{stage.output}``:

  ``{stage.model}``     the stage's last checkpoint as a Hugging Face model (``STAGE_DIR/model``; the stage
                        converts it when it ends: ``export_model``); training stages
  ``{stage.rollouts}``  the stored responses with their token ids (``STAGE_DIR/rollouts.parquet``);
                        evaluation stages (their ``eval.save_rollouts`` is switched on)
  ``{stage.run}``       the stage's run directory
  ``{student}``, ``{teacher}``  the pipeline's ``models`` (``size=tiny``: the tiny models of ``make tiny``)

Every path is known at submission. The whole pipeline is checked before anything is queued: an unknown
stage or experiment, an input no earlier stage produces, a cycle, a stage whose model is read but that
saves no checkpoint, and the first stages' own inputs (model, data) are refused with exit 2 and nothing
queued. Then every stage is one SLURM job (``rerun.sbatch``, as ``make submit`` writes it) waiting for
the stages it reads (``--dependency=afterok``; a failure cancels the stages after it). ``resume`` reruns
the first stage that did not complete and queues the rest after it again. ``--local`` runs the stages
one after another on this machine, without SLURM (the tiny pipelines on a laptop or in CI).

``size=tiny`` runs every stage's ``tiny_<experiment>`` with the tiny models; other ``key=value``
arguments are login overrides for every stage, ``STAGE:key=value`` for one stage (``verl.*`` keys as for
``make submit``). ``make report SWEEP=PIPELINE_DIR`` tabulates the stages. ``reproduce`` runs the tiny s2d, its two ablations
and direct GRPO, and ends in the report of all their stages.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from opd.launch import CONFIGS, JOBS_FILE, SubmissionError

PIPELINES = Path(CONFIGS) / "pipeline"
EXPERIMENTS = Path(CONFIGS) / "experiment"
STATE_FILE = "pipeline.json"
STAGE_KEYS = ("experiment", "set")
PIPELINE_KEYS = ("description", "extends", "drop", "models", "stages")
REFERENCE = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)(?:\.([A-Za-z_]+))?\}")
# what each kind of entry point leaves for later stages
OUTPUTS = {
    "opd.main_grpo": ("model", "run"),
    "opd.main_opd": ("model", "run"),
    "opd.main_eval": ("rollouts", "run"),
}
TINY_MODELS = {"student": "${opd.tiny_dir:student}", "teacher": "${opd.tiny_dir:teacher}"}
SIZES = ("full", "tiny")


class PipelineError(ValueError):
    """A pipeline that cannot run: the message names the stage, the problem and the fix."""


@dataclass
class Stage:
    name: str
    experiment: str
    settings: dict[str, str]  # login override key -> value, references not yet resolved
    reads: list[tuple[str, str]] = field(default_factory=list)  # (stage, output) this stage's inputs
    extra: list[str] = field(default_factory=list)  # overrides of the command line for this stage


# ---- loading and checking (no SLURM, no torch) -------------------------------------------------------------


def available() -> list[str]:
    return sorted(p.stem for p in PIPELINES.glob("*.yaml"))


def load(name: str, _seen: tuple[str, ...] = ()) -> dict:
    """The pipeline file NAME (``configs/pipeline/NAME.yaml`` or a path), ``extends`` and ``drop`` applied."""
    from omegaconf import OmegaConf

    path = Path(name) if name.endswith(".yaml") else PIPELINES / f"{name}.yaml"
    if not path.is_file():
        raise PipelineError(f"unknown pipeline {name!r}: choose one of {available()} (configs/pipeline/)")
    if name in _seen:
        raise PipelineError(f"pipeline {name} extends itself: {' -> '.join([*_seen, name])}")
    spec = OmegaConf.to_container(OmegaConf.load(path), resolve=False) or {}
    unknown = sorted(set(spec) - set(PIPELINE_KEYS))
    if unknown:
        raise PipelineError(f"{path}: unknown key(s) {unknown}; a pipeline has {list(PIPELINE_KEYS)}")
    base = load(spec["extends"], (*_seen, name)) if spec.get("extends") else {"models": {}, "stages": {}}
    stages = {key: dict(value) for key, value in base["stages"].items()}
    for dropped in spec.get("drop") or []:
        if dropped not in stages:
            raise PipelineError(
                f"{path}: drop: {dropped!r} is no stage of {spec.get('extends')} ({list(stages)})"
            )
        del stages[dropped]
    for key, value in (spec.get("stages") or {}).items():
        if value is None or not isinstance(value, dict):
            raise PipelineError(f"{path}: stage {key!r} must be a mapping with {list(STAGE_KEYS)}")
        unknown = sorted(set(value) - set(STAGE_KEYS))
        if unknown:
            raise PipelineError(
                f"{path}: stage {key!r}: unknown key(s) {unknown}; a stage has {list(STAGE_KEYS)}"
            )
        merged = stages.setdefault(key, {})
        if "experiment" in value:
            merged["experiment"] = value["experiment"]
        settings = dict(merged.get("set") or {})
        for setting, setting_value in (value.get("set") or {}).items():
            if setting_value is None:
                settings.pop(setting, None)  # null: back to the experiment's own value
            else:
                settings[setting] = setting_value
        merged["set"] = settings
    models = {**base.get("models", {}), **(spec.get("models") or {})}
    return {"name": path.stem, "description": spec.get("description", ""), "models": models, "stages": stages}


def stages_in_order(spec: dict, size: str = "full") -> list[Stage]:
    """The stages in an order where each comes after the stages it reads; refuses unknown experiments,
    references to unknown stages, and cycles."""
    if size not in SIZES:
        raise PipelineError(f"size={size}: choose one of {list(SIZES)}")
    stages = {}
    for name, body in spec["stages"].items():
        if not body.get("experiment"):
            raise PipelineError(f"stage {name!r} names no experiment (experiment: grpo, opd, ...)")
        experiment = f"tiny_{body['experiment']}" if size == "tiny" else body["experiment"]
        if not (EXPERIMENTS / f"{experiment}.yaml").is_file():
            known = sorted(p.stem for p in EXPERIMENTS.glob("*.yaml") if not p.stem.startswith("tiny_"))
            hint = " (size=tiny runs tiny_<experiment>)" if size == "tiny" else ""
            raise PipelineError(
                f"stage {name!r}: unknown experiment {experiment!r}{hint}: choose one of {known} (configs/experiment/)"
            )
        settings = {str(k): str(v) for k, v in (body.get("set") or {}).items()}
        stage = Stage(name, experiment, settings)
        for value in settings.values():
            for target, output in REFERENCE.findall(value):
                if not output:
                    if target not in spec["models"]:
                        raise PipelineError(
                            f"stage {name!r}: {{{target}}} is no model of the pipeline ({sorted(spec['models'])}) "
                            "and no stage output ({stage.model}, {stage.rollouts}, {stage.run})"
                        )
                    continue
                if target not in spec["stages"]:
                    raise PipelineError(
                        f"stage {name!r} reads {{{target}.{output}}}, but no stage {target!r} produces it "
                        f"(stages: {list(spec['stages'])})"
                    )
                if target == name:
                    raise PipelineError(f"stage {name!r} reads its own output {{{target}.{output}}}")
                stage.reads.append((target, output))
        stages[name] = stage
    order, state = [], {}

    def visit(name: str, path: list[str]) -> None:
        if state.get(name) == "done":
            return
        if state.get(name) == "visiting":
            cycle = path[path.index(name) :] + [name]
            raise PipelineError(f"the stages read each other in a cycle: {' -> '.join(cycle)}")
        state[name] = "visiting"
        for target, _ in stages[name].reads:
            visit(target, [*path, name])
        state[name] = "done"
        order.append(stages[name])

    for name in stages:
        visit(name, [])
    return order


def stage_dirs(order: list[Stage], root: Path) -> dict[str, Path]:
    return {stage.name: root / f"{i:02d}_{stage.name}" for i, stage in enumerate(order, 1)}


def output_path(directory: Path, output: str) -> Path:
    from opd.distill.stored import ROLLOUTS_FILE
    from opd.launch.node import EXPORTED_MODEL

    return {"model": directory / EXPORTED_MODEL, "rollouts": directory / ROLLOUTS_FILE, "run": directory}[
        output
    ]


def resolve(value: str, dirs: dict[str, Path], models: dict[str, str]) -> str:
    """``{stage.output}`` and ``{model}`` references replaced by their paths / values."""

    def replace(match: re.Match) -> str:
        target, output = match.groups()
        return str(models[target]) if not output else str(output_path(dirs[target], output))

    return REFERENCE.sub(replace, value)


# ---- composing the stages' run directories -----------------------------------------------------------------


def login_config(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIGS, version_base=None):
        return compose(config_name="launch", overrides=overrides)


def split_overrides(args: list[str], names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """``key=value`` (every stage) and ``STAGE:key=value`` (one stage) command-line overrides."""
    from opd.launch.sweep import hydra_arguments

    common, per_stage = [], {name: [] for name in names}
    for arg in args:
        head, sep, rest = arg.partition(":")
        if sep and "=" not in head:
            if head not in per_stage:
                raise PipelineError(f"{arg}: no stage {head!r} in this pipeline ({names})")
            per_stage[head] += hydra_arguments([rest])
        else:
            common += hydra_arguments([arg])
    return common, per_stage


def prepare_stages(spec: dict, order: list[Stage], root: Path, size: str, args: list[str]) -> list[dict]:
    """Write every stage's run directory (composed and checked as ``make submit`` does, inputs under
    earlier stages' directories checked in their jobs); nothing is queued. Returns the stage records."""
    from opd.launch import snapshot
    from opd.launch.rundir import prepare
    from opd.launch.sweep import hydra_arguments

    models = {**spec["models"], **(TINY_MODELS if size == "tiny" else {})}
    dirs = stage_dirs(order, root)
    common, per_stage = split_overrides(args, [s.name for s in order])
    read_outputs = {(target, output) for stage in order for target, output in stage.reads}
    code = snapshot.take(root / snapshot.DIRECTORY).resolve()
    records = []
    for stage in order:
        overrides = [f"experiment={stage.experiment}", *common]
        overrides += hydra_arguments([f"{k}={resolve(v, dirs, models)}" for k, v in stage.settings.items()])
        overrides += per_stage[stage.name]
        if (stage.name, "model") in read_outputs:
            overrides.append("export_model=true")
        if (stage.name, "rollouts") in read_outputs:
            overrides.append("++verl.eval.save_rollouts=true")
        after = sorted({target for target, _ in stage.reads})
        upstream = [{"dir": str(dirs[name]), "jobs": []} for name in after]
        cfg = login_config(overrides)
        entry = cfg.experiment.entry
        produces = OUTPUTS.get(entry, ("run",))
        for reader in order:
            for target, output in reader.reads:
                if target == stage.name and output not in produces:
                    raise PipelineError(
                        f"stage {reader.name!r} reads {{{target}.{output}}}, but stage {target!r} "
                        f"({stage.experiment}, {entry}) produces only {list(produces)}"
                    )
        print(f"  preparing stage {stage.name} ({stage.experiment}) in {dirs[stage.name]}", flush=True)
        try:
            prepare(cfg, dirs[stage.name], overrides, code=code, after=upstream)
        except SubmissionError as error:
            raise PipelineError(f"stage {stage.name!r} ({stage.experiment}): {error}") from None
        if (stage.name, "model") in read_outputs:
            _check_saves(stage, dirs[stage.name])
        records.append(
            {
                "name": stage.name,
                "experiment": stage.experiment,
                "entry": entry,
                "dir": str(dirs[stage.name]),
                "after": after,
                "overrides": overrides,
            }
        )
    return records


def _check_saves(stage: Stage, directory: Path) -> None:
    from omegaconf import OmegaConf

    trainer = OmegaConf.load(directory / "config.yaml").trainer
    if not trainer.get("save_freq") or int(trainer.save_freq) <= 0:
        raise PipelineError(
            f"stage {stage.name!r}: a later stage reads its model, but it saves no checkpoint "
            f"(trainer.save_freq={trainer.get('save_freq')}): set {stage.name}:verl.trainer.save_freq=N (> 0)"
        )


# ---- running: SLURM chains or one process after another ---------------------------------------------------


def stage_done(record: dict) -> bool:
    """The stage's last attempt ended with code 0 (``done.json``), and its exported model is there."""
    from omegaconf import OmegaConf

    directory = Path(record["dir"])
    attempts = sorted((directory / "logs").glob("*/done.json"), key=lambda p: p.stat().st_mtime)
    if not attempts or json.loads(attempts[-1].read_text()).get("code") != 0:
        return False
    launch = directory / "launch.yaml"
    if launch.is_file() and OmegaConf.load(launch).get("export_model"):
        from opd.checkpoint import MARKER_FILE
        from opd.launch.node import EXPORTED_MODEL

        return (directory / EXPORTED_MODEL / MARKER_FILE).is_file()
    return True


def write_state(root: Path, state: dict) -> None:
    tmp = root / f"{STATE_FILE}.tmp"
    tmp.write_text(json.dumps(state, indent=1) + "\n")
    tmp.replace(root / STATE_FILE)
    # one line per stage (its latest job): make status / make report / make cancel read it
    (root / JOBS_FILE).write_text(
        "".join(
            f"{s.get('job', '-')}\t{s['dir']}\tstage={s['name']} experiment={s['experiment']}\n"
            for s in state["stages"]
        )
    )


def submit_chain(root: Path, state: dict, start: int) -> None:
    """sbatch the stages from index ``start`` on, each after the stages it reads that are not done yet."""
    from opd.launch.submit import sbatch_command

    submitted = []
    jobs = {s["name"]: s.get("job") for s in state["stages"]}
    try:
        for record in state["stages"][start:]:
            waits = [jobs[name] for name in record["after"] if not stage_done(_by_name(state, name))]
            options = (
                [f"--dependency=afterok:{':'.join(waits)}", "--kill-on-invalid-dep=yes"] if waits else []
            )
            job = sbatch_command(Path(record["dir"]) / "rerun.sbatch", options)
            submitted.append(job)
            jobs[record["name"]] = record["job"] = job
            (Path(record["dir"]) / JOBS_FILE).write_text(f"{job}\t{record['dir']}\tstage={record['name']}\n")
            print(
                f"  job {job}  {record['name']:<18} {record['dir']}"
                + (f"  after {','.join(waits)}" if waits else "")
            )
    except SubmissionError:
        if submitted:  # a half-queued chain would run stages whose inputs never come
            subprocess.run(["scancel", *submitted], capture_output=True)
        raise
    state.setdefault("history", []).append(
        {"time": time.time(), "from": state["stages"][start]["name"], "jobs": submitted}
    )
    write_state(root, state)


def run_local(root: Path, state: dict, start: int) -> int:
    """Run the stages from ``start`` on here, one after another (``opd.launch.node``, no SLURM)."""
    from omegaconf import OmegaConf

    from opd.launch.rundir import node_command

    for record in state["stages"][start:]:
        directory = Path(record["dir"])
        launch = OmegaConf.to_container(OmegaConf.load(directory / "launch.yaml"))
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([f"{launch['code']}/src", os.environ.get("PYTHONPATH", "")]),
        )
        env.pop("SLURM_JOB_ID", None)
        record["job"] = "local"
        write_state(root, state)
        print(f"== stage {record['name']} ({record['experiment']}): {directory}", flush=True)
        started = time.monotonic()
        code = subprocess.run(node_command(launch, directory), env=env).returncode
        if code != 0 or not stage_done(record):
            print(
                f"error: stage {record['name']} failed (exit {code}): see {directory}/logs/; the stages after it did "
                f"not run. Rerun it and continue: python -m opd.launch.pipeline resume {root} --local",
                file=sys.stderr,
            )
            return 1
        print(f"== stage {record['name']} done in {time.monotonic() - started:.0f} s", flush=True)
    print(f"pipeline done: {root}\nreport: make report SWEEP={root}")
    return 0


def _by_name(state: dict, name: str) -> dict:
    return next(s for s in state["stages"] if s["name"] == name)


def first_unfinished(state: dict) -> int | None:
    for i, record in enumerate(state["stages"]):
        if not stage_done(record):
            return i
    return None


def check_nothing_queued(state: dict) -> None:
    """Resume only a chain with no job left waiting or running (else stages would run twice)."""
    from opd.launch.status import sacct_states

    jobs = [s["job"] for s in state["stages"] if s.get("job") not in (None, "local")]
    if not jobs:
        return
    states = sacct_states(jobs)
    live = [
        f"{s['name']} (job {s['job']}, {states[s['job']]['state']})"
        for s in state["stages"]
        if s.get("job") in states
        and states[s["job"]]["state"].split()[0]
        in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING")
    ]
    if live:
        raise PipelineError(
            f"stages still queued or running: {', '.join(live)}; wait for them, or cancel them "
            f"(make cancel SWEEP=<pipeline dir>) before resuming"
        )


# ---- commands ----------------------------------------------------------------------------------------------


def submit(
    name: str, args: list[str], local: bool = False, dry_run: bool = False, root: Path | None = None
) -> Path:
    size, rest = "full", []
    for arg in args:
        if arg.startswith("size="):
            size = arg.split("=", 1)[1]
        else:
            rest.append(arg)
    spec = load(name)
    order = stages_in_order(spec, size)
    if root is None:
        output_root = Path(os.environ.get("OUTPUT_ROOT", "outputs"))
        stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        root = output_root / "pipelines" / f"{spec['name']}{'_tiny' if size == 'tiny' else ''}" / stamp
    root = root.resolve()
    if root.exists() and any(root.iterdir()):
        raise PipelineError(f"{root} is not empty: a pipeline directory holds one pipeline")
    print(
        f"pipeline {spec['name']} (size={size}): {' -> '.join(s.name for s in order)}\ndirectory: {root}",
        flush=True,
    )
    root.mkdir(parents=True, exist_ok=True)
    try:
        records = prepare_stages(spec, order, root, size, rest)
    except (PipelineError, SubmissionError) as error:
        shutil.rmtree(root, ignore_errors=True)
        raise PipelineError(f"{error} (nothing was submitted)") from None
    state = {"pipeline": spec["name"], "size": size, "description": spec["description"], "stages": records}
    write_state(root, state)
    if dry_run:
        print(f"dry run: every stage composed and checked in {root}; nothing was submitted")
        return root
    if local:
        code = run_local(root, state, 0)
        if code:
            raise SystemExit(code)
        return root
    try:
        submit_chain(root, state, 0)
    except SubmissionError as error:
        raise PipelineError(f"{error} (the jobs queued before it were cancelled)") from None
    print(
        f"status: make status SWEEP={root}\nresume after a failure: make pipeline RESUME={root}\nreport: make report SWEEP={root}"
    )
    return root


def resume(root: Path, local: bool = False) -> Path:
    root = root.resolve()
    if not (root / STATE_FILE).is_file():
        raise PipelineError(f"{root} holds no {STATE_FILE}: pass a directory printed by make pipeline")
    state = json.loads((root / STATE_FILE).read_text())
    start = first_unfinished(state)
    if start is None:
        print(f"every stage of {root} is done: nothing to resume\nreport: make report SWEEP={root}")
        return root
    if local:
        code = run_local(root, state, start)
        if code:
            raise SystemExit(code)
        return root
    check_nothing_queued(state)
    print(f"resuming {root} at stage {state['stages'][start]['name']}")
    submit_chain(root, state, start)
    return root


REPRODUCED = ("s2d", "s2d_no_warmup", "s2d_raw_teacher", "grpo_direct")
TERMINAL = ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED")
# make reproduce-s2d's settings over the tiny experiments (size=tiny), long enough for the stages to matter:
# the tiny task's own split (7,000 training problems, 200 held out: {assets}/data), greedy validation once
# per problem, and per stage (a stage absent from a pipeline is skipped):
REPRODUCE_SETTINGS = {
    "": [
        "verl.data.train_files=[{assets}/data/train.parquet]",
        "verl.data.val_files=[{assets}/data/val.parquet]",
        "verl.data.val_batch_size=256",
        "verl.actor_rollout_ref.rollout.val_kwargs.n=1",
        "verl.actor_rollout_ref.rollout.val_kwargs.do_sample=false",
        "verl.trainer.test_freq=10",
        "verl.trainer.save_freq=10",
    ],
    # RL, teacher or student: 32 problems x 4 samples per step at the tiny lr (1e-4; at 1e-3 one step took
    # the teacher's training reward from 0.90 to 0.59, and held-out accuracy fell from 0.94 to 0.59 in 10)
    "teacher_rl": [
        "verl.trainer.total_training_steps=10",
        "verl.data.train_batch_size=32",
        "verl.actor_rollout_ref.actor.ppo_mini_batch_size=32",
    ],
    "student_rl": [
        "verl.trainer.total_training_steps=30",
        "verl.data.train_batch_size=32",
        "verl.actor_rollout_ref.actor.ppo_mini_batch_size=32",
    ],
    # the teacher answers 1,024 training problems twice, sampling at temperature 1
    "teacher_rollouts": [
        "verl.data.val_files=[{assets}/data/train.parquet]",
        "verl.data.val_max_samples=1024",
        "verl.actor_rollout_ref.rollout.val_kwargs.n=2",
        "verl.actor_rollout_ref.rollout.val_kwargs.do_sample=true",
    ],
    # distillation as in make demo: 128 rows per step, two passes of two mini-batches, lr 2e-3
    "warmup": [
        "verl.trainer.total_training_steps=null",  # one pass over the 2,048 stored responses: 16 steps
        "verl.data.train_batch_size=128",
        "verl.actor_rollout_ref.actor.ppo_mini_batch_size=64",
        "verl.actor_rollout_ref.actor.ppo_epochs=2",
        "verl.actor_rollout_ref.actor.optim.lr=2e-3",
        "verl.actor_rollout_ref.actor.optim.lr_warmup_steps=2",
    ],
    "opd": [
        "verl.trainer.total_training_steps=30",
        "verl.data.train_batch_size=128",
        "verl.actor_rollout_ref.actor.ppo_mini_batch_size=64",
        "verl.actor_rollout_ref.actor.ppo_epochs=2",
        "verl.actor_rollout_ref.actor.optim.lr=2e-3",
        "verl.actor_rollout_ref.actor.optim.lr_warmup_steps=5",
    ],
}


def reproduce_overrides(stages: list[str], assets: Path) -> list[str]:
    """``REPRODUCE_SETTINGS`` for a pipeline with these stages, as command-line overrides."""
    out = []
    for stage, settings in REPRODUCE_SETTINGS.items():
        if stage and stage not in stages:
            continue
        out += [f"{stage}:{s.format(assets=assets)}" if stage else s.format(assets=assets) for s in settings]
    return out


def reproduce(args: list[str], slurm: bool = False, root: Path | None = None) -> Path:
    """The tiny s2d pipeline, its ablations and direct GRPO with ``REPRODUCE_SETTINGS`` (here, or as SLURM
    chains waited for), then ``make report`` over all their stages (``ROOT/report/``) and a summary."""
    from opd.tiny import build, default_dir
    from opd.tiny.__main__ import write_tiny_math_data

    output_root = Path(os.environ.get("OUTPUT_ROOT", "outputs"))
    stamp = datetime.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    root = (root or output_root / "reproduce_s2d" / stamp).resolve()
    assets = Path(default_dir()).absolute()
    build(assets)
    if not os.environ.get("DATA_DIR"):  # the experiments' data checks read the math layout too
        write_tiny_math_data(root / "data")
        os.environ["DATA_DIR"] = str(root / "data")
    started = time.monotonic()
    states = {}
    for name in REPRODUCED:
        print(f"=== pipeline {name} ({time.monotonic() - started:.0f} s)", flush=True)
        stages = list(load(name)["stages"])
        overrides = ["size=tiny", *reproduce_overrides(stages, assets), *args]
        directory = submit(name, overrides, local=not slurm, root=root / name)
        states[name] = json.loads((directory / STATE_FILE).read_text())
    if slurm:
        wait_for_chains(states)
    (root / JOBS_FILE).write_text(
        "".join(
            f"{stage.get('job', '-')}\t{stage['dir']}\tpipeline={name} stage={stage['name']}\n"
            for name, state in states.items()
            for stage in state["stages"]
        )
    )
    from opd.report import report

    written = report(root)
    summary = summary_table(states)
    (root / "report" / "summary.md").write_text(summary)
    print(f"=== done in {time.monotonic() - started:.0f} s: {root}\n\n{summary}")
    print("every stage: " + ", ".join(str(p) for p in written["files"]))
    return root


def summary_table(states: dict) -> str:
    """Markdown: per pipeline, its stages and its final evaluation's mean accuracy per data source."""
    results = {}
    for name, state in states.items():
        final = Path(state["stages"][-1]["dir"]) / "eval_results.json"
        results[name] = json.loads(final.read_text())["results"] if final.is_file() else {}
    sources = sorted({source for result in results.values() for source in result})
    means = {
        source: next(
            (k for r in results.values() for k in r.get(source, {}) if k.startswith("mean@")), "mean@1"
        )
        for source in sources
    }
    lines = [
        "| pipeline | stages | " + " | ".join(f"{source} {means[source]}" for source in sources) + " |",
        "|---|---|" + "---|" * len(sources),
    ]
    for name, state in states.items():
        cells = [results[name].get(source, {}).get(means[source]) for source in sources]
        shown = ["-" if value is None else f"{value:.3f}" for value in cells]
        stages = " -> ".join(stage["name"] for stage in state["stages"])
        lines.append(f"| {name} | {stages} | " + " | ".join(shown) + " |")
    return "\n".join(lines) + "\n"


def wait_for_chains(states: dict) -> None:
    """Until every stage's job has ended (sacct), printing each change of state."""
    from opd.launch.status import sacct_states

    jobs = {s["job"]: f"{name}/{s['name']}" for name, state in states.items() for s in state["stages"]}
    shown: dict[str, str] = {}
    while True:
        current = sacct_states(list(jobs))
        for job, label in jobs.items():
            state = current.get(job, {}).get("state", "PENDING")
            if shown.get(job) != state:
                print(f"  {label:<34} job {job}: {state}", flush=True)
                shown[job] = state
        if all(state.split()[0] in TERMINAL for state in shown.values()):
            return
        time.sleep(15)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m opd.launch.pipeline", description=__doc__.splitlines()[0]
    )
    commands = parser.add_subparsers(dest="command", required=True)
    sub = commands.add_parser("submit", help="check, write and queue (or run --local) a pipeline")
    sub.add_argument("name", help=f"configs/pipeline/NAME.yaml: {', '.join(available())}")
    sub.add_argument("overrides", nargs="*", help="size=tiny, key=value (every stage), STAGE:key=value")
    sub.add_argument("--local", action="store_true", help="run the stages here one after another, no SLURM")
    sub.add_argument("--dry-run", action="store_true", help="compose and check every stage, queue nothing")
    sub.add_argument(
        "--dir", type=Path, help="the pipeline directory (default: OUTPUT_ROOT/pipelines/NAME/TIME)"
    )
    res = commands.add_parser("resume", help="rerun the first stage that did not complete, then the rest")
    res.add_argument("directory", type=Path)
    res.add_argument("--local", action="store_true", help="run here, no SLURM")
    rep = commands.add_parser("reproduce", help=f"the tiny {', '.join(REPRODUCED)}, then the report")
    rep.add_argument(
        "--slurm", action="store_true", help="submit them as SLURM chains and wait (default: here)"
    )
    rep.add_argument("--dir", type=Path, help="default: OUTPUT_ROOT/reproduce_s2d/TIME")
    args, rest = parser.parse_known_args(argv)  # overrides may also follow the options
    unknown = [a for a in rest if a.startswith("-") or args.command == "resume"]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command == "submit":
        args.overrides += rest
    try:
        if args.command == "submit":
            submit(args.name, args.overrides, local=args.local, dry_run=args.dry_run, root=args.dir)
        elif args.command == "reproduce":
            reproduce(rest, slurm=args.slurm, root=args.dir)
        else:
            resume(args.directory, local=args.local)
    except (PipelineError, SubmissionError) as error:
        print(f"error: refused: {error}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
