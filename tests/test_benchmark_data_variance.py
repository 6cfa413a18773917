"""benchmarks/data_variance.py: the spreads it reports come from the right groupings."""

from __future__ import annotations

import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import data_variance  # noqa: E402

KEEP, ZERO = data_variance.DROPOUTS  # the checkpoint's dropout, then 0


def test_effects_separate_sample_seed_and_paired_dropout_gain():
    rows = pd.DataFrame([
        # split, dropout, seed, accuracy: split 1 is 7 points easier; dropout 0 adds 2 and 4 points on split 0
        (0, KEEP, 0, 0.40), (0, KEEP, 1, 0.44), (0, ZERO, 0, 0.42), (0, ZERO, 1, 0.48),
        (1, KEEP, 0, 0.47), (1, KEEP, 1, 0.51), (1, ZERO, 0, 0.49), (1, ZERO, 1, 0.55),
    ], columns=["split_seed", "dropout", "seed", "accuracy"])
    found = data_variance.effects(rows)
    assert found["sample_range_pts"] == pytest.approx({KEEP: 7.0, ZERO: 7.0})
    assert found["seed_range_pts_mean"] == pytest.approx((4 + 6 + 4 + 6) / 4)
    assert found["dropout0_gain_pts_mean"] == pytest.approx(3.0) and found["dropout0_gain_pts_min"] == pytest.approx(2.0)
    assert found["dropout0_gain_pairs"] == 4


def test_effects_without_a_dropout_pair_leave_the_gain_blank():
    rows = pd.DataFrame([(0, KEEP, 0, 0.40), (1, KEEP, 0, 0.45)], columns=["split_seed", "dropout", "seed", "accuracy"])
    found = data_variance.effects(rows)
    assert found["sample_range_pts"] == pytest.approx({KEEP: 5.0}) and found["dropout0_gain_pairs"] == 0
    assert found["dropout0_gain_pts_mean"] != found["dropout0_gain_pts_mean"]  # NaN


def test_sample_range_is_per_dropout_not_over_both_averaged(monkeypatch):
    # the samples differ by 4 points with the checkpoint's dropout and 6 with dropout 0; averaged together, 5
    rows = pd.DataFrame([(0, KEEP, 0, 0.40), (1, KEEP, 0, 0.44), (0, ZERO, 0, 0.40), (1, ZERO, 0, 0.46)],
                        columns=["split_seed", "dropout", "seed", "accuracy"])
    assert data_variance.effects(rows)["sample_range_pts"] == pytest.approx({KEEP: 4.0, ZERO: 6.0})
    monkeypatch.setattr(data_variance.C, "context_line", lambda ctx: "machine")
    assert "**4.0 points** with dropout checkpoint (0.1); **6.0 points** with dropout 0" in data_variance.markdown(
        rows.assign(majority_rate=0.05), data_variance.effects(rows), {}, "cmd")
