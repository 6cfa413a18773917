"""Shared machinery for the proxies that need more than one backward pass or touch the weights.

Every helper here leaves the probe model exactly as it found it: weights bit-identical, train/eval
flag of every submodule as before, no `.grad` left behind (gradients are taken with
`torch.autograd.grad`, which never writes `.grad`).

The B = 0 problem. PEFT starts every adapter at B = 0 (A Kaiming-random), so the adapter's output
is zero, ∂L/∂A = s·Bᵀ(∂L/∂y)xᵀ is zero and any saliency of the form θ ⊙ ∂L/∂θ is zero on both
factors. Proxies that need a non-zero B score a *perturbed* copy: `perturbed_b` draws
B ~ N(0, σ²) from a `torch.Generator` seeded explicitly, and restores the original B (bit-exact) on
exit. σ is small (1e-3) so the network's function and ∂L/∂B are unchanged to first order; the
saliencies are then linear in σ, so σ scales every module's score alike and does not change their
ranking. The same σ is used for every module: B's fan-in is the probe rank, equal everywhere, so a
width-dependent init would not make modules fairer. Only a B that is exactly zero is perturbed: after
the probe's warm-up (`score_modules(warmup_steps=…)`) B is trained and is scored as it is.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from orchestrator.proxies.grad_norm import lora_factors

__all__ = ["PERTURB_STD", "factor_pairs", "flat_factors", "perturbation_seed", "perturbed_b",
           "scoring_mode", "batch_loss", "per_unit"]

PERTURB_STD = 1e-3


def factor_pairs(model: nn.Module, modules) -> list[tuple[str, torch.Tensor, torch.Tensor]]:
    """(module name, A, B) for every module, in the given order."""
    return [(m.name, *lora_factors(model, m.name)) for m in modules]


def flat_factors(pairs) -> list[torch.Tensor]:
    return [t for _, a, b in pairs for t in (a, b)]


def perturbation_seed(seed: int | None) -> int:
    """An explicit seed, or the one the caller last gave `torch.manual_seed` (the probe does, per proxy)."""
    return int(torch.initial_seed() if seed is None else seed)


@contextmanager
def perturbed_b(model: nn.Module, modules, std: float = PERTURB_STD, seed: int | None = None):
    """Temporarily set every all-zero B to N(0, std²), drawn in module order from a seeded CPU Generator
    (noise is drawn for every module, so which B are zero does not shift the others' draws). A module's draw is its
    position's: the probe always lists every adaptable module in model order (shortcut sites after them), so a
    module's snip/synflow/grasp score is the same in every run of a model, but not under another listing."""
    generator = torch.Generator().manual_seed(perturbation_seed(seed))
    saved = []
    with torch.no_grad():
        for m in modules:
            _, b = lora_factors(model, m.name)
            noise = torch.randn(b.shape, generator=generator, dtype=torch.float32) * std
            if not b.any():
                saved.append((b, b.detach().clone()))
                b.copy_(noise.to(device=b.device, dtype=b.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            for b, original in saved:
                b.copy_(original)


@contextmanager
def scoring_mode(model: nn.Module, training: bool = False):
    """eval() by default (no dropout: scores do not depend on the global RNG); restores every flag."""
    flags = [(module, module.training) for module in model.modules()]
    model.train(training)
    try:
        yield
    finally:
        for module, flag in flags:
            module.training = flag


def batch_loss(model: nn.Module, batch: dict) -> torch.Tensor:
    return model(**batch).loss


def per_unit(totals: dict[str, float], num_batches: int, probe_rank: int) -> dict[str, float]:
    """Mean over batches, divided by the probe rank (the sums run over r i.i.d. rank-one components)."""
    return {name: total / (max(num_batches, 1) * probe_rank) for name, total in totals.items()}


def on_tokens(tensor: torch.Tensor, tokens: torch.Size) -> bool:
    """Whether a module's input or output is per token of the batch ([N, T, …], `tokens` = [N, T]): DeBERTa-v3 also
    runs query_proj and key_proj on its relative positions, a call that per-example proxies must leave out."""
    return tensor.shape[:2] == tokens
