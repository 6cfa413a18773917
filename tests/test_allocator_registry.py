"""The allocator registry: scores + budget → candidates inside the band, on synthetic MiniLM-shaped modules.

No model is loaded: modules carry MiniLM-L6's shapes (attention 384×384 = 768 params per rank,
FFN 384×1536 = 1920), scores are seeded random numbers or small hand-made tables.
"""

from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from orchestrator import allocators
from orchestrator.allocation import Allocation
from orchestrator.allocators import ALLOCATORS, Allocator, Budget, get_allocator, register_allocator, summed_score
from orchestrator.config import ScreenConfig
from orchestrator.errors import UserError
from orchestrator.models import AdaptableModule

SHAPES = {"query": (384, 384), "key": (384, 384), "value": (384, 384), "attention.output.dense": (384, 384),
          "intermediate.dense": (384, 1536), "output.dense": (1536, 384)}
RANKS = [1, 2, 4, 8, 16]
NAMES = ["knapsack", "optuna", "proportional", "random", "top_p"]
SCORED = ["knapsack", "proportional", "top_p"]
BUDGETS = [Budget(9216, 0.05), Budget(73728, 0.05), Budget(9216, 0.0), Budget(73728, 0.0)]


def module(layer: int, kind: str) -> AdaptableModule:
    name = f"bert.encoder.layer.{layer}.{'attention.self.' if kind in ('query', 'key', 'value') else ''}{kind}"
    return AdaptableModule(name, layer, kind, *SHAPES[kind])


MINILM = [module(layer, kind) for layer in range(6) for kind in SHAPES]


def random_scores(seed: int, modules=MINILM) -> dict[str, float]:
    return {m.name: float(s) for m, s in zip(modules, np.random.default_rng(seed).normal(size=len(modules)))}


def propose(name, scores, budget, count=25, seed=0, sign=1.0, modules=MINILM, ranks=RANKS):
    return get_allocator(name).propose(scores, modules, ranks, budget, count, np.random.default_rng(seed), sign)


def best(scores, allocations, sign=1.0) -> float:
    return max(sign * summed_score(scores, a) for a in allocations)


# ---------------------------------------------------------------- registry


def test_registry_holds_every_allocator():
    assert sorted(ALLOCATORS) == NAMES
    for name in NAMES:
        allocator = get_allocator(name)
        assert isinstance(allocator, Allocator) and allocator.name == name
    assert {n for n in NAMES if get_allocator(n).uses_scores} == set(SCORED)
    assert {n for n in NAMES if get_allocator(n).deterministic} == {"knapsack", "top_p"}


def test_unknown_allocator_names_the_yaml_field():
    with pytest.raises(UserError) as err:
        get_allocator("greedy")
    assert str(err.value) == ("screen.allocator: unknown allocator 'greedy'; "
                              "choose from ['knapsack', 'optuna', 'proportional', 'random', 'top_p']")


def test_registered_allocator_gets_the_contract_enforced():
    """`propose` drops what a (buggy) subclass yields outside the band or twice, and stops at `count`."""
    low_q, high_q = MINILM[0], MINILM[6]  # L0.query, L1.query

    @register_allocator
    class Sloppy(Allocator):
        name = "sloppy_test"

        def generate(self, values, modules, ranks, budget, count, rng, caps):
            yield Allocation.from_ranks({low_q.name: 1})  # 768 params: below the band
            yield Allocation.from_ranks({low_q.name: 2})  # 1536: inside
            yield Allocation.from_ranks({low_q.name: 2})  # duplicate
            yield Allocation.from_ranks({high_q.name: 2})  # inside
            yield Allocation.from_ranks({low_q.name: 1, high_q.name: 1})  # inside, beyond count

    try:
        found = propose("sloppy_test", random_scores(0), Budget(1536, 0.0), count=2)
        assert [a.as_dict() for a in found] == [{low_q.name: 2}, {high_q.name: 2}]
    finally:
        del ALLOCATORS["sloppy_test"]


def test_screen_config_accepts_every_allocator():
    if "allocator" not in {f.name for f in dataclasses.fields(ScreenConfig)}:
        pytest.skip("screen.allocator is not wired into config.py yet")
    assert ScreenConfig().allocator == "optuna"
    for name in NAMES:
        assert ScreenConfig(allocator=name).allocator == name
    with pytest.raises(UserError, match=r"^screen\.allocator: "):
        ScreenConfig(allocator="greedy")


