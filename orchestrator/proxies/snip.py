"""`snip`: connection sensitivity |θ ⊙ ∂L/∂θ| of the LoRA factors (Lee et al., ICLR'19).

What it measures: how much the loss would change to first order if each adapter weight were
removed, summed over A and B of a module, averaged over the batches, per unit of rank.

B = 0: at PEFT's init B = 0 and therefore ∂L/∂A = 0, so both |B ⊙ ∂L/∂B| and |A ⊙ ∂L/∂A| are
exactly zero on every module. The score is taken on a scoring-only perturbation instead:
B ~ N(0, σ²), σ = 1e-3, from a Generator seeded with `seed` (default: the seed the probe just gave
`torch.manual_seed`), restored bit-exactly afterwards (`scoring.perturbed_b`). Both terms are then
linear in σ, so σ only scales all modules alike. Dropout is off while scoring (deterministic).
Cost: one forward and one backward per batch.
"""

import torch

from orchestrator.proxies.base import Proxy, register
from orchestrator.proxies.scoring import (PERTURB_STD, batch_loss, factor_pairs, flat_factors, per_unit,
                                          perturbed_b, scoring_mode)


@register
class SnipProxy(Proxy):
    name = "snip"
    std: float = PERTURB_STD
    seed: int | None = None

    def module_scores(self, model, batches, modules, probe_rank):
        pairs = factor_pairs(model, modules)
        totals = {name: 0.0 for name, _, _ in pairs}
        with scoring_mode(model), perturbed_b(model, modules, self.std, self.seed):
            for batch in batches:
                grads = torch.autograd.grad(batch_loss(model, batch), flat_factors(pairs))
                with torch.no_grad():
                    for i, (name, a, b) in enumerate(pairs):
                        ga, gb = grads[2 * i], grads[2 * i + 1]
                        totals[name] += float((a * ga).abs().sum() + (b * gb).abs().sum())
        return per_unit(totals, len(batches), probe_rank)
