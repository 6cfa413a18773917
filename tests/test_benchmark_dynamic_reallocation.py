"""benchmarks/dynamic_reallocation.py: variants named from the product's trial files, summarised per variant."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import dynamic_reallocation as D  # noqa: E402


def trial(kind: str, method: str, seed: int, accuracy: float, status: str = "completed", **extra) -> dict:
    return {"kind": kind, "method": method, "seed": seed, "accuracy": accuracy, "f1": accuracy - 0.01, "status": status,
            "trainable_params": 73728, "trained_params": 73728, "peak_memory_mb": 900.0, "latency_ms_per_batch": 40.0,
            "train_wall_s": 100.0, "device_hours": 100 / 3600, **extra}


def test_run_one_trials_are_named_by_kind_and_method():
    assert D.variant(trial("baseline", "lora", 0, 0.78)) == D.BASELINE
    assert D.variant(trial("searched", "lora", 0, 0.76)) == D.STATIC
    assert D.variant(trial("searched", "dynamic", 0, 0.76)) == D.DAMPED


def test_summary_per_variant_with_gain_over_static_and_failed_trainings_left_out():
    moved = {"reallocations": 5, "held_reallocations": 0, "moved_rank": 300, "trained_params": 221184}
    held = {"reallocations": 0, "held_reallocations": 5, "moved_rank": 0, "trained_params": 221184}
    trials = {f"{i}": t for i, t in enumerate([
        trial("baseline", "lora", 0, 0.79), trial("baseline", "lora", 1, 0.80),
        trial("searched", "lora", 0, 0.76), trial("searched", "lora", 1, 0.78),
        trial("searched", "dynamic", 0, 0.75, **held), trial("searched", "dynamic", 1, 0.77, **held),
        trial("searched", "dynamic", 2, float("nan"), status="failed")])}
    undamped = {"u0": trial("searched", "dynamic", 0, 0.58, **moved), "u1": trial("searched", "dynamic", 1, 0.60, **moved)}
    rows = pd.DataFrame(D.rows_of(trials, D.variant) + D.rows_of(undamped, lambda t: D.UNDAMPED_NAME))
    table = D.summarise(rows).set_index("variant")
    assert list(table.index) == D.ORDER  # whatever order the trial files come in
    assert table.seeds[D.DAMPED] == 2  # the failed seed 2 is not counted
    assert table.accuracy[D.STATIC] == pytest.approx(0.77)
    assert table.vs_static_pts[D.UNDAMPED_NAME] == pytest.approx(-18.0)
    assert table.vs_static_pts[D.BASELINE] == pytest.approx(2.5)
    assert np.isnan(table.p_vs_static[D.STATIC]) and table.p_vs_static[D.UNDAMPED_NAME] < 0.05
    assert np.isnan(table.reallocations[D.STATIC])  # a static model has none
    assert table.moved_rank[D.UNDAMPED_NAME] == 300 and table.held_reallocations[D.DAMPED] == 5
    assert table.device_hours[D.STATIC] == pytest.approx(200 / 3600)  # summed over seeds
    text = D.markdown(D.summarise(rows), rows, {"python": "3.11", "cpus": 2, "torch": "t", "transformers": "t",
                                                 "cpu": "c", "peft": "p", "ray": "r", "optuna": "o", "load_avg_1_5_15": "1 / 1 / 1"},
                      "python benchmarks/dynamic_reallocation.py", 60.0)
    assert "| dynamic, undamped " in text and "-18.0" in text and "5.0 / 0.0" in text and "221,184" in text
    assert "nan" not in text  # a static model's re-allocations read "—"
    assert "Failed or unfinished trainings: 1 (dynamic, damped (default) s2)" in text
