"""Turn a search space and a parameter budget into candidate allocations.

The screen's Optuna sampler does not pick single modules; it tunes a *distribution* over
allocations (a preference weight per module type, a bias towards shallow or deep layers, a rank
cap). Each Tune trial draws a batch of candidates from its distribution, all inside the budget
band, and the sampler learns which distributions give the best proxy scores.
"""

from __future__ import annotations

import functools
import math
import operator

from abc import ABC, abstractmethod
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from orchestrator.allocation import Allocation, budget_params, uniform
from orchestrator.config import SpaceConfig
from orchestrator.errors import UserError
from orchestrator.models import AdaptableModule
from orchestrator.shortcuts import is_shortcut_item

__all__ = ["Budget", "space_modules", "make_budget", "distribution_space", "sample_allocations", "baseline_allocations",
           "Allocator", "ALLOCATORS", "register_allocator", "get_allocator", "summed_score"]


@dataclass(frozen=True)
class Budget:
    target: int
    tolerance: float

    # rounded to 6 decimals first: 46080 × 1.15 is 52991.99999999999 in floats, and its edge 52992 belongs to the band
    @property
    def low(self) -> int:
        return math.ceil(round(self.target * (1 - self.tolerance), 6))

    @property
    def high(self) -> int:
        return math.floor(round(self.target * (1 + self.tolerance), 6))

    def admits(self, params: int) -> bool:
        return self.low <= params <= self.high


def space_modules(modules: list[AdaptableModule], space: SpaceConfig) -> list[AdaptableModule]:
    """The modules (and, with `space.shortcuts`, the shortcut sites) the search may put an adapter on."""
    layers = sorted({m.layer for m in modules})
    if space.layers is not None:
        missing = [i for i in space.layers if i not in layers]
        if missing:
            raise UserError(f"space.layers: layers {missing} do not exist; this model has layers {layers[0]}..{layers[-1]}")
    types = set(space.module_types) | {f"shortcut.{kind}" for kind in space.shortcuts}
    chosen = [m for m in modules if m.type in types and (space.layers is None or m.layer in space.layers)]
    if not chosen:
        raise UserError("space.module_types: no module of the model matches the space; check module_types and layers")
    limit = min(min(m.in_features, m.out_features) for m in chosen)
    too_big = [r for r in space.ranks if r > limit]
    if too_big:
        raise UserError(f"space.ranks: {too_big} exceed {limit}, the smallest dimension of the searched modules; "
                        f"use ranks ≤ {limit}")
    return chosen


