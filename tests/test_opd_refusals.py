"""The refusals a user of ``python -m opd.main_opd`` meets first: a missing or mismatched teacher and an
unsupported loss/signal choice are refused before Ray starts, with exit code 2 and one ``error: `` line
that names the problem and the fix."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from conftest import compose_verl_config, process_name
from opd.demo import kill_session, tiny_opd_overrides

TOKENIZER_SIZE = 438  # the tiny tokenizer's vocabulary (and both tiny models' head width)


def main_opd(overrides: list[str]) -> subprocess.CompletedProcess:
    """``python -m opd.main_opd overrides...`` without TEACHER_MODEL_PATH; asserts that it left no process
    behind (no Ray daemon outlives a refusal)."""
    env = {k: v for k, v in os.environ.items() if k not in ("TEACHER_MODEL_PATH", "RAY_ADDRESS")}
    process = subprocess.Popen(
        [sys.executable, "-m", "opd.main_opd", *overrides],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=120)
        left = [process_name(p) for p in psutil.process_iter() if _session(p) == process.pid]
    finally:
        kill_session(process)
    assert not left, f"processes left behind by a refused run: {left}"
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def _session(process) -> int | None:
    try:
        return os.getsid(process.pid)
    except OSError:  # exited meanwhile
        return None


def assert_one_clear_error(result: subprocess.CompletedProcess, *must_contain: str) -> str:
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr[-2000:]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-2000:]
    for text in must_contain:
        assert text in lines[0], lines[0]
    return lines[0]


def overrides_without_teacher(tiny_assets: Path, run_dir: Path) -> list[str]:
    return [o for o in tiny_opd_overrides(tiny_assets, run_dir, 1) if not o.startswith("opd.teacher_path=")]


def with_teacher(tiny_assets: Path, run_dir: Path, teacher: Path, *extra: str) -> list[str]:
    return [*overrides_without_teacher(tiny_assets, run_dir), f"opd.teacher_path={teacher}", *extra]


def teacher_with_one_token_renamed(tiny_assets: Path, out_dir: Path) -> Path:
    """The tiny teacher with one vocabulary entry of its tokenizer renamed (same size, one token differs)."""
    shutil.copytree(tiny_assets / "teacher", out_dir)
    tokenizer_json = out_dir / "tokenizer.json"
    tokenizer = json.loads(tokenizer_json.read_text())
    vocab, merges = tokenizer["model"]["vocab"], tokenizer["model"]["merges"]
    in_merges = {
        part for merge in merges for part in (merge if isinstance(merge, list) else merge.split(" "))
    }
    in_merges |= {"".join(merge if isinstance(merge, list) else merge.split(" ")) for merge in merges}
    special = {token["content"] for token in tokenizer["added_tokens"]}
    old = next(token for token in reversed(vocab) if token not in in_merges | special)
    vocab["renamed_token"] = vocab.pop(old)
    tokenizer_json.write_text(json.dumps(tokenizer))
    return out_dir


def teacher_with_head_width(tiny_assets: Path, out_dir: Path, width: int) -> Path:
    """The tiny teacher (same tokenizer) saved with its output head (and embedding) resized to ``width``."""
    from transformers import AutoModelForCausalLM

    shutil.copytree(tiny_assets / "teacher", out_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_assets / "teacher")
    model.resize_token_embeddings(width, mean_resizing=False)
    model.save_pretrained(out_dir)
    assert model.get_output_embeddings().weight.shape[0] == width
    return out_dir


def test_missing_teacher_is_refused_before_ray_starts(tiny_assets, tmp_path):
    result = main_opd(overrides_without_teacher(tiny_assets, tmp_path / "run"))
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines() == [
        "error: no teacher: export TEACHER_MODEL_PATH=/path/to/teacher_model (or pass opd.teacher_path=...), "
        "or distill the student from itself with opd.teacher=self"
    ]


def test_teacher_with_another_tokenizer_is_refused(tiny_assets, tmp_path):
    teacher = teacher_with_one_token_renamed(tiny_assets, tmp_path / "teacher")
    result = main_opd(with_teacher(tiny_assets, tmp_path / "run", teacher))
    assert_one_clear_error(
        result,
        f"the teacher's tokenizer ({teacher}) differs from the student's",
        "needs one shared tokenizer",
        "pick a teacher from the same model family",
    )


@pytest.mark.parametrize("loss_type", ["forward_kl", "jsd"])
def test_loss_that_the_sampled_signal_cannot_estimate_is_refused(tiny_assets, tmp_path, loss_type):
    overrides = with_teacher(
        tiny_assets,
        tmp_path / "run",
        tiny_assets / "teacher",
        f"opd.loss_type={loss_type}",
        "opd.teacher_signal=sampled",
    )
    line = assert_one_clear_error(
        main_opd(overrides),
        f"opd.loss_type={loss_type} is not supported with opd.teacher_signal=sampled",
        "(it supports ['reverse_kl'])",
        "use teacher_signal in",
    )
    for signal in ("logits", "hidden", "topk"):  # the fix: signals that support this loss
        assert signal in line.split("use teacher_signal in", 1)[1], line


def test_unknown_teacher_signal_is_refused(tiny_assets, tmp_path):
    overrides = with_teacher(
        tiny_assets, tmp_path / "run", tiny_assets / "teacher", "opd.teacher_signal=full_logits"
    )
    assert_one_clear_error(
        main_opd(overrides),
        "opd.teacher_signal=full_logits",
        "choose one of ['hidden', 'logits', 'sampled', 'topk']",
    )


def test_teacher_head_narrower_than_the_tokenizer_is_refused(tiny_assets, tmp_path):
    teacher = teacher_with_head_width(tiny_assets, tmp_path / "teacher", TOKENIZER_SIZE - 38)
    result = main_opd(with_teacher(tiny_assets, tmp_path / "run", teacher))
    # the problem (which model, which widths) and the fix (a head that covers the tokenizer)
    assert_one_clear_error(
        result,
        f"teacher {teacher}",
        f"the tokenizer has {TOKENIZER_SIZE} tokens but the teacher output head only {TOKENIZER_SIZE - 38}",
        "use models whose output heads cover the tokenizer",
    )


def checked_config(tiny_assets: Path, run_dir: Path, teacher: Path):
    """The composed, resolved opd_trainer config after main_opd's own start-up checks (in this process)."""
    from omegaconf import OmegaConf

    from opd.main_opd import CONFIG_NAME, check_config

    config = compose_verl_config(with_teacher(tiny_assets, run_dir, teacher), config_name=CONFIG_NAME)
    OmegaConf.resolve(config)
    check_config(config)
    return config


