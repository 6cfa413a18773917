"""benchmarks/exhaustive.py: the small space stays in the budget band, and the arms are scored as documented."""

from __future__ import annotations

import itertools
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import exhaustive  # noqa: E402

from orchestrator.allocation import uniform  # noqa: E402
from orchestrator.allocators import Budget  # noqa: E402
from orchestrator.models import AdaptableModule  # noqa: E402

TYPES = {"query": (384, 384), "key": (384, 384), "value": (384, 384), "attention.output.dense": (384, 384),
         "intermediate.dense": (384, 1536), "output.dense": (1536, 384)}


@pytest.fixture
def minilm_modules():
    """MiniLM-L6's adaptable Linear modules (6 layers, hidden 384, FFN 1,536), without loading it."""
    return [AdaptableModule(f"l{layer}.{kind}", layer, kind, *shape) for layer in range(6) for kind, shape in TYPES.items()]


def test_small_space_is_twelve_distinct_allocations_inside_the_band(minilm_modules):
    space = exhaustive.small_space(minilm_modules, quick=False)
    budget = Budget(9216, 0.05)
    params = {label: a.trainable_params(minilm_modules) for label, a in space.items()}
    assert len(space) == 12 and len({a.candidate_id for a in space.values()}) == 12
    assert all(budget.low <= p <= budget.high for p in params.values()), params
    assert space["q+v r1"] == uniform(minilm_modules, ("query", "value"), 1)  # the uniform_qv baseline is in the space
    assert params["ffn_up L0-4 r1"] == 5 * (384 + 1536)


def test_quick_space_is_the_uniform_baseline_and_ffn_up(minilm_modules):
    full, quick = exhaustive.small_space(minilm_modules, quick=False), exhaustive.small_space(minilm_modules, quick=True)
    assert list(quick) == list(exhaustive.QUICK_LABELS) and all(quick[label] == full[label] for label in quick)
    assert len(quick) == 2 and "q+v r1" in quick and any(label.startswith("ffn_up") for label in quick)


def models_table():
    # accuracy, and a proxy that ranks them backwards (largest score = worst model)
    return pd.DataFrame({"label": list("abcde"), "accuracy": [0.60, 0.596, 0.55, 0.50, 0.45],
                         "accuracy_std": [0.01] * 5, "device_hours": [1.0, 1.0, 1.0, 1.0, 1.0],
                         "proxy_p": [1.0, 2.0, 3.0, 4.0, 5.0]})


def test_arms_pick_top_k_in_each_direction_and_charge_the_probe():
    table = exhaustive.arms(models_table(), k=2, probe_hours=0.5, shipped=("p", "minimize")).set_index("arm")
    every = table.loc["train every candidate"]
    assert every.best_accuracy == 0.60 and every.device_hours == 5.0 and every.share_of_exhaustive_hours == 1.0
    shipped = table.loc["lora-search (p, minimize) — as shipped"]  # picks a and b
    assert shipped.best_label == "a" and shipped.gap_pts == 0.0
    assert shipped.device_hours == 2.5 and shipped.hours_to_within == 1.5 and shipped.share_of_exhaustive_hours == 0.5
    assert not shipped.meets_target  # within 0.5 point, but 50% of the hours > 20%
    backwards = table.loc["lora-search (p, maximize)"]  # picks e and d
    assert backwards.best_label == "d" and backwards.gap_pts == pytest.approx(-10.0)
    assert backwards.hours_to_within == 4.0 + 0.5  # e, d, c, b (4 trainings + the probe): b is the first within 0.5 point
    assert not backwards.within_0_5


def test_random_arm_is_the_exact_expectation_over_subsets():
    table = exhaustive.arms(models_table(), k=2, probe_hours=0.0, shipped=("p", "minimize")).set_index("arm")
    rnd = table.loc["random 2 (expected)"]
    # 10 pairs; best-of-pair is a in 4, b in 3, c in 2, d in 1
    assert rnd.best_accuracy == pytest.approx((4 * 0.60 + 3 * 0.596 + 2 * 0.55 + 0.50) / 10)
    assert rnd.p_within == pytest.approx(0.7)
    assert rnd.device_hours == 2.0
    # a or b first (2 of 5 models within 0.5 point): expected position 2 in a random order → 2 device-hours
    assert rnd.hours_to_within == pytest.approx(2.0)
    assert "uniform_qv (q+v r1)" not in table.index  # no q+v r1 among these candidates


