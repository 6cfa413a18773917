"""`grad_norm`: how strongly the task loss pulls on each adapter at initialisation."""

from orchestrator.shortcuts import SUBMODULE, is_shortcut_item

from orchestrator.proxies.base import Proxy, register


def adapter_parts(model, name: str):
    """(module whose output carries the adapter, A, B) for a LoRA module or a shortcut site of a PeftModel."""
    root = model.base_model.model
    if is_shortcut_item(name):  # L3.shortcut.residual → the LowRankShortcut registered under root.shortcuts
        shortcut = root.get_submodule(SUBMODULE)[name.replace(".", "_")]
        return shortcut, shortcut.A, shortcut.B
    layer = root.get_submodule(name)
    return layer, layer.lora_A["default"], layer.lora_B["default"]


def lora_factors(model, name: str):
    """The (A, B) weights of the adapter on module `name` (or of the shortcut `name`) inside a PeftModel."""
    _, a, b = adapter_parts(model, name)
    return a.weight, b.weight


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
        from orchestrator.proxies.scoring import per_unit, scoring_mode  # scoring imports lora_factors from here

        totals = {m.name: 0.0 for m in modules}
        with scoring_mode(model, training=True):  # train mode (dropout on), as in training; flags restored after
            for batch in batches:
                model.zero_grad(set_to_none=True)
                model(**batch).loss.backward()
                for m in modules:
                    a, b = lora_factors(model, m.name)
                    totals[m.name] += float(a.grad.pow(2).sum() + b.grad.pow(2).sum())
        model.zero_grad(set_to_none=True)
        return per_unit(totals, len(batches), probe_rank)