# ---------------------------------------------------------------- the contract, for every allocator


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: f"{b.target}@{b.tolerance}")
@pytest.mark.parametrize("name", NAMES)
def test_inside_band_distinct_deterministic(name, budget):
    scores = random_scores(7)
    found = propose(name, scores, budget, seed=3)
    again = propose(name, scores, budget, seed=3)
    assert found, "the band is feasible: every allocator finds something"
    if name != "top_p":  # top_p gives one candidate per in-band (rank, p) only
        assert len(found) == 25
    assert found == again
    assert len({a.candidate_id for a in found}) == len(found)
    names = {m.name for m in MINILM}
    for allocation in found:
        assert budget.admits(allocation.trainable_params(MINILM)), (name, allocation.trainable_params(MINILM))
        assert set(allocation.as_dict()) <= names and set(allocation.as_dict().values()) <= set(RANKS)


@pytest.mark.parametrize("name", NAMES)
def test_generate_itself_stays_in_band(name):
    """The built-ins do not lean on `propose`'s filter: everything they generate is inside the band."""
    budget = Budget(9216, 0.0)
    allocator = get_allocator(name)
    values = np.array(list(random_scores(2).values()))
    produced = list(itertools.islice(allocator.generate(values, MINILM, RANKS, budget, 10, np.random.default_rng(0),
                                                   np.full(len(MINILM), np.inf)), 60))
    assert produced and all(budget.admits(a.trainable_params(MINILM)) for a in produced)


@pytest.mark.parametrize("name", NAMES)
def test_seed_dependence(name):
    scores, budget = random_scores(1), Budget(73728, 0.05)
    ids = lambda seed: [a.candidate_id for a in propose(name, scores, budget, count=10, seed=seed)]  # noqa: E731
    if get_allocator(name).deterministic:
        assert ids(0) == ids(1)
    else:
        assert ids(0) != ids(1)


@pytest.mark.parametrize("name", NAMES)
def test_infeasible_band_gives_nothing(name):
    # every cost is a multiple of 384, so an exact 20,000 cannot be met
    assert propose(name, random_scores(0), Budget(20000, 0.0)) == []


@pytest.mark.parametrize("name", NAMES)
def test_count_zero_and_narrow_ranks(name):
    assert propose(name, random_scores(0), Budget(9216, 0.05), count=0) == []
    found = propose(name, random_scores(0), Budget(9216, 0.05), count=5, ranks=[2])
    assert found and all(set(a.as_dict().values()) == {2} for a in found)


@pytest.mark.parametrize("name", SCORED)
def test_missing_score_is_a_user_error(name):
    scores = random_scores(0)
    del scores[MINILM[3].name]
    with pytest.raises(UserError, match=r"^screen\.rank_by: the proxy scores have no entry for 1 searchable modules"):
        propose(name, scores, Budget(9216, 0.05))


def test_controls_ignore_scores():
    for name in ("random", "optuna"):
        assert propose(name, {}, Budget(9216, 0.05), count=5) == propose(name, random_scores(4), Budget(9216, 0.05), count=5)


# ---------------------------------------------------------------- sign


@pytest.mark.parametrize("name", SCORED)
def test_minimise_equals_maximising_the_negated_scores(name):
    scores = random_scores(5)
    negated = {k: -v for k, v in scores.items()}
    for budget in (Budget(9216, 0.05), Budget(73728, 0.0)):
        assert propose(name, scores, budget, sign=-1.0) == propose(name, negated, budget, sign=1.0)
        assert propose(name, scores, budget, sign=-1.0) != propose(name, scores, budget, sign=1.0)


# ---------------------------------------------------------------- top_p (HeteroLoRA static)

# two layers of query, value (768 params per rank) and intermediate.dense (1920), one hand-made score each
TABLE = [module(0, "query"), module(1, "value"), module(0, "intermediate.dense"),
         module(1, "query"), module(0, "value"), module(1, "intermediate.dense")]
TABLE_SCORES = dict(zip((m.name for m in TABLE), [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]))


def test_top_p_golden():
    # band 2938..3974. r=1: 768 + 768 + 1920 = 3456 in band; the next three overflow and are skipped.
    # r=2: 1536 + 1536 = 3072 in band; the FFN (3840 more) and the rest overflow. Best summed score first.
    budget = Budget(3456, 0.15)
    found = propose("top_p", TABLE_SCORES, budget, modules=TABLE, ranks=[1, 2])
    q0, v1, ffn0, q1, v0, ffn1 = (m.name for m in TABLE)
    assert [a.as_dict() for a in found] == [{q0: 2, v1: 2}, {q0: 1, v1: 1, ffn0: 1}]
    assert [summed_score(TABLE_SCORES, a) for a in found] == [18.0, 12.0]
    # minimising reverses the order: the 0-scored FFN of layer 1 comes first
    found = propose("top_p", TABLE_SCORES, budget, modules=TABLE, ranks=[1, 2], sign=-1.0)
    assert [a.as_dict() for a in found] == [{ffn1: 2}, {ffn1: 1, v0: 1, q1: 1}]