def test_teacher_head_wider_than_the_tokenizer_passes_the_start_up_checks(tiny_assets, tmp_path):
    """Padded heads are normal (Qwen2.5: 151,936 vs 152,064 columns): the compared vocabulary is the
    tokenizer's. The same check refuses the narrower head."""
    from opd.data.checks import InputError

    wide = teacher_with_head_width(tiny_assets, tmp_path / "wide", TOKENIZER_SIZE + 74)
    config = checked_config(tiny_assets, tmp_path / "run", wide)
    assert config.opd.vocab_size == TOKENIZER_SIZE
    assert config.opd.teacher_path == str(wide)
    assert config.actor_rollout_ref.ref.model.path == str(wide)

    narrow = teacher_with_head_width(tiny_assets, tmp_path / "narrow", TOKENIZER_SIZE - 38)
    with pytest.raises(InputError, match=f"the teacher output head only {TOKENIZER_SIZE - 38} columns"):
        checked_config(tiny_assets, tmp_path / "run", narrow)


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["opd.token_selection.rule=soft_or", "opd.token_selection.ratio=1.5"],
            "ratio=1.5 must lie in (0, 1]",
        ),
        (["opd.token_selection.rule=top_half"], "opd.token_selection.rule=top_half: choose one of"),
        (
            ["opd.teacher_signal=sampled", "opd.token_selection.rule=q3", "opd.token_selection.ratio=0.2"],
            "use teacher_signal=hidden",
        ),
    ],
)
def test_bad_token_selection_is_refused_at_start_up_and_at_submission(tiny_assets, tmp_path, extra, expected):
    overrides = with_teacher(tiny_assets, tmp_path / "run", tiny_assets / "teacher", *extra)
    assert_refused_at_start_up_and_at_submission(overrides, expected, tmp_path)


def assert_refused_at_start_up_and_at_submission(overrides: list[str], expected: str, tmp_path: Path) -> None:
    assert_one_clear_error(main_opd(overrides), expected)
    # what `make submit` / `make sweep-*` run on the login node for every point before queueing it
    env = {k: v for k, v in os.environ.items() if k != "TEACHER_MODEL_PATH"}
    composed = subprocess.run(
        [sys.executable, "-m", "opd.launch.compose", "opd.main_opd", str(tmp_path / "out.yaml"), *overrides],
        capture_output=True,
        text=True,
        env=env,
    )
    assert composed.returncode == 2 and expected in composed.stderr, composed.stderr[-2000:]
    assert not (tmp_path / "out.yaml").exists()


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        (
            ["opd.sample_weighting.method=paced", "actor_rollout_ref.rollout.n=1"],
            "set actor_rollout_ref.rollout.n >= 2",
        ),
        (
            ["opd.teacher=self", "opd.teacher_context.field=extra_info.solution"],
            "opd.teacher_context.field=extra_info.solution: 7000 of 7000 training rows have no value there",
        ),
        (["opd.teacher=self", "opd.teacher_path=/models/teacher"], "unset the path (opd.teacher_path=null"),
    ],
)
def test_bad_paced_or_self_distillation_is_refused_at_start_up_and_at_submission(
    tiny_assets, tmp_path, extra, expected
):
    overrides = [*overrides_without_teacher(tiny_assets, tmp_path / "run"), *extra]
    assert_refused_at_start_up_and_at_submission(overrides, expected, tmp_path)
