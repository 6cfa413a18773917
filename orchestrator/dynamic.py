"""HeteroLoRA's dynamic variant: re-allocate rank during training under the same budget.

Every searchable module carries a LoRA adapter of the largest allowed rank R, and a mask on B's
columns keeps only r_m ≤ R of them live. Masked columns of B stay exactly zero, so the model
computes what the current allocation would. Their gradient is not zero, though: ∂L/∂B = (∂L/∂y)(A x)ᵀ
with A random, i.e. the `grad_norm` proxy of a module that is off. Every `every` fraction of an
epoch the accumulated per-unit scores go to an allocator (the same registry the screen uses), the
masks move, and the optimizer state of dropped columns is cleared; surviving columns keep theirs.
A column switched on later starts with empty AdamW moments, so its updates are bias-corrected by its own
age, not the tensor's step count (as a fresh AdamW of its own would).

Damping (a trust region): every switched-on column restarts at B = 0, so moving a lot of rank often
throws training away (undamped, knapsack moved 336 rank units in 5 steps on Rotten Tomatoes and the
model never left the majority class). A re-allocation therefore picks, among the allocator's best
proposals, the best one whose moved share of rank, Σ|Δr| / (Σr_old + Σr_new), is at most `max_move`
and that beats the current allocation's accumulated score by more than `min_gain` (relative); if
none does, nothing moves.
max_move = 1, min_gain = 0 is the undamped rule.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from orchestrator.allocation import Allocation
from orchestrator.allocators import Budget, get_allocator, summed_score
from orchestrator.models import AdaptableModule
from orchestrator.proxies.grad_norm import lora_factors


def full_rank_allocation(modules: list[AdaptableModule], max_rank: int) -> Allocation:
    """The adapter every dynamic model carries: rank R on every searchable module (masked down to the budget)."""
    return Allocation.from_ranks({m.name: max_rank for m in modules})


PROPOSALS = 32  # near-best allocations the trust region chooses from


def moved_rank(old: dict[str, int], new: dict[str, int]) -> int:
    """Σ |Δr| over every module either allocation adapts."""
    return sum(abs(new.get(name, 0) - old.get(name, 0)) for name in old.keys() | new.keys())


def moved_fraction(old: dict[str, int], new: dict[str, int]) -> float:
    """Share of all rank that changes: 0 = nothing moves, 1 = every old column off and every new one fresh."""
    return moved_rank(old, new) / max(1, sum(old.values()) + sum(new.values()))


class DynamicReallocator:
    def __init__(self, peft_model, modules: list[AdaptableModule], ranks: list[int], budget: Budget,
                 initial: Allocation, *, interval_steps: int, epoch_steps: int, total_steps: int, allocator: str,
                 sign: float, seed: int, max_move: float = 1.0, min_gain: float = 0.0):
        self.modules, self.ranks, self.budget = modules, ranks, budget
        self.epoch_steps, self.total_steps = epoch_steps, total_steps
        self.max_move, self.min_gain = max_move, min_gain
        self.max_rank = max(ranks)
        self.interval = max(1, interval_steps)
        self.allocator, self.sign = get_allocator(allocator), sign
        self.rng = np.random.default_rng(seed)
        self.factors = {m.name: lora_factors(peft_model, m.name) for m in modules}  # (A, B) weights
        self.active = {m.name: initial.as_dict().get(m.name, 0) for m in modules}
        self.scores = {m.name: 0.0 for m in modules}
        self.live_since = {m.name: [0] * self.max_rank for m in modules}  # optimizer step each column went live at
        self.before_step: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # (A, B) of late columns' modules
        self.reallocations = 0  # re-allocations that moved rank
        self.held = 0  # re-allocations the trust region refused (no proposal close and good enough)
        self.moved_rank = 0  # Σ |Δr| over all re-allocations
        self._park_a()
        self._zero_masked_weights()

    @property
    def allocation(self) -> Allocation:
        return Allocation.from_ranks(self.active)

    def state(self) -> dict:
        """What a restarted worker needs to go on as if it had not stopped (JSON-safe): the active ranks, the
        accumulated scores, the sampler's state and the counters the report shows."""
        return {"active": self.active, "scores": self.scores, "rng": self.rng.bit_generator.state,
                "reallocations": self.reallocations, "held": self.held, "moved_rank": self.moved_rank,
                "live_since": self.live_since}

    def load_state(self, state: dict) -> None:
        self.active, self.scores = state["active"], state["scores"]
        self.rng.bit_generator.state = state["rng"]
        self.reallocations, self.held, self.moved_rank = state["reallocations"], state["held"], state["moved_rank"]
        self.live_since = state.get("live_since", self.live_since)  # older checkpoints: every column as if live from 0
        self._park_a()  # the restored weights: the masked rows of A as the checkpoint holds them

    def after_backward(self) -> None:
        """Accumulate every module's B-gradient score (live and masked columns), then mask the update."""
        for name, (_, b) in self.factors.items():
            if b.grad is None:
                continue
            self.scores[name] += float(b.grad.pow(2).sum()) / self.max_rank
            b.grad[:, self.active[name]:] = 0
            a = self.factors[name][0]
            if a.grad is not None:
                a.grad[self.active[name]:, :] = 0  # rows of A that feed masked columns stay as parked
        self.before_step = {name: (a.detach().clone(), b.detach().clone()) for name, (a, b) in self.factors.items()
                            if any(self.live_since[name][:self.active[name]])}

    def after_step(self, step: int, optimizer: torch.optim.Optimizer) -> None:
        """After optimizer.step() and before the learning-rate schedule steps."""
        self._correct_late_columns(optimizer)
        self._zero_masked_weights()  # weight decay or stale moments must not revive a masked column
        # not at an epoch's end nor after the last step: the epoch's eval (early stopping's signal) and checkpoint
        # would see trained columns zeroed and new ones untrained
        done = step + 1
        if done % self.interval == 0 and done % self.epoch_steps != 0 and done < self.total_steps:
            self.reallocate(optimizer)

    def reallocate(self, optimizer: torch.optim.Optimizer) -> None:
        new = self._damped_proposal()
        self.scores = {name: 0.0 for name in self.scores}
        if new is None:
            self.held += 1
            return
        self.move_to(new, optimizer)

    def move_to(self, new: dict[str, int], optimizer: torch.optim.Optimizer) -> None:
        for name, rank in new.items():
            if rank < self.active[name]:
                self._clear_columns(name, rank, optimizer)
            for column in range(self.active[name], rank):
                self.live_since[name][column] = int(optimizer.state[self.factors[name][1]].get("step", 0))
        self.moved_rank += moved_rank(self.active, new)
        self.active = new
        self.reallocations += 1
        self._zero_masked_weights()

    def _damped_proposal(self) -> dict[str, int] | None:
        """The best proposal inside the trust region (module docstring), or None to stay put."""
        proposals = self.allocator.propose(self.scores, self.modules, self.ranks, self.budget, PROPOSALS, self.rng,
                                           self.sign)
        value = lambda ranks: self.sign * summed_score(self.scores, Allocation.from_ranks(ranks))  # noqa: E731
        current = value(self.active)
        fits = [{m.name: p.as_dict().get(m.name, 0) for m in self.modules} for p in proposals]
        fits = [ranks for ranks in fits if moved_fraction(self.active, ranks) <= self.max_move
                and value(ranks) > current + self.min_gain * abs(current)]  # strictly better: ties stay put
        return max(fits, key=value, default=None)

    def _park_a(self) -> None:
        """A copy of every A, whose masked rows _zero_masked_weights puts back: weight decay shrinks them even with
        a zero gradient, and a column switched on later must start from its A as it was when it went off."""
        self.parked_a = {name: a.detach().clone() for name, (a, _) in self.factors.items()}

    @torch.no_grad()
    def _zero_masked_weights(self) -> None:
        for name, (a, b) in self.factors.items():
            b[:, self.active[name]:] = 0
            a[self.active[name]:, :] = self.parked_a[name][self.active[name]:, :]

    @torch.no_grad()
    def _correct_late_columns(self, optimizer: torch.optim.Optimizer) -> None:
        """AdamW divides every element's moments by 1 − β^t, t the tensor's step count; a column that went live at
        step t0 has moments only k = t − t0 steps old, so its update was 1/f of a fresh AdamW's (f below: 1.9 at t = 6,
        k = 1, a step too small; 0.16 at t = 2,000, k = 10, six times too large). Rescale this step's update of
        those columns by f: exact up to eps, whatever the step count."""
        group = optimizer.param_groups[0]  # train.py's AdamW has one group
        (beta1, beta2), decay = group["betas"], 1 - group["lr"] * group["weight_decay"]
        for name, (a_before, b_before) in self.before_step.items():
            a, b = self.factors[name]
            t = int(optimizer.state[b]["step"])
            late = [c for c in range(self.active[name]) if self.live_since[name][c] > 0]
            ages = [t - self.live_since[name][c] for c in late]
            f = torch.tensor([(1 - beta1 ** t) / (1 - beta1 ** k) * math.sqrt((1 - beta2 ** k) / (1 - beta2 ** t))
                              for k in ages], device=b.device, dtype=b.dtype)
            late = torch.tensor(late, device=b.device)  # on the factors' device: CUDA in a GPU run
            decayed_a, decayed_b = a_before[late] * decay, b_before[:, late] * decay
            a[late] = decayed_a + f[:, None] * (a[late] - decayed_a)
            b[:, late] = decayed_b + f[None, :] * (b[:, late] - decayed_b)
        self.before_step = {}

    @torch.no_grad()
    def _clear_columns(self, name: str, keep: int, optimizer: torch.optim.Optimizer) -> None:
        """Dropped rank: B's columns ≥ keep go to zero and forget their AdamW moments."""
        a, b = self.factors[name]
        for tensor, index in ((b, (slice(None), slice(keep, None))), (a, (slice(keep, None), slice(None)))):
            for moment in optimizer.state.get(tensor, {}).values():
                if torch.is_tensor(moment) and moment.shape == tensor.shape:
                    moment[index] = 0
        b[:, keep:] = 0
        self.parked_a[name][keep:, :] = a[keep:, :]  # parked as trained: they stay so while masked
