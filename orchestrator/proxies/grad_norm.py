"""`grad_norm`: how strongly the task loss pulls on each adapter at initialisation."""

import torch

from orchestrator.proxies.base import Proxy, register


def lora_factors(model, module_name: str):
    """The (A, B) weights of the default adapter on `module_name` inside a PeftModel."""
    layer = model.base_model.model.get_submodule(module_name)
    return layer.lora_A["default"].weight, layer.lora_B["default"].weight


@register
class GradNormProxy(Proxy):
    """Mean squared gradient norm of the LoRA factors per unit of rank.

    PEFT starts B at zero, so ∂L/∂A = Bᵀ·(…) is zero too; but ∂L/∂B = (∂L/∂y)·(A x)ᵀ is not,
    because A is random (Kaiming). That gradient is the signal. Its r columns are i.i.d. over A's
    rows, so the expected squared norm grows linearly in rank: dividing by the probe's rank gives a
    per-unit score and a candidate's score is Σ r · unit (the expected ‖∇‖² of its own adapters).
    """

    name = "grad_norm"

    def module_scores(self, model, batches, modules, probe_rank):
        totals = {m.name: 0.0 for m in modules}
        model.train()
        for batch in batches:
            model.zero_grad(set_to_none=True)
            model(**batch).loss.backward()
            for m in modules:
                a, b = lora_factors(model, m.name)
                totals[m.name] += float(a.grad.pow(2).sum() + b.grad.pow(2).sum())
        model.zero_grad(set_to_none=True)
        return {name: total / (len(batches) * probe_rank) for name, total in totals.items()}