def test_uniform_qv_row_is_its_own_model():
    models = models_table().assign(label=["a", "b", exhaustive.UNIFORM_QV, "d", "e"])
    row = exhaustive.arms(models, k=2, probe_hours=0.0, shipped=("p", "minimize")).set_index("arm").loc["uniform_qv (q+v r1)"]
    assert row.best_accuracy == 0.55 and row.gap_pts == pytest.approx(-5.0) and row.device_hours == 1.0
    assert row.hours_to_within != row.hours_to_within  # NaN: it never gets within 0.5 point


def test_calibrated_arm_is_maximised_only_and_charged_its_calibration():
    models = models_table().assign(proxy_calibrated=[0.5, 3.0, 2.0, 1.0, 0.0])  # ranks b, c, d, a, e
    table = exhaustive.arms(models, k=2, probe_hours=0.5, shipped=("p", "minimize"), calibration_hours=1.5).set_index("arm")
    assert "lora-search (calibrated, minimize)" not in table.index
    row = table.loc["lora-search (calibrated, maximize)"]  # trains b and c
    assert row.best_label == "b" and row.gap_pts == pytest.approx(-0.4) and row.within_0_5
    assert row.device_hours == 2.0 + 0.5 + 1.5 and row.hours_to_within == 1.0 + 0.5 + 1.5
    assert table.loc["lora-search (p, minimize) — as shipped", "device_hours"] == 2.5  # the probe only: no calibration


def test_calibrated_types_are_the_ones_the_space_uses(minilm_modules):
    def used(quick):
        return {m.type for a in exhaustive.small_space(minilm_modules, quick).values() for m in minilm_modules
                if m.name in a.as_dict()}

    assert used(quick=False) == set(exhaustive.module_types(quick=False))
    assert set(exhaustive.module_types(quick=True)) < used(quick=True) and len(exhaustive.module_types(quick=True)) == 2


def test_expected_hours_in_random_order_is_the_mean_over_every_order():
    models = models_table().assign(device_hours=[0.3, 1.1, 0.7, 2.0, 0.2])  # a and b are within 0.5 point of the best
    every_order = [exhaustive.hours_to_reach(list(order), models, 0.60) for order in itertools.permutations(range(5))]
    assert exhaustive.expected_hours_in_random_order(models, 0.60) == pytest.approx(sum(every_order) / len(every_order))


def test_lr_gets_its_own_runs_folder_and_needs_out(monkeypatch, tmp_path):
    from argparse import Namespace

    shipped = Namespace(lr=None, seeds=[0], quick=False)
    root, overrides = exhaustive.run_setup(shipped, tmp_path / "full")
    assert root == tmp_path / "full" and not any(o.startswith("train.lr=") for o in overrides)
    root, overrides = exhaustive.run_setup(Namespace(lr=8e-3, seeds=[0], quick=False), tmp_path / "full")
    assert root == tmp_path / "full-lr0.008" and "train.lr=0.008" in overrides
    monkeypatch.setattr(sys, "argv", ["exhaustive.py", "--lr", "8e-3"])
    with pytest.raises(SystemExit) as exit_:  # the default folder holds the space's own tables
        exhaustive.parse_args()
    assert exit_.value.code == 2


def test_report_keeps_every_flag_and_leaves_missing_cells_blank(monkeypatch):
    from argparse import Namespace
    from collections import defaultdict

    monkeypatch.setattr(sys, "argv", ["exhaustive.py", "--survivors", "3", "--seeds", "0", "1"])
    models = models_table().assign(proxy_calibrated=[0.5, 3.0, 2.0, 1.0, 0.0])
    table = exhaustive.arms(models, k=3, probe_hours=0.1, shipped=("p", "minimize"), calibration_hours=0.5)
    args = Namespace(quick=False, survivors=3, seeds=[0, 1], lr=None)
    text = exhaustive.markdown(table, models, defaultdict(str), args, "Task: 5 models", 36.0)
    assert "Command: `python benchmarks/exhaustive.py --survivors 3 --seeds 0 1`" in text
    arms = text.split("## Arms")[1].split("## Every candidate")[0]
    assert "| train every candidate " in arms and "nan" not in arms  # p_within: the random arm's only
