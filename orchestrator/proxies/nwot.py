"""`nwot`: neural architecture search without training (Mellor et al., ICML'21), per module.

What it measures: how well a module's output already tells the examples of a batch apart. Each
example's binary code is the sign pattern (> 0) of the module's output over its tokens and output
features; K[i, j] counts the units on which examples i and j agree (N_A − Hamming distance), over
the token positions real in both (padding is masked out), divided by the module's output width so
wide and narrow modules are comparable. The score is log|K| (slogdet, float64, + 1e-3·I against
duplicate sentences), averaged over batches. For `intermediate.dense` the code is exactly the GELU
on/off pattern, the analogue of the paper's ReLU codes.

B = 0: not a problem by construction. The codes are of the adapted module's full output
(base + adapter), which at B = 0 is the base module's output, so the score is about the *place*
and does not need a perturbation. It does not depend on the probe rank, so it is used as is as the
value of each unit of rank (a candidate scores Σ r · log|K|). Runs under `torch.no_grad()` with
forward hooks and dropout off: one forward per batch, deterministic.
"""

import torch

from orchestrator.proxies.base import Proxy, register
from orchestrator.proxies.grad_norm import adapter_parts
from orchestrator.proxies.scoring import on_tokens, scoring_mode


def hamming_kernel(codes: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """codes: [N, T, F] bool; mask: [N, T] bool → K [N, N] float64 of agreeing units (both real)."""
    valid = mask[:, :, None].expand_as(codes)
    on = (codes & valid).reshape(codes.shape[0], -1).double()
    off = (~codes & valid).reshape(codes.shape[0], -1).double()
    return on @ on.T + off @ off.T


def log_det_score(kernel: torch.Tensor, ridge: float = 1e-3) -> float:
    eye = torch.eye(kernel.shape[0], dtype=kernel.dtype, device=kernel.device)
    return float(torch.linalg.slogdet(kernel + ridge * eye).logabsdet)


@register
class NwotProxy(Proxy):
    name = "nwot"
    ridge: float = 1e-3

    def module_scores(self, model, batches, modules, probe_rank):
        state: dict = {}
        totals = {m.name: 0.0 for m in modules}

        def hook_for(module):
            def hook(_layer, _inputs, output):
                if not on_tokens(output, state["mask"].shape):
                    return
                codes = output > 0
                n = codes.shape[0]
                codes = codes.reshape(n, -1, codes.shape[-1])
                kernel = hamming_kernel(codes, state["mask"].to(codes.device)) / module.out_features
                totals[module.name] += log_det_score(kernel, self.ridge)
            return hook

        handles = [adapter_parts(model, m.name)[0].register_forward_hook(hook_for(m)) for m in modules]
        try:
            with torch.no_grad(), scoring_mode(model):
                for batch in batches:
                    mask = batch.get("attention_mask")
                    if mask is None:
                        mask = torch.ones(batch["input_ids"].shape[:2], dtype=torch.long)
                    state["mask"] = mask.bool()
                    model(**{k: v for k, v in batch.items() if k != "labels"})
        finally:
            for handle in handles:
                handle.remove()
        return {name: total / max(len(batches), 1) for name, total in totals.items()}
