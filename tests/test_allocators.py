"""Allocators: the budget band, candidate sampling inside it, the search-space filter and the baselines."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from orchestrator.allocators import (Budget, _reachable, baseline_allocations, distribution_space, make_budget,
                                     reachable_caps, sample_allocations, space_modules)
from orchestrator.allocation import budget_params
from orchestrator.config import MODULE_TYPES, BudgetConfig, SpaceConfig
from orchestrator.errors import UserError

RANKS = [1, 2, 4, 8]


def space(**kwargs) -> SpaceConfig:
    budget = kwargs.pop("budget", None) or BudgetConfig()
    return SpaceConfig(**({"ranks": RANKS} | kwargs), budget=budget)


def dist(max_rank=8, depth_bias=0.0, **weights) -> dict:
    return {f"w_{t}": weights.get(t.replace(".", "_"), 0.5) for t in MODULE_TYPES} | {
        "depth_bias": depth_bias, "max_rank": max_rank}


def test_budget_band():
    budget = Budget(2048, 0.05)
    assert (budget.low, budget.high) == (1946, 2150)  # ceil(1945.6), floor(2150.4)
    assert budget.admits(1946) and budget.admits(2150) and budget.admits(2048)
    assert not budget.admits(1945) and not budget.admits(2151)
    edge = Budget(46080, 0.15)  # 46080 × 1.15 is 52991.99999999999 in floats; 52992 is in the band
    assert (edge.low, edge.high) == (39168, 52992) and Budget(100, 0.15).high == 115
    exact = Budget(1000, 0.0)
    assert (exact.low, exact.high) == (1000, 1000)
    assert exact.admits(1000) and not exact.admits(999) and not exact.admits(1001)


def test_make_budget_qv_rank(tiny_modules):
    assert make_budget(tiny_modules, space()) == Budget(2048, 0.05)  # 4 q/v modules × 64 × 8
    assert make_budget(tiny_modules, space(budget=BudgetConfig(qv_rank=2, tolerance=0.1))) == Budget(512, 0.1)
    assert make_budget(tiny_modules, space(budget=BudgetConfig(params=3000, qv_rank=None))) == Budget(3000, 0.05)


@pytest.mark.parametrize("params", [10, 60, 10**7, 10**12])
def test_make_budget_refuses_unreachable(params, tiny_modules):
    # smallest candidate: one 64-param module at rank 1; largest: all 12 modules at rank 8 = 8 × 896
    with pytest.raises(UserError) as err:
        make_budget(tiny_modules, space(budget=BudgetConfig(params=params, qv_rank=None)))
    assert str(err.value).startswith(f"space.budget: {params} params cannot be met by this space (possible: 64..7168 in steps of 32")


def test_reachability_of_a_band_past_every_sum_builds_no_bitset_that_large():
    # before, a 10**12-param budget built a bitset of 10**12 / step bits (gigabytes, 15 s); 10**15 cannot even allocate
    assert not _reachable([[1, 2], [3]], 10**15, 10**15 + 5)
    assert _reachable([[1, 2], [3]], 5, 10**15)  # 2 + 3, and the sums stay bounded by the largest, 5


def test_make_budget_refuses_a_band_between_reachable_counts(tiny_modules):
    # query (64 params per rank) and intermediate.dense (96) in layer 0 at rank 1 make 0, 64, 96 or 160 params:
    # 128 is a multiple of their common step (32) and inside 64..160, yet no allocation has it
    one_layer = space(module_types=["query", "intermediate.dense"], layers=[0], ranks=[1])
    with pytest.raises(UserError, match=r"^space.budget: 128 params cannot be met .*none in 122..134\); change"):
        make_budget(tiny_modules, dataclasses.replace(one_layer, budget=BudgetConfig(params=128, qv_rank=None)))
    assert make_budget(tiny_modules, dataclasses.replace(one_layer, budget=BudgetConfig(params=160, qv_rank=None))).target == 160


def test_make_budget_band_edges(tiny_modules):
    # high = floor(64 × 1.05) = 67 ≥ 64: reachable; low of 7500 × 0.95 = 7125 ≤ 7168: reachable
    assert make_budget(tiny_modules, space(budget=BudgetConfig(params=64, qv_rank=None))).target == 64
    assert make_budget(tiny_modules, space(budget=BudgetConfig(params=7500, qv_rank=None))).target == 7500


def test_space_modules_filters(tiny_modules):
    assert space_modules(tiny_modules, space()) == tiny_modules
    chosen = space_modules(tiny_modules, space(module_types=["query", "output.dense"], layers=[1]))
    assert [m.short for m in chosen] == ["L1.query", "L1.output.dense"]
    chosen = space_modules(tiny_modules, space(module_types=["attention.output.dense"]))
    assert [m.short for m in chosen] == ["L0.attention.output.dense", "L1.attention.output.dense"]
    assert len(space_modules(tiny_modules, space(layers=[0]))) == 6


def test_space_modules_refuses_missing_layers(tiny_modules):
    with pytest.raises(UserError) as err:
        space_modules(tiny_modules, space(layers=[0, 5, 7]))
    assert str(err.value) == "space.layers: layers [5, 7] do not exist; this model has layers 0..1"


def test_space_modules_refuses_ranks_above_module_dimension(tiny_modules):
    space_modules(tiny_modules, space(ranks=[1, 32]))  # 32 = the smallest dimension: allowed
    with pytest.raises(UserError) as err:
        space_modules(tiny_modules, space(ranks=[4, 33, 64]))
    assert str(err.value) == ("space.ranks: [33, 64] exceed 32, the smallest dimension of the searched modules; "
                              "use ranks ≤ 32")


def test_sample_allocations_inside_band(tiny_modules):
    budget = make_budget(tiny_modules, space())
    found = sample_allocations(dist(), tiny_modules, RANKS, budget, 30, np.random.default_rng(0))
    assert len(found) == 30
    names = {m.name for m in tiny_modules}
    for allocation in found:
        params = allocation.trainable_params(tiny_modules)
        assert budget.low <= params <= budget.high, (allocation, params)
        assert set(allocation.as_dict()) <= names
        assert set(allocation.as_dict().values()) <= set(RANKS)
    assert len({a.candidate_id for a in found}) == len(found)


@pytest.mark.parametrize("tolerance, qv_rank", [(0.0, 2), (0.01, 4), (0.2, 1)])
def test_sample_allocations_inside_narrow_and_wide_bands(tolerance, qv_rank, tiny_modules):
    budget = make_budget(tiny_modules, space(budget=BudgetConfig(qv_rank=qv_rank, tolerance=tolerance)))
    found = sample_allocations(dist(), tiny_modules, RANKS, budget, 10, np.random.default_rng(3))
    assert found
    assert all(budget.admits(a.trainable_params(tiny_modules)) for a in found)


def test_sample_allocations_respects_max_rank(tiny_modules):
    budget = make_budget(tiny_modules, space())
    found = sample_allocations(dist(max_rank=4), tiny_modules, RANKS, budget, 10, np.random.default_rng(1))
    assert len(found) == 10 and all(max(a.as_dict().values()) <= 4 for a in found)
    # rank ≤ 2 on all 12 modules gives at most 2 × 896 = 1792 < 1946: nothing fits, nothing is returned
    assert sample_allocations(dist(max_rank=2), tiny_modules, RANKS, budget, 10, np.random.default_rng(1)) == []
    # a max_rank below every choice falls back to the smallest rank
    found = sample_allocations(dist(max_rank=0), tiny_modules, [4, 8], budget, 5, np.random.default_rng(1))
    assert found and all(set(a.as_dict().values()) == {4} for a in found)


def test_sample_allocations_deterministic(tiny_modules):
    budget = make_budget(tiny_modules, space())
    draw = lambda seed: sample_allocations(dist(), tiny_modules, RANKS, budget, 15, np.random.default_rng(seed))  # noqa: E731
    first, again, other = draw(42), draw(42), draw(43)
    assert [a.candidate_id for a in first] == [a.candidate_id for a in again]
    assert first == again
    assert [a.candidate_id for a in first] != [a.candidate_id for a in other]


def test_sample_allocations_follows_the_distribution(tiny_modules):
    budget = make_budget(tiny_modules, space())
    rng = np.random.default_rng(0)

    def mean_layer(depth_bias):
        found = sample_allocations(dist(depth_bias=depth_bias), tiny_modules, RANKS, budget, 40, rng)
        layer = {m.name: m.layer for m in tiny_modules}
        return np.mean([layer[name] for a in found for name in a.as_dict()])

    assert mean_layer(1.0) > 0.6 > 0.4 > mean_layer(-1.0)
    # modules of a weight-1 type come first in the draw order (weight ~0 elsewhere): every allocation
    # holds all four q/v modules, and the rest of the band is filled from the other types
    heavy = dist(query=1.0, key=0.0, value=1.0, attention_output_dense=0.0, intermediate_dense=0.0, output_dense=0.0)
    found = sample_allocations(heavy, tiny_modules, RANKS, budget, 20, np.random.default_rng(0))
    types = {m.name: m.type for m in tiny_modules}
    drawn = [types[name] for a in found for name in a.as_dict()]
    assert len(found) == 20
    assert drawn.count("query") == drawn.count("value") == 2 * len(found)


def test_sample_allocations_returns_fewer_when_space_is_small(tiny_modules):
    # one module, ranks {1, 2}: only one allocation (rank 2 = 128 params) fits a band of 128 ± 0
    only = [m for m in tiny_modules if m.short == "L0.query"]
    found = sample_allocations(dist(), only, [1, 2], Budget(128, 0.0), 5, np.random.default_rng(0))
    assert [a.as_dict() for a in found] == [{only[0].name: 2}]
    assert sample_allocations(dist(), only, [1, 2], Budget(100, 0.0), 5, np.random.default_rng(0)) == []


@pytest.mark.parametrize("budget_config, rank, params", [
    (BudgetConfig(qv_rank=8), 8, 2048),
    (BudgetConfig(qv_rank=3), 3, 768),
    (BudgetConfig(params=3000, qv_rank=None), 12, 3072),
    (BudgetConfig(params=10000, qv_rank=None), 39, 9984),
    (BudgetConfig(params=4000, qv_rank=None), 16, 4096),
])
def test_baseline_uniform_qv_near_budget(budget_config, rank, params, tiny_modules):
    budget = Budget(budget_params(tiny_modules, budget_config.params, budget_config.qv_rank), budget_config.tolerance)
    baselines = baseline_allocations(tiny_modules, budget, ["uniform_qv"])
    assert list(baselines) == ["uniform_qv"]
    allocation = baselines["uniform_qv"]
    assert {m.type for m in tiny_modules if m.name in allocation.as_dict()} == {"query", "value"}
    assert len(allocation.ranks) == 4 and set(allocation.as_dict().values()) == {rank}
    assert allocation.trainable_params(tiny_modules) == params
    assert abs(params - budget.target) <= 0.05 * budget.target


def test_baseline_without_names(tiny_modules):
    assert baseline_allocations(tiny_modules, Budget(2048, 0.05), []) == {}


def test_distribution_space_keys():
    params = distribution_space(space(module_types=["query", "value"]), RANKS)
    assert set(params) == {"w_query", "w_value", "depth_bias", "max_rank"}
    assert params["max_rank"].categories == RANKS


def test_the_screen_offers_only_rank_caps_that_can_fill_the_band(tiny_modules):
    """A trial drawing a lower cap finds no candidate and is recorded FAIL, which TPE ignores: it would keep
    drawing it."""
    everything = sum(m.params_per_rank for m in tiny_modules)
    budget = Budget(everything * 3, 0.5)  # the band starts at every module at rank 1.5
    caps = reachable_caps(tiny_modules, RANKS, budget)
    assert caps == [2, 4, 8]
    rng = np.random.default_rng(0)
    for cap in RANKS:
        params = {f"w_{m.type}": 1.0 for m in tiny_modules} | {"depth_bias": 0.0, "max_rank": cap}
        assert bool(sample_allocations(params, tiny_modules, RANKS, budget, 5, rng)) == (cap in caps), cap


def test_a_survivor_equal_to_a_baseline_leaves_the_baseline_its_own_row(tiny_modules, capsys):
    import pandas as pd

    from orchestrator.config import load_config
    from orchestrator.pipeline import _allocations_to_train

    budget = Budget(2048, 0.05)
    qv = baseline_allocations(tiny_modules, budget, ["uniform_qv"])["uniform_qv"]
    screen = pd.DataFrame({"candidate_id": [qv.candidate_id], "allocation": [qv.compact(tiny_modules)], "survivor": [True]})
    cfg = load_config(None, ["train.baselines=[uniform_qv,adalora]"])
    chosen = _allocations_to_train(screen, tiny_modules, budget, cfg, warm=[])
    assert {cid: (kind, label) for cid, (kind, label, _) in chosen.items()} == {
        qv.candidate_id: ("searched", "screen#1"), f"uniform_qv-{qv.candidate_id}": ("baseline", "uniform_qv"),
        f"adalora-{qv.candidate_id}": ("baseline", "adalora")}
    assert "baseline uniform_qv" not in capsys.readouterr().out  # r8 meets the band


def test_a_uniform_qv_baseline_outside_the_band_is_named(tiny_modules, capsys):
    import pandas as pd

    from orchestrator.config import load_config
    from orchestrator.pipeline import _allocations_to_train

    budget = Budget(384, 0.05)  # q,v r1 = 256 and r2 = 512 params on the tiny model: no rank meets 365..403
    screen = pd.DataFrame({"candidate_id": [], "allocation": [], "survivor": []})
    chosen = _allocations_to_train(screen, tiny_modules, budget, load_config(None, []), warm=[])
    assert [label for _, label, _ in chosen.values()] == ["uniform_qv"]
    assert ("baseline uniform_qv: no query,value rank meets the budget band 365..403; it trains at the nearest rank, "
            in capsys.readouterr().out)


def test_a_survivor_with_shortcut_sites_trains_static_only_and_is_named(tiny_modules, capsys):
    import pandas as pd

    from orchestrator.allocation import Allocation
    from orchestrator.config import load_config
    from orchestrator.pipeline import _allocations_to_train

    plain = Allocation.from_ranks({tiny_modules[0].name: 2})
    with_shortcut = Allocation.from_ranks({tiny_modules[1].name: 2, "L1.shortcut.residual": 1})
    screen = pd.DataFrame({"candidate_id": [plain.candidate_id, with_shortcut.candidate_id], "survivor": [True, True],
                           "allocation": [plain.compact(tiny_modules), with_shortcut.compact(tiny_modules)]})
    cfg = load_config(None, ["train.baselines=[]", "train.dynamic_every=0.2"])
    chosen = _allocations_to_train(screen, tiny_modules, Budget(2048, 0.05), cfg, warm=[])
    assert [label for _, label, _ in chosen.values()] == ["screen#1", "screen#2", "screen#1+dynamic"]
    assert "dynamic: no dynamic variant of screen#2 (shortcut sites: re-allocation moves LoRA ranks only)" \
        in capsys.readouterr().out


def test_reachability_needs_a_lora_module_on():
    # costs 3 (LoRA) and 2 (a shortcut site): 2 alone is no allocation; 3 and 5 are
    assert not _reachable([[3], [2]], 2, 2, [True, False])
    assert _reachable([[3], [2]], 5, 5, [True, False]) and _reachable([[3], [2]], 3, 3, [True, False])
    assert _reachable([[3], [2]], 2, 2)  # without flags every module counts (the old contract)


def test_make_budget_refuses_a_band_only_shortcut_sites_reach(tiny_model):
    """FFN-up (96 params per rank here) and residual shortcut sites (64): a 64-param band holds only a shortcut, which
    cannot train alone; refused at config time, not after the probe and the screen."""
    from orchestrator.allocation import searchable_units
    from orchestrator.models import adaptable_modules

    units = searchable_units(tiny_model, adaptable_modules(tiny_model), shortcut_kinds=("residual",))
    ffn_and_residual = space(module_types=["intermediate.dense"], shortcuts=["residual"], ranks=[1])
    with pytest.raises(UserError, match=r"^space.budget: 64 params cannot be met by this space with a LoRA module on "
                                        r"\(shortcut sites alone cannot train\)"):
        make_budget(units, dataclasses.replace(ffn_and_residual, budget=BudgetConfig(params=64, qv_rank=None, tolerance=0)))
    assert make_budget(units, dataclasses.replace(ffn_and_residual, budget=BudgetConfig(params=160, qv_rank=None))).target == 160
