"""Warm start: the best allocations of an earlier run are trained again on a new task."""

import pandas as pd
import pytest

from orchestrator.allocation import searchable_units
from orchestrator.errors import UserError
from orchestrator.models import adaptable_modules, load_model
from orchestrator.pipeline import warm_start_allocations


@pytest.fixture(scope="module")
def modules():
    base = load_model("minilm-l6", 2)
    return searchable_units(base, adaptable_modules(base), ("residual",))


def _earlier_run(tmp_path, rows):
    pd.DataFrame(rows).to_parquet(tmp_path / "report.parquet")
    return str(tmp_path)


def test_best_searched_allocations_by_mean_accuracy(tmp_path, modules):
    run = _earlier_run(tmp_path, [
        {"kind": "searched", "allocation": "L0.query:8", "accuracy": 0.70},
        {"kind": "searched", "allocation": "L0.query:8", "accuracy": 0.90},  # mean 0.80
        {"kind": "searched", "allocation": "L1.value:4,L2.shortcut.residual:2", "accuracy": 0.85},
        {"kind": "searched", "allocation": "L5.key:2", "accuracy": 0.60},
        {"kind": "baseline", "allocation": "L3.query:1", "accuracy": 0.99},  # baselines are never warm starts
    ])
    chosen = warm_start_allocations(run, modules, count=2)
    assert [a.compact(modules) for a in chosen] == ["L1.value:4,L2.shortcut.residual:2", "L0.query:8"]


def test_no_warm_start_without_a_run(modules):
    assert warm_start_allocations(None, modules, count=2) == []


def test_refuses_runs_without_searched_models_or_outside_the_space(tmp_path, modules):
    with pytest.raises(UserError, match="no trained searched model"):
        warm_start_allocations(_earlier_run(tmp_path, [{"kind": "baseline", "allocation": "L0.query:8", "accuracy": 0.9}]),
                               modules, count=1)
    with pytest.raises(UserError, match="space.shortcuts"):
        warm_start_allocations(_earlier_run(tmp_path, [{"kind": "searched", "allocation": "L1.shortcut.cross_layer:2",
                                                        "accuracy": 0.9}]), modules, count=1)
    with pytest.raises(UserError, match="report"):
        warm_start_allocations(str(tmp_path / "missing"), modules, count=1)