def make_budget(modules: list[AdaptableModule], space: SpaceConfig) -> Budget:
    budget = Budget(budget_params(modules, space.budget.params, space.budget.qv_rank), space.budget.tolerance)
    searchable = space_modules(modules, space)
    smallest = min(m.params_per_rank for m in searchable) * min(space.ranks)
    largest = sum(m.params_per_rank for m in searchable) * max(space.ranks)
    step = math.gcd(*(m.params_per_rank * r for m in searchable for r in space.ranks))  # every count is a multiple
    costs = [[m.params_per_rank * r // step for r in space.ranks] for m in searchable]
    if not _reachable(costs, -(-budget.low // step), budget.high // step, _lora_rows(searchable).tolist()):
        alone = " with a LoRA module on (shortcut sites alone cannot train)" if space.shortcuts else ""
        raise UserError(f"space.budget: {budget.target} params cannot be met by this space{alone} "
                        f"(possible: {smallest}..{largest} in steps of {step}, none in {budget.low}..{budget.high}); "
                        "change the budget, tolerance, ranks or module_types")
    return budget


def _reachable(costs: list[list[int]], low: int, high: int, lora: list[bool] | None = None) -> bool:
    """Whether one cost (or none) per module, with at least one `lora` module on (default: any module), sums into
    [low, high]: subset sums over two bitsets (bit s = sum s), of the picks without a lora module on and with one."""
    high = min(high, sum(max(options) for options in costs))  # no sum exceeds this: a huge budget needs no huge bitset
    if low > high:
        return False
    cap = (1 << (high + 1)) - 1

    def on(sums: int, options: list[int]) -> int:  # the sums with this module on, at one of its costs
        return functools.reduce(operator.or_, (sums << cost for cost in set(options))) & cap

    without, with_lora = 1, 0  # each module at most once: a sum without it stays, one with it is shifted by its cost
    for options, is_lora in zip(costs, lora or [True] * len(costs)):
        if is_lora:
            with_lora |= on(with_lora | without, options)
        else:
            without, with_lora = without | on(without, options), with_lora | on(with_lora, options)
    return with_lora >> low != 0


# ---------------------------------------------------------------- the sampled distribution


def distribution_space(space: SpaceConfig, caps: list[int]) -> dict:
    """Ray Tune search space of the allocation distribution (given to OptunaSearch); `caps`: reachable_caps."""
    from ray import tune

    types = list(space.module_types) + [f"shortcut.{kind}" for kind in space.shortcuts]
    params = {f"w_{t}": tune.uniform(0.0, 1.0) for t in types}
    params["depth_bias"] = tune.uniform(-1.0, 1.0)
    params["max_rank"] = tune.choice(caps)
    return params


def reachable_caps(modules: list[AdaptableModule], ranks: list[int], budget: Budget) -> list[int]:
    """The rank caps (max_rank) under which an allocation can fill the band: under a lower one every module at the
    cap stays below it, so a trial drawing it finds nothing, is recorded FAIL, and TPE, which ignores failed
    trials, never learns to avoid it (full_space.yaml: 1 of its 5 caps)."""
    everything = sum(m.params_per_rank for m in modules)
    return [r for r in ranks if everything * r >= budget.low]


def sample_allocations(params: dict, modules: list[AdaptableModule], ranks: list[int], budget: Budget,
                       count: int, rng: np.random.Generator, max_tries: int = 20) -> list[Allocation]:
    """Up to `count` distinct allocations inside the budget band, drawn from `params`' distribution."""
    depth = np.array([m.layer for m in modules], dtype=float)
    depth = (depth - depth.min()) / max(depth.max() - depth.min(), 1.0) * 2 - 1  # -1 shallow … +1 deep
    weights = np.array([params[f"w_{m.type}"] for m in modules]) + 1e-3
    weights = weights * np.exp(2.0 * params["depth_bias"] * depth)
    allowed = [r for r in ranks if r <= params["max_rank"]] or ranks[:1]
    found: dict[str, Allocation] = {}
    for _ in range(count * max_tries):
        if len(found) == count:
            break
        allocation = _draw(modules, weights / weights.sum(), allowed, budget, rng)
        if allocation is not None:
            found.setdefault(allocation.candidate_id, allocation)
    return list(found.values())


def _draw(modules, probs, ranks, budget: Budget, rng) -> Allocation | None:
    """Add modules in a weighted random order, each at a random allowed rank that still fits."""
    chosen, total = {}, 0
    for i in rng.choice(len(modules), size=len(modules), replace=False, p=probs):
        fitting = [r for r in ranks if total + r * modules[i].params_per_rank <= budget.high]
        if not fitting:
            continue
        rank = int(rng.choice(fitting))
        chosen[modules[i].name] = rank
        total += rank * modules[i].params_per_rank
        if budget.admits(total):  # before building the Allocation: this runs once per module of every draw
            allocation = Allocation.from_ranks(chosen)
            if allocation.lora_ranks:  # shortcuts alone cannot train
                return allocation
    return None


# ---------------------------------------------------------------- baselines


def baseline_allocations(modules: list[AdaptableModule], budget: Budget, names: list[str]) -> dict[str, Allocation]:
    """Uniform LoRA baselines at the rank that lands closest to the budget.

    uniform_qv is the habit (query+value); uniform_all puts the same rank on every Linear of every
    layer, so on small budgets its nearest integer rank can miss the band: its exact count is reported.
    """
    types = {"uniform_qv": ("query", "value"), "adalora": ("query", "value"),  # AdaLoRA ends at q,v's budget
             "uniform_all": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")}
    baselines = {}
    for name in names:
        per_rank = uniform(modules, types[name], 1).trainable_params(modules)
        baselines[name] = uniform(modules, types[name], max(1, round(budget.target / per_rank)))
    return baselines


# ---------------------------------------------------------------- the allocator registry
#
# An allocator turns the per-module, per-unit-of-rank scores of one proxy into candidate allocations
# inside the budget band. Shaped like the proxy registry (and Optuna's samplers): one narrow base
# class, a name → class table, a decorator that fills it and a lookup that names the YAML field.

_MAX_DP_CELLS = 20_000_000  # max(modules, 2 × rank choices) × kept solutions × 2 × budget units of the knapsack table


class Allocator(ABC):
    """Scores + budget → candidate allocations.

    `propose` is the contract the screen relies on: every allocation it returns lies inside the band
    (`budget.admits` of its exact parameter count), puts a rank on at least one LoRA module (shortcuts
    alone cannot train: PEFT needs a target), no two share a candidate id, at most `count` come back,
    and the same rng seed gives the same list. Subclasses implement `generate`; `propose`
    checks the inputs and enforces the contract on what `generate` yields.
    """

    name: str = ""
    uses_scores: bool = True  # False: placement ignores the proxy (controls: random, optuna)
    deterministic: bool = False  # True: the rng is not used, so one call gives everything it can give

    def propose(self, unit_scores: dict[str, float], modules: list[AdaptableModule], ranks: list[int], budget: Budget,
                count: int, rng: np.random.Generator, sign: float = 1.0,
                rank_caps: dict[str, int] | None = None) -> list[Allocation]:
        """Up to `count` distinct allocations inside the band; `sign`×score higher is better. With `rank_caps` (a
        calibrated score, see summed_score) a module's rank earns only up to its cap."""
        if count <= 0 or not modules:
            return []
        ranks = _check_ranks(ranks)
        values = _signed_values(unit_scores, modules, sign) if self.uses_scores else np.zeros(len(modules))
        caps = np.array([(rank_caps or {}).get(m.name, np.inf) for m in modules], dtype=float)
        found: dict[str, Allocation] = {}
        for allocation in self.generate(values, modules, ranks, budget, count, rng, caps):
            if allocation.lora_ranks and budget.admits(allocation.trainable_params(modules)):
                found.setdefault(allocation.candidate_id, allocation)
                if len(found) == count:
                    break
        return list(found.values())

    @abstractmethod
    def generate(self, values: np.ndarray, modules: list[AdaptableModule], ranks: list[int], budget: Budget,
                 count: int, rng: np.random.Generator, caps: np.ndarray) -> Iterable[Allocation]:
        """Allocations, best first. `values[i]` is sign × unit score of `modules[i]` (higher is better), earned by
        rank up to `caps[i]` (inf: uncapped)."""


ALLOCATORS: dict[str, type[Allocator]] = {}


def register_allocator(cls: type[Allocator]) -> type[Allocator]:
    ALLOCATORS[cls.name] = cls
    return cls


def get_allocator(name: str) -> Allocator:
    if name not in ALLOCATORS:
        raise UserError(f"screen.allocator: unknown allocator '{name}'; choose from {sorted(ALLOCATORS)}")
    return ALLOCATORS[name]()


def summed_score(unit_scores: dict[str, float], allocation: Allocation, rank_caps: dict[str, int] | None = None) -> float:
    """Σ rank × unit score: the candidate score every rank-linear proxy gives (proxies/base.py). With
    `rank_caps` a module's rank counts only up to its cap (a calibrated score: rank above it was not measured)."""
    caps = rank_caps or {}
    return float(sum(min(r, caps.get(name, r)) * unit_scores[name] for name, r in allocation.ranks))


def _check_ranks(ranks: list[int]) -> list[int]:
    if not ranks or any(not isinstance(r, (int, np.integer)) or r <= 0 for r in ranks):
        raise UserError(f"space.ranks: {list(ranks)} must be positive integers; e.g. [1, 2, 4, 8]")
    return sorted({int(r) for r in ranks})


def _signed_values(unit_scores: dict[str, float], modules: list[AdaptableModule], sign: float) -> np.ndarray:
    """sign × score per module; a NaN or infinite score ranks below every finite one."""
    missing = [m.name for m in modules if m.name not in unit_scores]
    if missing:
        raise UserError(f"screen.rank_by: the proxy scores have no entry for {len(missing)} searchable modules "
                        f"(e.g. {missing[0]}); delete module_scores.json of the run so the probe runs again")
    return signed_non_finite_last([float(unit_scores[m.name]) for m in modules], sign)


def signed_non_finite_last(scores, sign: float) -> np.ndarray:
    """sign × scores (a copy), a NaN or infinite one set below every finite one: an overflow is never the best."""
    values = np.array(scores, dtype=float) * (1.0 if sign >= 0 else -1.0)
    finite = np.isfinite(values)
    if not finite.all():
        values[~finite] = values[finite].min() - 1.0 if finite.any() else 0.0
    return values


def _order(values: np.ndarray) -> np.ndarray:
    """Module indices, best value first; ties keep model order."""
    return np.argsort(-values, kind="stable")


@register_allocator
class TopP(Allocator):
    """HeteroLoRA's static recipe: switch on the best-scored p% of modules, all at one fixed rank.

    For each allowed rank r the modules are taken in score order while they fit under the band's top
    (one that would overflow is skipped, a cheaper one further down may still fit); every prefix that
    lands inside the band is a candidate (r, p). O(|ranks| · n) after an O(n log n) sort; at most
    |ranks| · n candidates, so it may give fewer than `count`, or none in a band no prefix hits.
    """

    name = "top_p"
    deterministic = True

    def generate(self, values, modules, ranks, budget, count, rng, caps):
        order = _order(values)
        found = []
        for rank in ranks:
            chosen, total, value = {}, 0, 0.0
            for i in order:
                cost = rank * modules[i].params_per_rank
                if total + cost > budget.high:
                    continue
                chosen[modules[i].name] = rank
                total += cost
                value += min(rank, caps[i]) * values[i]
                if budget.admits(total):
                    found.append((value, Allocation.from_ranks(chosen)))
        found.sort(key=lambda item: -item[0])  # stable: equal values keep (rank, p) scan order
        return [allocation for _, allocation in found]


@register_allocator
class Knapsack(Allocator):
    """Maximise Σ value × min(rank, cap) under the band: a multiple-choice knapsack (one rank or off per module).

    Exact dynamic programme over the parameter count in units of g = gcd of every module's cost at
    every allowed rank (gcd(768, 1920) = 384 on MiniLM, so a 74k budget is ~200 units). It keeps the
    `count` best partial solutions per (module, units) state, so it returns the optimum followed by
    the next-best distinct allocations in order (the exact top-`count` of the whole band).
    Time O(n · H · k log k) with k = (|ranks|+1) · count, memory O(n · count · H), H = high / g;
    `count` is cut down when the table would pass 20 M cells, and refused if even one solution would.
    """

    name = "knapsack"
    deterministic = True

    def generate(self, values, modules, ranks, budget, count, rng, caps):
        choices = np.array([0, *ranks])
        gains = values[:, None] * np.minimum(choices[None, :], caps[:, None])  # rank above a cap earns nothing
        solutions = _knapsack(gains, _costs(modules, choices), budget, count, _lora_rows(modules))
        if solutions is None:
            raise UserError(f"screen.allocator: knapsack needs too large a table for a budget of {budget.target} params "
                            "with these module shapes; use proportional or top_p")
        return [_allocation(modules, choices, picks) for _, picks in solutions]


@register_allocator
class Proportional(Allocator):
    """Ranks proportional to the (shifted, positive) scores, fitted to the band.

    Target rank x_i = λ · w_i with w_i = s_i^γ, s_i the value rescaled to (0, 1]; each target is
    rounded to the nearest allowed rank (0 = off for tiny shares). λ is found by bisection (the
    parameter count is monotone in λ); a greedy fix-up then raises (or lowers) the module whose
    target is closest to its next (previous) allowed rank until the count is inside the band — that
    keeps higher scores on equal or higher ranks among modules of one shape. If the greedy step
    cannot land in the band, the exact knapsack picks the in-band ranks nearest to the targets.
    Candidates: γ = 1 first, then a fixed ladder of sharpnesses, then rng-jittered weights. Rank caps
    do not shape the fit; the screen ranks its candidates by the capped score.
    O(n · (60 + |ranks|)) per candidate plus the fix-up's O(n²) worst case.
    """

    name = "proportional"
    SHARPNESS = (1.0, 0.5, 2.0, 0.25, 4.0, 0.7, 1.4, 3.0, 0.35)
    JITTER = 0.5  # std of the log-normal weight noise of the later candidates
    TRIES_PER_CANDIDATE = 20

    def generate(self, values, modules, ranks, budget, count, rng, caps):
        if not _feasible(modules, ranks, budget):
            return
        spread = values.max() - values.min()
        shares = (values - values.min()) / spread if spread > 0 else np.ones(len(values))
        shares = shares + 1e-6  # positive: the worst module gets a tiny share, so it is rounded off
        for gamma in self.SHARPNESS:
            yield from self._fit(shares ** gamma, modules, ranks, budget)
        for _ in range(count * self.TRIES_PER_CANDIDATE):
            gamma = float(np.exp(rng.uniform(np.log(0.25), np.log(4.0))))
            weights = shares ** gamma * np.exp(self.JITTER * rng.standard_normal(len(shares)))
            yield from self._fit(weights, modules, ranks, budget)

    def _fit(self, weights, modules, ranks, budget) -> list[Allocation]:
        choices = np.array([0, *ranks])
        midpoints = (choices[:-1] + choices[1:]) / 2
        per_rank = np.array([m.params_per_rank for m in modules])

        def rounded(scale):
            targets = scale * weights
            picks = np.searchsorted(midpoints, targets, side="left")  # nearest allowed rank, ties to the lower
            return targets, picks, int(per_rank @ choices[picks])

        # bisection on log λ: at `low` every target rounds to 0, at `high` every module is at the top rank
        low, high = np.log(0.25 * ranks[0] / weights.max()), np.log(2.0 * ranks[-1] / weights.min())
        if rounded(np.exp(high))[2] < budget.low:
            return []
        for _ in range(60):  # the smallest scale whose count reaches the band's bottom
            middle = (low + high) / 2
            low, high = (low, middle) if rounded(np.exp(middle))[2] >= budget.low else (middle, high)
        low, high = np.exp(low), np.exp(high)
        lora = _lora_rows(modules)
        targets, picks, total = rounded(high)
        if budget.admits(total) and picks[lora].any():
            return [_allocation(modules, choices, picks)]
        for scale in (low, high):  # raise from just below the band, else lower from just above
            targets, picks, _ = rounded(scale)
            picks = _fix_up(picks, targets, choices, per_rank, budget)
            if picks is not None and picks[lora].any():  # shortcut sites alone cannot train: the knapsack requires one
                return [_allocation(modules, choices, picks)]
        nearest = -(choices[None, :] - targets[:, None]) ** 2
        solutions = _knapsack(nearest, _costs(modules, choices), budget, 1, lora)
        return [_allocation(modules, choices, picks) for _, picks in solutions or []]


@register_allocator
class RandomAllocator(Allocator):
    """The control (scores unused): modules in a uniformly random order, each at a random rank that fits, until the
    total enters the band. Not uniform over the band's allocations: a draw stops at the first total inside it, so it
    favours fewer modules and the band's low edge, as random search by hand would."""

    name = "random"
    uses_scores = False
    TRIES_PER_CANDIDATE = 20

    def generate(self, values, modules, ranks, budget, count, rng, caps):
        probs = np.full(len(modules), 1.0 / len(modules))
        for _ in range(count * self.TRIES_PER_CANDIDATE if _feasible(modules, ranks, budget) else 0):
            allocation = _draw(modules, probs, ranks, budget, rng)
            if allocation is not None:
                yield allocation


@register_allocator
class OptunaDistribution(Allocator):
    """The Optuna-driven distribution sampler (module docstring) as an allocator.

    In the screen, Optuna picks the distribution's parameters per Tune trial and calls
    `sample_allocations` itself; here they are drawn from the rng (uniform over `distribution_space`,
    rank caps too low to ever fill the band left out), a fresh distribution whenever one runs dry,
    so the allocator also works outside Tune.
    """

    name = "optuna"
    uses_scores = False
    DISTRIBUTIONS = 20

    def generate(self, values, modules, ranks, budget, count, rng, caps):
        types = list(dict.fromkeys(m.type for m in modules))
        reachable = reachable_caps(modules, ranks, budget)
        if not reachable or not _feasible(modules, ranks, budget):
            return
        seen: set[str] = set()
        for _ in range(self.DISTRIBUTIONS):
            params = {f"w_{t}": float(rng.uniform(0.0, 1.0)) for t in types}
            params["depth_bias"] = float(rng.uniform(-1.0, 1.0))
            params["max_rank"] = int(rng.choice(reachable))
            for allocation in sample_allocations(params, modules, ranks, budget, count - len(seen), rng):
                if allocation.candidate_id not in seen:
                    seen.add(allocation.candidate_id)
                    yield allocation
            if len(seen) >= count:
                return


# ---------------------------------------------------------------- shared pieces


def _costs(modules: list[AdaptableModule], choices: np.ndarray) -> np.ndarray:
    return np.array([m.params_per_rank for m in modules])[:, None] * choices[None, :]


def _allocation(modules: list[AdaptableModule], choices: np.ndarray, picks) -> Allocation:
    return Allocation.from_ranks({m.name: int(choices[j]) for m, j in zip(modules, picks)})


def _feasible(modules: list[AdaptableModule], ranks: list[int], budget: Budget) -> bool:
    """Whether any allocation with a LoRA module lands in the band (assumed so when the exact check is too large)."""
    choices = np.array([0, *ranks])
    costs = _costs(modules, choices)
    return _knapsack(np.zeros(costs.shape), costs, budget, 1, _lora_rows(modules)) != []


def _lora_rows(modules: list[AdaptableModule]) -> np.ndarray:
    """Which entries are LoRA modules (not shortcut sites): an allocation needs one of them on."""
    return np.array([not is_shortcut_item(m.name) for m in modules])


def _knapsack(gains: np.ndarray, costs: np.ndarray, budget: Budget, keep: int,
              required: np.ndarray | None = None) -> list[tuple[float, list[int]]] | None:
    """The `keep` best picks (one column per row of `gains`, column 0 = off) whose cost sum lies in the band
    and that switch on at least one `required` row (default: any row; shortcut sites alone cannot train).

    Exact multiple-choice knapsack with a k-best table: best[k, s] is the k-th best gain of the rows so far in
    state s = (a required row is on: 0/1, cost units). Any path in the top `keep` of a state extends a path in
    the top `keep` of its predecessor state, so the table loses nothing. Distinct paths are distinct
    allocations. Returns [(gain, picks)], best first, or None when the table would be too large.
    """
    unit = int(np.gcd.reduce(costs[costs > 0])) if (costs > 0).any() else 1
    low, high = -(-budget.low // unit), budget.high // unit
    if low > high:
        return []
    n, m = gains.shape
    width = high + 1  # states of one flag value; flag f's costs are columns f * width ...
    keep = min(keep, _MAX_DP_CELLS // (max(n, 2 * m) * 2 * width))  # fewer solutions rather than a huge table
    if keep < 1:
        return None
    required = np.ones(n, dtype=bool) if required is None else np.asarray(required, dtype=bool)
    steps = costs // unit
    best = np.full((keep, 2 * width), -np.inf)
    best[0, 0] = 0.0
    back = np.zeros((n, keep, 2 * width), dtype=np.int32)  # index into the stacked (move, previous k) axis
    moves = [[(j, before, int(before or (required[i] and j > 0))) for j in range(m) for before in (0, 1)]
             for i in range(n)]  # (column, flag before, flag after) of each row
    for i in range(n):
        stacked = np.full((len(moves[i]) * keep, 2 * width), -np.inf)
        for t, (j, before, after) in enumerate(moves[i]):
            step = int(steps[i, j])
            if step <= high:
                stacked[t * keep:(t + 1) * keep, after * width + step:(after + 1) * width] = (
                    best[:, before * width:(before + 1) * width - step] + gains[i, j])
        top = np.argsort(-stacked, axis=0, kind="stable")[:keep]
        best = np.take_along_axis(stacked, top, axis=0)
        back[i] = top
    ks, cs = np.nonzero(np.isfinite(best[:, width + low:]))  # flag 1 only
    cs = cs + low
    ends = np.lexsort((ks, cs, -best[ks, width + cs]))[:keep]  # best gain first; ties by cost, then table order
    solutions = []
    for k, c in zip(ks[ends].tolist(), cs[ends].tolist()):
        gain, picks, state = float(best[k, width + c]), [0] * n, width + c
        for i in range(n - 1, -1, -1):
            t, k = divmod(int(back[i, k, state]), keep)
            j, before, after = moves[i][t]
            picks[i] = j
            state = before * width + state - after * width - int(steps[i, j])
        solutions.append((gain, picks))
    return solutions


def _fix_up(picks: np.ndarray, targets: np.ndarray, choices: np.ndarray, per_rank: np.ndarray,
            budget: Budget) -> np.ndarray | None:
    """Step single modules between adjacent allowed ranks until the count is in the band, or None.

    Lowering takes the module whose target is nearest its previous rank, raising the one whose target
    is nearest its next rank: among modules of one shape the higher target never ends lower.
    """
    picks = picks.copy()
    total = int(per_rank @ choices[picks])
    while total > budget.high:
        movable = np.flatnonzero(picks > 0)
        i = movable[np.argmin(targets[movable] - choices[picks[movable] - 1])]
        total -= int(per_rank[i] * (choices[picks[i]] - choices[picks[i] - 1]))
        picks[i] -= 1
    while total < budget.low:
        top = picks < len(choices) - 1
        step = np.where(top, choices[np.minimum(picks + 1, len(choices) - 1)] - choices[picks], 0) * per_rank
        movable = np.flatnonzero(top & (total + step <= budget.high))
        if not len(movable):
            return None
        i = movable[np.argmin(choices[picks[movable] + 1] - targets[movable])]
        total += int(step[i])
        picks[i] += 1
    return picks