def test_top_p_takes_the_best_modules_first():
    scores = random_scores(11)
    order = sorted(MINILM, key=lambda m: -scores[m.name])
    for allocation in propose("top_p", scores, Budget(73728, 0.05)):
        on = set(allocation.as_dict())
        assert len(set(allocation.as_dict().values())) == 1  # one fixed rank
        # every module better than the worst chosen one is chosen, unless it alone would overflow the band
        worst = max(i for i, m in enumerate(order) if m.name in on)
        skipped = [m for m in order[:worst] if m.name not in on]
        rank = allocation.ranks[0][1]
        for m in skipped:
            assert allocation.trainable_params(MINILM) + rank * m.params_per_rank > 73728 * 1.05


def test_top_p_nan_scores_rank_last():
    scores = dict(TABLE_SCORES)
    scores[TABLE[0].name] = float("nan")
    found = propose("top_p", scores, Budget(3456, 0.15), modules=TABLE, ranks=[1, 2])
    q0, v1, ffn0, q1, v0, ffn1 = (m.name for m in TABLE)
    assert found[0].as_dict() == {v1: 2, q1: 2}


# ---------------------------------------------------------------- knapsack


def brute_force(scores, modules, ranks, budget, sign=1.0):
    solutions = []
    for picks in itertools.product([0, *ranks], repeat=len(modules)):
        allocation = Allocation.from_ranks({m.name: r for m, r in zip(modules, picks)})
        if budget.admits(allocation.trainable_params(modules)):
            solutions.append((sign * summed_score(scores, allocation), allocation))
    return sorted(solutions, key=lambda item: -item[0])


TINY = [module(0, "query"), module(0, "value"), module(0, "intermediate.dense"), module(0, "output.dense")]


@pytest.mark.parametrize("sign", [1.0, -1.0])
@pytest.mark.parametrize("budget", [Budget(5376, 0.1), Budget(3840, 0.0), Budget(2000, 0.5)],
                         ids=lambda b: f"{b.target}@{b.tolerance}")
def test_knapsack_equals_brute_force(budget, sign):
    scores = dict(zip((m.name for m in TINY), [3.1, -1.7, 5.3, 2.9]))
    truth = brute_force(scores, TINY, [1, 2], budget, sign)
    assert truth
    top = propose("knapsack", scores, budget, count=5, modules=TINY, ranks=[1, 2], sign=sign)
    assert top[0] == truth[0][1]  # the optimum (unique here)
    assert [sign * summed_score(scores, a) for a in top] == pytest.approx([v for v, _ in truth[:5]])
    # asking for more than exist returns every feasible allocation, best first
    every = propose("knapsack", scores, budget, count=100, modules=TINY, ranks=[1, 2], sign=sign)
    assert {a.candidate_id for a in every} == {a.candidate_id for _, a in truth}
    assert [sign * summed_score(scores, a) for a in every] == pytest.approx([v for v, _ in truth])


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: f"{b.target}@{b.tolerance}")
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_knapsack_beats_every_other_allocator(budget, sign):
    scores = random_scores(13)
    optimum = best(scores, propose("knapsack", scores, budget, count=1, sign=sign), sign)
    for name in NAMES:
        found = propose(name, scores, budget, sign=sign)
        assert optimum >= best(scores, found, sign) - 1e-9, name
    ranked = [sign * summed_score(scores, a) for a in propose("knapsack", scores, budget, sign=sign)]
    assert ranked == sorted(ranked, reverse=True) and ranked[0] == pytest.approx(optimum)


