"""``make bench-step`` at toy sizes: it runs both paths in their own processes, writes its JSON and prints
its table (its numbers are measured by running it, never asserted here: machines are noisy)."""

from __future__ import annotations

import json

from opd.bench.step import main

TOY = ["--rows", "3", "--micro-rows", "2", "--response-median", "12", "--response-max", "40",
       "--student-hidden", "64", "--teacher-hidden", "128", "--layers", "1"]  # fmt: skip


def test_bench_step_compares_the_packed_and_padded_steps(tmp_path, capsys):
    out = tmp_path / "step.json"
    main([*TOY, "--out", str(out)])
    report = json.loads(out.read_text())
    new, old = report["results"]["packed"], report["results"]["padded"]
    assert new["target_tokens"] == old["target_tokens"] > 0
    assert new["logit_rows_per_target_token"] == 1.0 < old["logit_rows_per_target_token"]
    for phase in ("teacher", "student"):
        assert new[f"{phase}_s"] > 0 and old[f"{phase}_peak_bytes"] > 0
    signals = report["results"]["signals"]
    assert signals["hidden"]["bytes_per_token"] == 2 * 128  # bf16 hidden states of the 128-wide teacher
    assert signals["hidden"]["head_bytes"] == 151_936 * 128 * 4  # the fp32 head over the vocabulary, once
    assert signals["logits"]["bytes_per_token"] == 2 * 151_936 and signals["sampled"]["bytes_per_token"] == 8
    table = capsys.readouterr().out
    assert "logit rows per target token" in table and "new/padded" in table and "wrote" in table


def test_bench_tip_measures_the_phase_and_its_parts_per_rule(tmp_path, capsys):
    """``make bench-tip`` at toy sizes: every token and one rule, each in its own process."""
    from opd.bench.tip import main as tip_main

    out = tmp_path / "tip.json"
    tip_main([*TOY, "--rules", "random", "--ratios", "0.5", "--out", str(out)])
    report = json.loads(out.read_text())
    every, random_half = report["results"]
    assert (every["rule"], random_half["rule"]) == ("all", "random")
    assert every["kept_fraction"] == 1.0 and 0.4 <= random_half["kept_fraction"] <= 0.6
    assert every["transformer_s"] > 0 and "transformer_s" not in random_half  # measured once
    for r in (every, random_half):
        assert r["phase_s"] > 0 and r["kept_s"] > 0 and r["head_grad_bytes"] == 151_936 * 64 * 4
    assert "kept part" in capsys.readouterr().out
