"""Run the proxies once on a probe model and turn per-module scores into per-candidate scores."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import islice

import torch

from orchestrator.allocation import Allocation, apply_lora, attach_allocation_shortcuts
from orchestrator.data import Split, make_loader
from orchestrator.models import AdaptableModule, load_model, load_tokenizer
from orchestrator.proxies.base import get_proxy


@dataclass
class ModuleScores:
    """Per-unit-rank scores: {proxy: {module name: score}}, and what each proxy cost."""

    unit: dict[str, dict[str, float]]
    seconds: dict[str, float] = field(default_factory=dict)

    def score(self, proxy: str, allocation: Allocation) -> float:
        return get_proxy(proxy).candidate_score(self.unit[proxy], allocation)

    def scores(self, allocation: Allocation) -> dict[str, float]:
        return {proxy: self.score(proxy, allocation) for proxy in self.unit}


def score_modules(model_name: str, num_labels: int, split: Split, modules: list[AdaptableModule],
                  proxies: list[str], *, probe_rank: int, num_batches: int, batch_size: int,
                  max_length: int, seed: int) -> ModuleScores:
    """One probe adapter of rank `probe_rank` on every searchable module and shortcut site; each proxy scores it once."""
    torch.manual_seed(seed)
    probe = Allocation.from_ranks({m.name: probe_rank for m in modules})
    model = apply_lora(load_model(model_name, num_labels, seed), probe)
    attach_allocation_shortcuts(model, probe, seed)
    loader = make_loader(split, load_tokenizer(model_name), max_length, batch_size, shuffle=True, seed=seed)
    batches = list(islice(loader, num_batches))
    result = ModuleScores({})
    for name in proxies:
        proxy = get_proxy(name)
        torch.manual_seed(seed)  # proxies that draw random numbers stay deterministic
        start = time.perf_counter()
        result.unit[name] = proxy.module_scores(model, batches, modules, probe_rank)
        result.seconds[name] = time.perf_counter() - start
    return result