def test_knapsack_keeps_fewer_solutions_rather_than_a_huge_table(monkeypatch):
    scores, budget = random_scores(13), Budget(73728, 0.05)
    full = propose("knapsack", scores, budget)
    monkeypatch.setattr(allocators, "_MAX_DP_CELLS", 36 * 2 * (77414 // 384 + 1) * 3)  # room for 3 solutions per state
    assert propose("knapsack", scores, budget) == full[:3]


def test_knapsack_refuses_an_oversized_table():
    odd = [AdaptableModule("m.layer.0.a", 0, "query", 500, 501), AdaptableModule("m.layer.0.b", 0, "value", 500, 500)]
    with pytest.raises(UserError, match=r"^screen\.allocator: knapsack needs too large a table"):
        propose("knapsack", {m.name: 1.0 for m in odd}, Budget(5_000_000, 0.05), modules=odd, ranks=list(range(1, 4000)))


# ---------------------------------------------------------------- proportional


@pytest.mark.parametrize("budget", BUDGETS, ids=lambda b: f"{b.target}@{b.tolerance}")
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_proportional_gives_higher_ranks_to_higher_scores(budget, seed):
    scores = random_scores(seed)
    (first,) = propose("proportional", scores, budget, count=1)
    ranks = first.as_dict()
    for shape in {m.params_per_rank for m in MINILM}:
        same = sorted((m for m in MINILM if m.params_per_rank == shape), key=lambda m: scores[m.name])
        got = [ranks.get(m.name, 0) for m in same]
        assert got == sorted(got), (shape, got)
    assert ranks.get(max(scores, key=scores.get), 0) > 0  # the best module is on
    assert min(scores, key=scores.get) not in ranks  # the worst module's share rounds to 0


def test_proportional_spreads_rank_unlike_knapsack():
    scores, budget = random_scores(3), Budget(73728, 0.05)
    (proportional,) = propose("proportional", scores, budget, count=1)
    (knapsack,) = propose("knapsack", scores, budget, count=1)
    assert len(proportional.ranks) > len(knapsack.ranks)
    assert len(set(proportional.as_dict().values())) >= 3  # several rank levels, not one fixed rank


# ---------------------------------------------------------------- shortcut sites (HeteroLoRA's extended space)


@pytest.mark.parametrize("name", NAMES)
def test_shortcut_sites_are_allocated_like_modules(name):
    shortcuts = pytest.importorskip("orchestrator.shortcuts")
    sites = [shortcuts.ShortcutSite("residual", layer, 384, 384) for layer in range(6)]
    space = MINILM + sites
    scores = random_scores(9, space) | {site.name: 10.0 for site in sites}  # the shortcuts score best
    budget = Budget(9216, 0.05)  # exact, the band holds no top_p prefix with a LoRA module (six sites at r2 fill it)
    found = propose(name, scores, budget, count=10, modules=space)
    assert found and all(budget.admits(a.trainable_params(space)) for a in found)
    if name in SCORED:
        assert set(found[0].as_dict()) & {site.name for site in sites}


@pytest.mark.parametrize("name", NAMES)
def test_no_allocation_is_shortcuts_alone(name):
    """Six residual sites at r2 make 9,216 params, in the band, and they score best; PEFT cannot train shortcuts alone."""
    shortcuts = pytest.importorskip("orchestrator.shortcuts")
    sites = [shortcuts.ShortcutSite("residual", layer, 384, 384) for layer in range(6)]
    space = MINILM + sites
    scores = random_scores(9, space) | {site.name: 10.0 for site in sites}
    found = propose(name, scores, Budget(9216, 0.05), count=25, modules=space, ranks=[1, 2])
    assert found and all(a.lora_ranks for a in found), [a.compact(space) for a in found if not a.lora_ranks]


@pytest.mark.parametrize("name", ["knapsack", "proportional"])  # top_p takes score-ordered prefixes only: it has none
def test_a_single_lora_allocation_is_found_beside_a_better_scored_shortcut_site(name):
    """One query module and one residual site at 768 params each, a 768-param band: L0.query:1 is the only
    allocation; the shortcut site scores higher, and proportional's fit put the rank there and found nothing."""
    shortcuts = pytest.importorskip("orchestrator.shortcuts")
    space = [module(0, "query"), shortcuts.ShortcutSite("residual", 0, 384, 384)]
    found = propose(name, {space[0].name: 1.0, space[1].name: 10.0}, Budget(768, 0.0), count=5, modules=space, ranks=[1])
    assert [a.as_dict() for a in found] == [{space[0].name: 1}]


def test_knapsack_and_top_p_maximise_the_capped_score_the_screen_ranks_by():
    """A calibrated score earns rank only up to each module's measured rank (ModuleScores.rank_caps): the knapsack's
    first candidate is the best capped score in the band (brute force), not the best uncapped one."""
    modules = [module(layer, kind) for layer in range(2) for kind in ("query", "value")]  # 768 params per rank each
    unit = {modules[0].name: 3.0, modules[1].name: 1.0, modules[2].name: 2.0, modules[3].name: 1.5}
    caps = {modules[0].name: 1, modules[1].name: 4, modules[2].name: 1, modules[3].name: 4}
    ranks, budget = [1, 2, 4], Budget(4 * 768, 0.0)
    every = [Allocation.from_ranks({m.name: r for m, r in zip(modules, picks) if r})
             for picks in itertools.product([0, *ranks], repeat=len(modules))]
    inside = [a for a in every if a.lora_ranks and budget.admits(a.trainable_params(modules))]
    capped_best = max(summed_score(unit, a, caps) for a in inside)
    assert capped_best > summed_score(unit, max(inside, key=lambda a: summed_score(unit, a)), caps)  # the caps matter
    found = get_allocator("knapsack").propose(unit, modules, ranks, budget, 3, np.random.default_rng(0), rank_caps=caps)
    assert summed_score(unit, found[0], caps) == capped_best
    top_p = get_allocator("top_p").propose(unit, modules, ranks, budget, 3, np.random.default_rng(0), rank_caps=caps)
    scores = [summed_score(unit, a, caps) for a in top_p]
    assert scores == sorted(scores, reverse=True)  # best first by the capped score
