"""benchmarks/search_quality.py: every search arm is scored from its own run, and each pays for what it ran
before training (the probe; the calibration trainings of the calibrated arm; nothing for random search)."""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import search_quality  # noqa: E402

PRICE = 0.05


def rows(kind_label_acc: list[tuple[str, str, str, float]], seeds=(0, 1)) -> pd.DataFrame:
    return pd.DataFrame([{"kind": kind, "label": label, "candidate_id": cid, "allocation": cid, "trainable_params": 9216,
                          "seed": seed, "accuracy": acc + 0.01 * seed, "device_hours": 0.05, "cost_usd": 0.05 * PRICE,
                          "beats_majority": True}
                         for kind, label, cid, acc in kind_label_acc for seed in seeds])


def run_dir(path: Path, probe_s: float, calibration: dict | None = None) -> Path:
    path.mkdir(parents=True)
    (path / "module_scores.json").write_text(json.dumps({"unit": {}, "seconds": {"grad_norm": probe_s}}))
    info = {"config": {"cost": {"price_per_device_hour": {"cpu": PRICE}}}} | ({"calibration": calibration} if calibration else {})
    (path / "run.json").write_text(json.dumps(info))
    return path


def test_each_search_arm_pays_for_what_it_ran_before_training(tmp_path):
    tables = {"lora-search": rows([("searched", "screen#1", "s1", 0.40), ("searched", "screen#2", "s2", 0.45),
                                   ("baseline", "uniform_qv", "qv", 0.44)]),
              "random search": rows([("searched", "screen#1", "r1", 0.47)]),
              "lora-search (calibrated)": rows([("searched", "screen#1", "c1", 0.50), ("searched", "screen#2", "c2", 0.49)])}
    calibration = {"trainings": 6, "seconds": 720.0, "device_hours": 0.2, "cost_usd": 0.2 * PRICE}
    dirs = {"lora-search": run_dir(tmp_path / "a", 36.0), "random search": None,
            "lora-search (calibrated)": run_dir(tmp_path / "c", 36.0, calibration)}
    arms, models = search_quality.summarise(tables, dirs, Namespace())
    a = arms.set_index("arm")
    assert list(a.index) == ["lora-search", "random search", "lora-search (calibrated)", "uniform_qv"]
    assert a.loc["lora-search", "device_hours"] == pytest.approx(4 * 0.05 + 0.01)  # 2 models × 2 seeds + the probe
    assert a.loc["random search", "device_hours"] == pytest.approx(2 * 0.05)  # reuses the probe
    assert a.loc["lora-search (calibrated)", "device_hours"] == pytest.approx(4 * 0.05 + 0.01 + 0.2)
    assert a.loc["lora-search (calibrated)", "search_s"] == pytest.approx(36.0 + 720.0)
    assert a.loc["lora-search (calibrated)", "cost_usd"] == pytest.approx((4 * 0.05 + 0.01 + 0.2) * PRICE)
    assert a.loc["lora-search (calibrated)", "best_label"] == "screen#1"
    assert a.loc["lora-search (calibrated)", "gain_vs_uniform_qv_pts"] == pytest.approx(6.0)
    # the first calibrated model is the best of any arm: reached after the probe, the calibration and one model's 2 seeds
    assert a.loc["lora-search (calibrated)", "hours_to_within_0_5_of_best"] == pytest.approx(0.01 + 0.2 + 0.1)
    assert set(models.arm) == set(a.index)
