"""Pipelines (``opd.launch.pipeline``, ``configs/pipeline/``): every pipeline loads and orders its stages;
the tiny s2d composes every stage with the earlier stages' outputs as inputs (a dry run: nothing queued);
bad pipelines (unknown stage, experiment or output, a cycle, a first stage without its model) are
refused with the fix and leave nothing behind. The chain on SLURM runs in tests/test_slurm_launch.py."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from opd.launch import pipeline
from opd.launch.pipeline import PipelineError

PIPELINES = pipeline.available()


def test_the_papers_pipeline_and_its_ablations_are_there():
    assert {"s2d", "s2d_no_warmup", "s2d_raw_teacher", "grpo_direct"} <= set(PIPELINES)


@pytest.mark.parametrize("name", PIPELINES)
@pytest.mark.parametrize("size", ["full", "tiny"])
def test_every_pipeline_orders_its_stages_after_what_they_read(name, size):
    order = pipeline.stages_in_order(pipeline.load(name), size)
    seen = set()
    for stage in order:
        assert {target for target, _ in stage.reads} <= seen, stage.name
        assert (Path(pipeline.EXPERIMENTS) / f"{stage.experiment}.yaml").is_file()
        seen.add(stage.name)
    assert order[-1].experiment.endswith("eval")  # every pipeline ends in an evaluation of its student


def test_ablations_are_diffs_of_s2d():
    names = {name: [s.name for s in pipeline.stages_in_order(pipeline.load(name))] for name in PIPELINES}
    assert names["s2d"] == ["teacher_rl", "teacher_rollouts", "warmup", "opd", "eval"]
    assert names["s2d_no_warmup"] == ["teacher_rl", "opd", "eval"]
    assert names["s2d_raw_teacher"] == ["teacher_rollouts", "warmup", "opd", "eval"]
    no_warmup = {s.name: s for s in pipeline.stages_in_order(pipeline.load("s2d_no_warmup"))}
    assert no_warmup["opd"].settings["verl.actor_rollout_ref.model.path"] == "{student}"
    assert no_warmup["opd"].settings["verl.opd.teacher_path"] == "{teacher_rl.model}"  # kept from s2d
    raw = {s.name: s for s in pipeline.stages_in_order(pipeline.load("s2d_raw_teacher"))}
    assert all(target != "teacher_rl" for s in raw.values() for target, _ in s.reads)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return str(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "stages: {a: {experiment: grpo}, b: {experiment: eval, set: {verl.x: '{c.model}'}}}",
            r"stage 'b' reads \{c.model\}, but no stage 'c' produces it",
        ),
        ("stages: {a: {experiment: nope}}", r"stage 'a': unknown experiment 'nope'.*choose one of"),
        (
            "stages: {a: {experiment: grpo, set: {verl.x: '{b.model}'}}, b: {experiment: grpo, set: {verl.y: '{a.model}'}}}",
            r"cycle: a -> b -> a",
        ),
        ("stages: {a: {experiment: grpo, sett: {}}}", r"stage 'a': unknown key\(s\) \['sett'\]"),
        ("extends: s2d\ndrop: [warm_up]", r"drop: 'warm_up' is no stage of s2d"),
        (
            "stages: {a: {experiment: grpo, set: {verl.x: '{studnet}'}}}",
            r"\{studnet\} is no model of the pipeline",
        ),
        ("stage: {}", r"unknown key\(s\) \['stage'\]"),
    ],
)
def test_bad_pipelines_are_refused_with_the_problem(tmp_path, text, message):
    with pytest.raises(PipelineError, match=message):
        pipeline.stages_in_order(pipeline.load(write(tmp_path, text)))


def test_unknown_pipeline_names_the_known_ones():
    with pytest.raises(PipelineError, match=r"unknown pipeline 'sd2': choose one of \[.*'s2d'"):
        pipeline.load("sd2")


@pytest.fixture
def tiny_env(monkeypatch, tiny_assets, tiny_math_data, tmp_path):
    monkeypatch.setenv("DATA_DIR", str(tiny_math_data))
    monkeypatch.setenv("OUTPUT_ROOT", str(tmp_path / "outputs"))


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "opd.launch.pipeline", *args], capture_output=True, text=True, timeout=300
    )


def test_tiny_s2d_composes_every_stage_with_earlier_outputs_as_inputs(tiny_env, tmp_path):
    root = tmp_path / "s2d"
    result = run_cli("submit", "s2d", "size=tiny", "--dry-run", "--dir", str(root), "opd:verl.opd.beta=0.25")
    assert result.returncode == 0, result.stderr
    assert "nothing was submitted" in result.stdout
    stages = {s.name: s for s in sorted(root.glob("0*_*"))}
    assert list(stages) == ["01_teacher_rl", "02_teacher_rollouts", "03_warmup", "04_opd", "05_eval"]
    config = {name: OmegaConf.load(path / "config.yaml") for name, path in stages.items()}
    launch = {name: OmegaConf.load(path / "launch.yaml") for name, path in stages.items()}
    teacher_model = str(root / "01_teacher_rl" / "model")
    assert config["02_teacher_rollouts"].actor_rollout_ref.model.path == teacher_model
    assert config["02_teacher_rollouts"].eval.save_rollouts is True
    assert list(config["03_warmup"].data.train_files) == [
        str(root / "02_teacher_rollouts" / "rollouts.parquet")
    ]
    assert config["03_warmup"].opd.rollouts == "stored"
    assert config["03_warmup"].opd.loss_type == "forward_kl"
    assert config["03_warmup"].opd.teacher_path == teacher_model
    assert config["04_opd"].actor_rollout_ref.model.path == str(root / "03_warmup" / "model")
    assert config["04_opd"].opd.teacher_path == teacher_model
    assert config["04_opd"].opd.beta == 0.25  # a one-stage override reaches that stage only
    assert config["03_warmup"].opd.beta == 0.5
    assert config["05_eval"].actor_rollout_ref.model.path == str(root / "04_opd" / "model")
    # stages whose model is read convert their last checkpoint when they end; the others do not
    assert [bool(launch[n].export_model) for n in stages] == [True, False, True, True, False]
    # reruns of a stage wait for nothing: the chain's dependencies go to sbatch, not into rerun.sbatch
    assert all("dependency" not in (path / "rerun.sbatch").read_text() for path in stages.values())
    state = (root / pipeline.STATE_FILE).read_text()
    assert (
        '"after": [\n    "teacher_rl",\n    "teacher_rollouts"\n   ]' in state
    )  # the warm-up waits for both


def test_a_pipeline_whose_first_stage_lacks_its_model_is_refused_with_nothing_left(
    tiny_env, tmp_path, monkeypatch
):
    monkeypatch.delenv("MODEL_PATH", raising=False)
    root = tmp_path / "refused"
    result = run_cli("submit", "grpo_direct", "--dir", str(root))
    assert result.returncode == 2
    assert "needs MODEL_PATH: export MODEL_PATH=" in result.stderr
    assert "nothing was submitted" in result.stderr
    assert not root.exists()


def test_reading_an_output_the_stage_does_not_produce_is_refused(tiny_env, tmp_path):
    text = (
        "stages:\n  rollouts: {experiment: teacher_rollouts}\n"
        "  opd: {experiment: opd, set: {verl.actor_rollout_ref.model.path: '{rollouts.model}'}}\n"
    )
    root = tmp_path / "bad"
    result = run_cli("submit", write(tmp_path, text), "size=tiny", "--dry-run", "--dir", str(root))
    assert result.returncode == 2
    assert "reads {rollouts.model}, but stage 'rollouts'" in result.stderr
    assert "produces only ['rollouts', 'run']" in result.stderr
    assert not root.exists()


def test_the_pipeline_module_imports_neither_torch_nor_verl():
    """Login nodes often have neither: loading, ordering and the stage state read only files."""
    code = (
        "import sys; from pathlib import Path; from opd.launch import pipeline; "
        "pipeline.stages_in_order(pipeline.load('s2d')); pipeline.output_path(Path('/x'), 'model'); "
        "pipeline.stage_done({'dir': '/nonexistent'}); "
        "print(sorted(m for m in ('torch', 'verl') if m in sys.modules))"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"
