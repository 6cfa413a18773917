"""Per-module normalisation of proxy scores before a candidate's rank-weighted sum.

A candidate scores Σ r · unit(m), so the per-unit scores of different modules must be on one scale.
Raw saliencies are not: a gradient sum over a module's adapter grows with its width (in + out
features), and module types differ by orders of magnitude (an FFN's Fisher dwarfs a query's).

- `none`: as the proxy reports it (Σ r · unit is then the proxy's value for the candidate's adapters).
- `per_param`: unit ÷ params_per_rank, the score per trainable parameter; removes the width artefact
  of sums over parameters, so a module is worth its rank only if its parameters are salient.
- `rank`: the module's rank among all modules, in [0, 1] (ties share; vote's normalisation for one
  proxy). Scale-free: one huge module cannot dominate the sum, only the order of modules counts.
- `type_z`: z-score within each module type (across layers). Removes every difference *between*
  types and keeps only the layer signal within a type: a diagnostic of what the proxy knows beyond
  module type, and a fix when the type gap is an artefact.

`rank` and `type_z` are computed over the finite scores; a non-finite score stays NaN, so the allocators rank it
below every finite one in either direction (one NaN in a type's mean would otherwise zero the whole type).
"""

from __future__ import annotations

import math
from collections import defaultdict

from orchestrator.proxies.vote import normalised_ranks

__all__ = ["NORMALISATIONS", "normalise"]

NORMALISATIONS = ("none", "per_param", "rank", "type_z")


def _type_z(scores: dict[str, float], modules) -> dict[str, float]:
    groups: dict[str, list[str]] = defaultdict(list)
    for m in modules:
        groups[m.type].append(m.name)
    out = {}
    for names in groups.values():
        values = [scores[n] for n in names if math.isfinite(scores[n])]
        mean = math.fsum(values) / max(len(values), 1)
        sd = math.sqrt(math.fsum((v - mean) ** 2 for v in values) / max(len(values), 1))
        # equal scores: 0, not ±1 from the last bit of a rounded mean (e.g. nwot's constant for shortcut sites)
        constant = not values or max(values) == min(values)
        out |= {n: 0.0 if constant else (scores[n] - mean) / sd for n in names if math.isfinite(scores[n])}
    return {m.name: out.get(m.name, math.nan) for m in modules}


def normalise(scores: dict[str, float], modules, how: str) -> dict[str, float]:
    """Per-unit scores of `modules` (objects with name, type, params_per_rank) normalised by `how`."""
    if how == "none":
        return dict(scores)
    if how == "per_param":
        return {m.name: scores[m.name] / m.params_per_rank for m in modules}
    if how == "rank":
        ranks = normalised_ranks({m.name: scores[m.name] for m in modules if math.isfinite(scores[m.name])})
        return {m.name: ranks.get(m.name, math.nan) for m in modules}
    if how == "type_z":
        return _type_z(scores, modules)
    raise ValueError(f"unknown normalisation '{how}'; choose from {NORMALISATIONS}")
