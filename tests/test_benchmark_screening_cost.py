"""benchmarks/screening_cost.py: the report's Command line is the one that produced its numbers, and its table
leaves the measurements a row does not have blank."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import screening_cost  # noqa: E402

FLAGS = ["--sizes", "100", "500", "--candidates-per-trial", "50", "--epoch-train-size", "1000", "--eval-size", "100",
         "--repeats", "2"]


def test_command_line_keeps_every_flag_and_missing_cells_are_blank(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["screening_cost.py", *FLAGS])
    args = screening_cost.parse_args()
    rows = [{"kind": "probe", "seconds": 9.0}, {"kind": "epoch", "seconds": 120.0}]
    rows += [{"kind": "tune", "n_candidates": n, "num_trials": n // 50, "distinct_candidates": n, "seconds": 5.0 + n / 100,
              "cpu_seconds": 4.0, "seconds_with_probe": 14.0 + n / 100, "per_trial_s": 0.5, "rss_before_mb": 1500.0,
              "rss_after_mb": 1510.0, "rss_growth_mb": 10.0, "load_avg": "1 / 1 / 1", "note": ""} for n in args.sizes]
    frame = pd.DataFrame(rows).assign(ratio_vs_epoch=np.nan, ms_per_candidate=np.nan)
    text = screening_cost.markdown(frame, defaultdict(str), args, 120.0, 9.0, 5.0, 1, SimpleNamespace(seconds={"grad_norm": 4.0}))
    assert f"Command: `python benchmarks/screening_cost.py {' '.join(FLAGS)}`" in text
    table = text.split("## All measurements")[1]
    assert "| probe " in table and "nan" not in table


def test_ratio_vs_epoch_is_probe_plus_screen_over_one_epoch():
    frame = pd.DataFrame([{"kind": "epoch", "seconds": 120.0}, {"kind": "tune", "seconds_with_probe": 30.0}])
    assert screening_cost.ratio_vs_epoch(frame, 120.0).tolist()[1] == 0.25
    assert screening_cost.ratio_vs_epoch(frame, 120.0).isna().tolist() == [True, False]
    assert screening_cost.ratio_vs_epoch(frame[["kind"]], 120.0).isna().all()  # no row screened: blank, not a KeyError
