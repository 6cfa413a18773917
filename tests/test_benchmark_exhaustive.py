"""benchmarks/exhaustive.py: the small space stays in the budget band, and the arms are scored as documented."""

from __future__ import annotations

import itertools
import math
import sys
from pathlib import Path

import pandas as pd
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import _common as C  # noqa: E402
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


def mean_over_orders(models: pd.DataFrame, goal: float, groups: list) -> float:
    """Brute force: device-hours to reach `goal`, averaged over every order that keeps the groups in place."""
    blocks = [list(members) for _, members in itertools.groupby(range(len(models)), key=lambda i: groups[i])]
    orders = [list(itertools.chain(*parts)) for parts in itertools.product(*map(itertools.permutations, blocks))]
    hours = [C.hours_to_reach(models.accuracy.iloc[order], models.device_hours.iloc[order], goal) for order in orders]
    return sum(hours) / len(hours)


def test_expected_hours_to_reach_is_the_mean_over_every_order_of_each_tied_group():
    models = models_table().assign(device_hours=[0.3, 1.1, 0.7, 2.0, 0.2])  # a and b are within 0.5 point of the best
    assert C.expected_hours_to_reach(models.accuracy, models.device_hours, 0.60) == pytest.approx(
        mean_over_orders(models, 0.60, [0] * 5))  # one group: a fully random order
    backwards = models.iloc[::-1]
    for groups in ([1, 2, 2, 2, 3], [1, 1, 2, 3, 3], [1, 2, 3, 4, 5]):
        assert C.expected_hours_to_reach(backwards.accuracy, backwards.device_hours, 0.60, groups) == pytest.approx(
            mean_over_orders(backwards, 0.60, groups))
    assert math.isnan(C.expected_hours_to_reach(models.accuracy, models.device_hours, 0.70))  # none gets there


def test_exact_ties_are_order_free_and_said_in_the_table():
    # c, d, e tie on p (minimised: a, b first); b is the best, a and d are within 0.5 point of it
    models = pd.DataFrame({"label": list("abcde"), "accuracy": [0.597, 0.60, 0.55, 0.598, 0.45],
                           "accuracy_std": [0.01] * 5, "device_hours": [1.0, 2.0, 0.5, 1.5, 0.7],
                           "proxy_p": [2.0, 1.0, 3.0, 3.0, 3.0]})
    def arm(frame, k, name="lora-search (p, maximize)"):
        return exhaustive.arms(frame, k=k, probe_hours=0.0, shipped=("p", "minimize")).set_index("arm").loc[name]
    listed, shuffled = models, models.iloc[[4, 3, 0, 2, 1]]
    # maximised: c, d, e (a tie, in a random order), then a, b: within 0.5 point as soon as d is trained
    assert arm(listed, 2).hours_to_within == pytest.approx(mean_over_orders(listed.iloc[[2, 3, 4]], 0.60, [0] * 3))
    for k in (1, 2, 3, 4):
        pd.testing.assert_series_equal(arm(listed, k), arm(shuffled, k), check_exact=False)
    row = arm(listed, 1)  # 1 of the 3 tied models: the expectation over which
    assert row.best_label == "expected (1 of 3 tied)" and row.tied_at_k == "1 of 3"
    assert row.best_accuracy == pytest.approx((0.55 + 0.598 + 0.45) / 3) and row.device_hours == pytest.approx(0.9)
    assert arm(listed, 3).tied_at_k == "" and arm(listed, 3).best_label == "d"  # the whole tie is trained: a pick
    shipped = arm(listed, 3, "lora-search (p, minimize) — as shipped")  # b, a, then one of the three
    assert shipped.best_label == "b" and shipped.tied_at_k == "1 of 3" and shipped.device_hours == pytest.approx(3.9)


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


def test_every_candidate_table_leaves_missing_cells_blank(monkeypatch):
    from argparse import Namespace
    from collections import defaultdict

    monkeypatch.setattr(sys, "argv", ["exhaustive.py"])
    models = models_table().assign(proxy_calibrated=[0.5, 3.0, float("nan"), 1.0, 0.0])  # a proxy without a score
    table = exhaustive.arms(models, k=2, probe_hours=0.1, shipped=("p", "minimize"), calibration_hours=0.5)
    text = exhaustive.markdown(table, models, defaultdict(str), Namespace(quick=False, survivors=2, seeds=[0]), "Task", 36.0)
    assert "nan" not in text.split("## Every candidate")[1]


def test_probe_seconds_count_the_warm_up_once():
    from dataclasses import asdict

    from orchestrator.proxies.probe import ModuleScores

    scores = ModuleScores({}, seconds={"grad_norm": 2.0, "fisher": 3.0}, warmup_seconds=40.0)
    assert C.probe_seconds(asdict(scores)) == 45.0  # as orchestrator.report.cost_breakdown counts the probe
    assert C.probe_seconds({"seconds": {"grad_norm": 2.0}}) == 2.0  # a probe without warm-up
