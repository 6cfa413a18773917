"""`synflow`: data-free synaptic flow through the LoRA factors (Tanaka et al., NeurIPS'20).

What it measures: with every parameter of the model replaced by its absolute value (the paper's
sign "linearisation"), R = Σ of the logits for a constant input; the score of a weight is
|θ ⊙ ∂R/∂θ|, summed over A and B of a module, per unit of rank. It is how much positive "flow" the
adapter carries from input to output, independent of the data and the labels.

Input: the paper feeds an all-ones image. A transformer's input is token ids, and any fixed id
would depend on the vocabulary; instead the model gets `inputs_embeds` of all ones, one sequence
of `seq_len` (32) positions with a full attention mask. Position and token-type embeddings (in
absolute value) are added as usual, so positions still differ. The data batches are not used.
LayerNorm, softmax and GELU stay non-linear, so on a transformer the linearisation is partial.

B = 0: at PEFT's init |B| = 0 kills all flow through every adapter (the score is 0 everywhere).
B is set to a scoring-only perturbation N(0, σ²), σ = 1e-3, from a seeded Generator, before the
absolute value is taken (`scoring.perturbed_b`). Restoring: signs are kept as a sign-bit mask and
put back after scoring (abs only clears the sign bit, so this is bit-exact, -0.0 included), then
the original B is copied back. Dropout is off. Cost: one forward and one backward in total.
"""

from contextlib import contextmanager

import torch

from orchestrator.proxies.base import Proxy, register
from orchestrator.proxies.scoring import PERTURB_STD, factor_pairs, flat_factors, perturbed_b, scoring_mode


@contextmanager
def absolute_weights(model):
    """Every floating-point parameter → |θ|; the signs come back bit-exactly on exit."""
    signs = []
    with torch.no_grad():
        for p in model.parameters():  # shared (tied) parameters appear once
            if p.is_floating_point():
                negative = torch.signbit(p)
                signs.append((p, negative))
                p.abs_()
    try:
        yield
    finally:
        with torch.no_grad():
            for p, negative in signs:
                p.copy_(torch.where(negative, -p, p))


@register
class SynflowProxy(Proxy):
    name = "synflow"
    std: float = PERTURB_STD
    seed: int | None = None
    seq_len: int = 32

    def module_scores(self, model, batches, modules, probe_rank):
        pairs = factor_pairs(model, modules)
        embeddings = model.get_input_embeddings().weight
        seq_len = min(self.seq_len, getattr(model.config, "max_position_embeddings", self.seq_len))
        ones = torch.ones(1, seq_len, embeddings.shape[1], dtype=embeddings.dtype, device=embeddings.device)
        mask = torch.ones(1, seq_len, dtype=torch.long, device=embeddings.device)
        with scoring_mode(model), perturbed_b(model, modules, self.std, self.seed), absolute_weights(model):
            logits = model(inputs_embeds=ones, attention_mask=mask).logits
            grads = torch.autograd.grad(logits.sum(), flat_factors(pairs))
            with torch.no_grad():
                scores = {name: float((a * grads[2 * i]).abs().sum() + (b * grads[2 * i + 1]).abs().sum())
                          for i, (name, a, b) in enumerate(pairs)}
        return {name: score / probe_rank for name, score in scores.items()}
