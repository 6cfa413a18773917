"""HeteroLoRA's dynamic variant: re-allocate rank during training under the same budget.

Every searchable module carries a LoRA adapter of the largest allowed rank R, and a mask on B's
columns keeps only r_m ≤ R of them live. Masked columns of B stay exactly zero, so the model
computes what the current allocation would. Their gradient is not zero, though: ∂L/∂B = (∂L/∂y)(A x)ᵀ
with A random, i.e. the `grad_norm` proxy of a module that is off. Every `every` fraction of an
epoch the accumulated per-unit scores go to an allocator (the same registry the screen uses), the
masks move, and the optimizer state of dropped columns is cleared; surviving columns keep theirs.
"""

from __future__ import annotations

import numpy as np
import torch

from orchestrator.allocation import Allocation
from orchestrator.allocators import Budget, get_allocator
from orchestrator.models import AdaptableModule
from orchestrator.proxies.grad_norm import lora_factors


def full_rank_allocation(modules: list[AdaptableModule], max_rank: int) -> Allocation:
    """The adapter every dynamic model carries: rank R on every searchable module (masked down to the budget)."""
    return Allocation.from_ranks({m.name: max_rank for m in modules})


class DynamicReallocator:
    def __init__(self, peft_model, modules: list[AdaptableModule], ranks: list[int], budget: Budget,
                 initial: Allocation, *, interval_steps: int, allocator: str, sign: float, seed: int):
        self.modules, self.ranks, self.budget = modules, ranks, budget
        self.max_rank = max(ranks)
        self.interval = max(1, interval_steps)
        self.allocator, self.sign = get_allocator(allocator), sign
        self.rng = np.random.default_rng(seed)
        self.factors = {m.name: lora_factors(peft_model, m.name) for m in modules}  # (A, B) weights
        self.active = {m.name: initial.as_dict().get(m.name, 0) for m in modules}
        self.scores = {m.name: 0.0 for m in modules}
        self.reallocations = 0
        self.moved_rank = 0  # Σ |Δr| over all re-allocations
        self._zero_masked_weights()

    @property
    def allocation(self) -> Allocation:
        return Allocation.from_ranks(self.active)

    def after_backward(self) -> None:
        """Accumulate every module's B-gradient score (live and masked columns), then mask the update."""
        for name, (_, b) in self.factors.items():
            if b.grad is None:
                continue
            self.scores[name] += float(b.grad.pow(2).sum()) / self.max_rank
            b.grad[:, self.active[name]:] = 0
            a = self.factors[name][0]
            if a.grad is not None:
                a.grad[self.active[name]:, :] = 0  # rows of A that feed masked columns stay as initialised

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        self._zero_masked_weights()  # weight decay or stale moments must not revive a masked column
        if (step + 1) % self.interval == 0:
            self.reallocate(optimizer)

    def reallocate(self, optimizer: torch.optim.Optimizer) -> None:
        proposals = self.allocator.propose(self.scores, self.modules, self.ranks, self.budget, 1, self.rng, self.sign)
        if not proposals:
            return  # nothing fits the band: keep the current allocation
        new = {m.name: proposals[0].as_dict().get(m.name, 0) for m in self.modules}
        for name, rank in new.items():
            if rank < self.active[name]:
                self._clear_columns(name, rank, optimizer)
            self.moved_rank += abs(rank - self.active[name])
        self.active = new
        self.scores = {name: 0.0 for name in self.scores}
        self.reallocations += 1
        self._zero_masked_weights()

    @torch.no_grad()
    def _zero_masked_weights(self) -> None:
        for name, (_, b) in self.factors.items():
            b[:, self.active[name]:] = 0

    @torch.no_grad()
    def _clear_columns(self, name: str, keep: int, optimizer: torch.optim.Optimizer) -> None:
        """Dropped rank: B's columns ≥ keep go to zero and forget their AdamW moments."""
        a, b = self.factors[name]
        for tensor, index in ((b, (slice(None), slice(keep, None))), (a, (slice(keep, None), slice(None)))):
            for moment in optimizer.state.get(tensor, {}).values():
                if torch.is_tensor(moment) and moment.shape == tensor.shape:
                    moment[index] = 0
        b[:, keep:] = 0
