"""`grasp`: gradient signal preservation, −θ ⊙ (H g) on the LoRA factors (Wang et al., ICLR'20).

What it measures: how removing each adapter weight would change the gradient norm (second order):
g is the loss gradient w.r.t. all A and B factors averaged over the batches, H the Hessian of the
loss w.r.t. those factors, and the score of a module is Σ −θ ⊙ (H g) over its A and B (signed, as in
the paper), averaged over batches, per unit of rank. H is restricted to the LoRA factors; the base
model and the classifier head are held fixed.

B = 0: the B term θ_B ⊙ (Hg)_B is zero at B = 0 (the A term survives through the A–B cross
curvature). For consistency with `snip` and `synflow` it is scored on the same scoring-only
perturbation B ~ N(0, σ²), σ = 1e-3, from a seeded Generator, restored bit-exactly afterwards.

Double backward: PyTorch's fused CPU scaled-dot-product attention has no second derivative, so
scoring runs inside `sdpa_kernel(SDPBackend.MATH)` (the model itself is untouched). Dropout is off.
Cost per batch: one forward + backward for g, one forward + backward + double backward for H g.
"""

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from orchestrator.proxies.base import Proxy, register
from orchestrator.proxies.scoring import (PERTURB_STD, batch_loss, factor_pairs, flat_factors, per_unit,
                                          perturbed_b, scoring_mode)


@register
class GraspProxy(Proxy):
    name = "grasp"
    std: float = PERTURB_STD
    seed: int | None = None

    def module_scores(self, model, batches, modules, probe_rank):
        pairs = factor_pairs(model, modules)
        params = flat_factors(pairs)
        totals = {name: 0.0 for name, _, _ in pairs}
        if not batches:
            return per_unit(totals, 0, probe_rank)
        with scoring_mode(model), perturbed_b(model, modules, self.std, self.seed), sdpa_kernel(SDPBackend.MATH):
            mean_grad = [torch.zeros_like(p) for p in params]
            for batch in batches:
                for acc, g in zip(mean_grad, torch.autograd.grad(batch_loss(model, batch), params)):
                    acc.add_(g, alpha=1.0 / len(batches))
            for batch in batches:
                grads = torch.autograd.grad(batch_loss(model, batch), params, create_graph=True)
                z = sum((g * stop).sum() for g, stop in zip(grads, mean_grad))
                hessian_grad = torch.autograd.grad(z, params)
                del grads, z
                with torch.no_grad():
                    for i, (name, a, b) in enumerate(pairs):
                        totals[name] += float(-(a * hessian_grad[2 * i]).sum() - (b * hessian_grad[2 * i + 1]).sum())
        return per_unit(totals, len(batches), probe_rank)
