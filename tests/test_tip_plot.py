"""``python -m opd.tip``: the diagnostics plot reads only a run's files (no torch), tolerates a line being
written, and names what is missing; every selection of ``configs/token_selection/`` is a valid config."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from opd.distill.config import OPDConfig
from opd.launch import CONFIGS
from opd.repro import group_overrides
from opd.tip import main, quadrant_series


def fake_run(run_dir: Path, steps: int = 3, with_pairs: bool = True) -> Path:
    """A run directory as the trainer writes it (metrics.jsonl, token_pairs.jsonl), made up."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.jsonl", "w") as f:
        for step in range(1, steps + 1):
            shares = {"q1": 0.3, "q2": 0.2, "q3": 0.1 * step / steps, "q4": 0.4 - 0.1 * step / steps + 0.1}
            data = {f"opd/tokens/{q}_share": v for q, v in shares.items()}
            data["opd/selected_token_fraction"] = 0.5
            f.write(json.dumps({"step": step, "data": data}) + "\n")
        f.write('{"step": 4, "data": {"opd/tok')  # a line still being written
    if with_pairs:
        with open(run_dir / "token_pairs.jsonl", "w") as f:
            for step in (1, steps):
                record = {
                    "step": step,
                    "entropy": [0.01 * i for i in range(50)],
                    "divergence": [0.02 * (50 - i) for i in range(50)],
                    "kept": [i % 2 for i in range(50)],
                }
                f.write(json.dumps(record) + "\n")
    return run_dir


def test_plot_draws_the_scatter_and_the_shares_from_the_run_files(tmp_path, capsys):
    run_dir = fake_run(tmp_path / "run")
    assert [s["step"] for s in quadrant_series(run_dir)] == [1, 2, 3]  # the half-written line is skipped
    assert main(["plot", str(run_dir)]) == 0
    assert (run_dir / "token_quadrants.png").stat().st_size > 10_000
    assert "skipped, not JSON" in capsys.readouterr().err
    # without sampled pairs: the shares alone
    bare = fake_run(tmp_path / "bare", with_pairs=False)
    assert main(["plot", str(bare), "--out", str(tmp_path / "bare.png")]) == 0
    assert (tmp_path / "bare.png").is_file()


def test_plot_names_a_directory_that_is_not_a_run(tmp_path, capsys):
    assert main(["plot", str(tmp_path)]) == 2
    assert "metrics.jsonl does not exist" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "data": {"actor/lr": 1e-6}}) + "\n")
    assert main(["plot", str(tmp_path)]) == 2
    assert "no opd/tokens/* metrics" in capsys.readouterr().err


def test_plot_command_imports_no_torch(tmp_path):
    code = "import sys, opd.tip; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


GROUPS = ("token_selection", "sample_weighting", "divergence_schedule")  # the opd.* method groups


@pytest.mark.parametrize(
    ("group", "name"),
    [(group, p.stem) for group in GROUPS for p in sorted((Path(CONFIGS) / group).glob("*.yaml"))],
)
def test_every_method_group_file_gives_overrides_of_a_valid_opd_config(group, name):
    """What the repro benchmarks pass on the command line (Hydra's override grammar, lists included)
    parses back to the group file's values, and they make a valid typed config."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    parsed = OverridesParser.create().parse_overrides(group_overrides(group, name))
    opd = OmegaConf.create()
    for override in parsed:
        OmegaConf.update(opd, override.key_or_group, override.value(), force_add=True)
    expected = OmegaConf.to_container(OmegaConf.load(Path(CONFIGS) / group / f"{name}.yaml"))["verl"]
    assert OmegaConf.to_container(opd) == expected
    config = OPDConfig.from_mapping(expected["opd"])
    if group == "token_selection":
        assert name.split("_")[0] in (config.token_selection.rule, config.token_selection.rule.split("_")[0])


def test_unknown_selection_name_is_refused_with_the_known_ones():
    with pytest.raises(FileNotFoundError, match="choose from"):
        group_overrides("token_selection", "top_half")
