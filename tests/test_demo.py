"""The demo's report: the validation curve read from verl's metrics file, and its plot."""

from __future__ import annotations

import pytest

from opd.demo import DIVERGENCE, VAL_ACCURACY, plot_curve, validation_curve


def _metrics():
    rows = [{"step": 0, "data": {VAL_ACCURACY: 0.2}}]
    for step in range(1, 5):
        data = {DIVERGENCE: 1.0 / step, "actor/lr": 1e-3}
        if step % 2 == 0:
            data[VAL_ACCURACY] = 0.2 + 0.1 * step
        rows.append({"step": step, "data": data})
    return rows


def test_validation_curve_keeps_validated_steps_with_their_divergence():
    curve = validation_curve(_metrics())
    assert [c["step"] for c in curve] == [0, 2, 4]
    assert [c["val_accuracy"] for c in curve] == pytest.approx([0.2, 0.4, 0.6])
    assert [c["divergence"] for c in curve] == [None, 0.5, 0.25]


def test_plot_is_a_png(tmp_path):
    path = tmp_path / "curve.png"
    plot_curve(_metrics(), path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
