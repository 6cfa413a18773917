"""Turn a search space and a parameter budget into candidate allocations.

The screen's Optuna sampler does not pick single modules; it tunes a *distribution* over
allocations (a preference weight per module type, a bias towards shallow or deep layers, a rank
cap). Each Tune trial draws a batch of candidates from its distribution, all inside the budget
band, and the sampler learns which distributions give the best proxy scores.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from orchestrator.allocation import Allocation, budget_params, uniform
from orchestrator.config import SpaceConfig
from orchestrator.errors import UserError
from orchestrator.models import AdaptableModule


@dataclass(frozen=True)
class Budget:
    target: int
    tolerance: float

    @property
    def low(self) -> int:
        return int(np.ceil(self.target * (1 - self.tolerance)))

    @property
    def high(self) -> int:
        return int(np.floor(self.target * (1 + self.tolerance)))

    def admits(self, params: int) -> bool:
        return self.low <= params <= self.high


def space_modules(modules: list[AdaptableModule], space: SpaceConfig) -> list[AdaptableModule]:
    """The modules the search may put an adapter on."""
    layers = sorted({m.layer for m in modules})
    if space.layers is not None:
        missing = [i for i in space.layers if i not in layers]
        if missing:
            raise UserError(f"space.layers: layers {missing} do not exist; this model has layers {layers[0]}..{layers[-1]}")
    chosen = [m for m in modules if m.type in space.module_types and (space.layers is None or m.layer in space.layers)]
    if not chosen:
        raise UserError("space.module_types: no module of the model matches the space; check module_types and layers")
    too_big = [r for r in space.ranks if r > min(min(m.in_features, m.out_features) for m in chosen)]
    if too_big:
        raise UserError(f"space.ranks: {too_big} exceed the smallest module dimension; use smaller ranks")
    return chosen


def make_budget(modules: list[AdaptableModule], space: SpaceConfig) -> Budget:
    budget = Budget(budget_params(modules, space.budget.params, space.budget.qv_rank), space.budget.tolerance)
    searchable = space_modules(modules, space)
    smallest = min(m.params_per_rank for m in searchable) * min(space.ranks)
    largest = sum(m.params_per_rank for m in searchable) * max(space.ranks)
    if budget.high < smallest or budget.low > largest:
        raise UserError(f"space.budget: {budget.target} params cannot be met by this space "
                        f"(possible: {smallest}..{largest}); change the budget, ranks or module_types")
    return budget


# ---------------------------------------------------------------- the sampled distribution


def distribution_space(space: SpaceConfig) -> dict:
    """Ray Tune search space of the allocation distribution (given to OptunaSearch)."""
    from ray import tune

    params = {f"w_{t}": tune.uniform(0.0, 1.0) for t in space.module_types}
    params["depth_bias"] = tune.uniform(-1.0, 1.0)
    params["max_rank"] = tune.choice(space.ranks)
    return params


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
        if budget.admits(total):
            return Allocation.from_ranks(chosen)
    return None


# ---------------------------------------------------------------- baselines


def baseline_allocations(modules: list[AdaptableModule], budget: Budget, names: list[str]) -> dict[str, Allocation]:
    """Uniform LoRA baselines at the rank that lands closest to the budget.

    uniform_qv is the habit (query+value); uniform_all puts the same rank on every Linear of every
    layer, so on small budgets its nearest integer rank can miss the band: its exact count is reported.
    """
    types = {"uniform_qv": ("query", "value"),
             "uniform_all": ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")}
    baselines = {}
    for name in names:
        per_rank = uniform(modules, types[name], 1).trainable_params(modules)
        baselines[name] = uniform(modules, types[name], max(1, round(budget.target / per_rank)))
    return baselines
