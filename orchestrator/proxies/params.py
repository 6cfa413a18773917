"""`params`: the trainable-parameter count. Every other proxy must beat this floor."""

from orchestrator.proxies.base import Proxy, register


@register
class ParamsProxy(Proxy):
    name = "params"
    needs_model = False

    def module_scores(self, model, batches, modules, probe_rank):
        return {m.name: float(m.params_per_rank) for m in modules}
