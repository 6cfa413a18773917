"""`fisher`: empirical Fisher information of each adapter's B factor (activation × gradient).

What it measures: the trace of the empirical Fisher of B, mean over examples n of ‖∂ℓₙ/∂B‖², where
∂ℓₙ/∂B = Σₜ gₙₜ hₙₜᵀ pairs the adapter's bottleneck activation h = A x (input of lora_B) with the
gradient g of the loss at lora_B's output, over the tokens t of example n. Unlike `grad_norm`
(the squared norm of the *batch-mean* gradient) it adds up per-example gradients, so it also counts
directions on which examples disagree. Per unit of rank: B's r columns are i.i.d. given A's rows.

B = 0: no perturbation needed. ∂L/∂B = (∂L/∂z)·hᵀ does not involve B, and h = A x is non-zero
because A is random, so the score is exact at PEFT's init. (A's Fisher is zero at B = 0 and is
left out.) Dropout is off and nothing is random: deterministic. Cost: one forward and one backward
per batch; per-example gradients come from forward hooks, not extra passes.
"""

import torch

from orchestrator.proxies.base import Proxy, register
from orchestrator.proxies.grad_norm import adapter_parts
from orchestrator.proxies.scoring import batch_loss, on_tokens, per_unit, scoring_mode


@register
class FisherProxy(Proxy):
    name = "fisher"

    def module_scores(self, model, batches, modules, probe_rank):
        captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        tokens = [torch.Size()]  # this batch's [N, T]

        def hook_for(name):
            def hook(_module, inputs, output):
                if on_tokens(inputs[0], tokens[0]):  # not DeBERTa-v3's call on its relative positions
                    captured[name] = (inputs[0].detach(), output)
            return hook

        handles = [adapter_parts(model, m.name)[2].register_forward_hook(hook_for(m.name))
                   for m in modules]
        totals = {m.name: 0.0 for m in modules}
        try:
            with scoring_mode(model):
                for batch in batches:
                    captured.clear()
                    tokens[0] = batch["input_ids"].shape[:2]
                    loss = batch_loss(model, batch)
                    names = [m.name for m in modules]
                    grads = torch.autograd.grad(loss, [captured[name][1] for name in names])
                    with torch.no_grad():
                        for name, g in zip(names, grads):
                            h = captured[name][0]
                            n = g.shape[0]  # L is the batch mean, so ∂ℓₙ/∂B = n · (∂L/∂B)ₙ
                            g, h = g.reshape(n, -1, g.shape[-1]).float(), h.reshape(n, -1, h.shape[-1]).float()
                            per_example = torch.einsum("nto,ntr->nor", g, h) * n
                            totals[name] += float(per_example.pow(2).sum() / n)
                    captured.clear()
        finally:
            for handle in handles:
                handle.remove()
        return per_unit(totals, len(batches), probe_rank)
