"""Run the proxies once on a probe model and turn per-module scores into per-candidate scores."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from itertools import chain, islice, repeat

import torch

from orchestrator.allocation import Allocation, apply_lora, attach_allocation_shortcuts
from orchestrator.allocators import summed_score
from orchestrator.data import Split, make_loader
from orchestrator.models import AdaptableModule, load_model, load_tokenizer
from orchestrator.proxies.base import PROXIES, get_proxy
from orchestrator.proxies.normalise import normalise
from orchestrator.proxies.scoring import scoring_mode


@dataclass
class ModuleScores:
    """Per-unit-rank scores: {proxy: {module name: score}}, what each proxy cost, and the shared warm-up's cost.

    `rank_caps` holds, for a measured score without a Proxy class (screen.rank_by: calibrated), the rank per
    module at which it was measured: rank above that earns nothing, since nothing measured what it buys."""

    unit: dict[str, dict[str, float]]
    seconds: dict[str, float] = field(default_factory=dict)
    warmup_seconds: float = 0.0
    rank_caps: dict[str, dict[str, int]] = field(default_factory=dict)

    def score(self, proxy: str, allocation: Allocation) -> float:
        if proxy not in PROXIES:
            return summed_score(self.unit[proxy], allocation, self.rank_caps.get(proxy))
        return get_proxy(proxy).candidate_score(self.unit[proxy], allocation)

    def scores(self, allocation: Allocation) -> dict[str, float]:
        return {proxy: self.score(proxy, allocation) for proxy in self.unit}


def warm_up(model: torch.nn.Module, batches, lr: float) -> None:
    """AdamW steps on the probe's trainable weights (adapters + head), dropout on, as training does.

    At PEFT's init B = 0, so every saliency is taken at a point training leaves after its first step;
    a few shared steps move the probe to where the gradients say something about the task (the
    classifier head is no longer random). Train/eval flags are restored afterwards."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    with scoring_mode(model, training=True):
        for batch in batches:
            model(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)


def score_modules(model_name: str, num_labels: int, split: Split, modules: list[AdaptableModule],
                  proxies: list[str], *, probe_rank: int, num_batches: int, batch_size: int,
                  max_length: int, seed: int, warmup_steps: int = 0, warmup_lr: float = 2e-3,
                  normalisation: str = "none", dropout: float | None = None) -> ModuleScores:
    """One probe adapter of rank `probe_rank` on every searchable module and shortcut site; each proxy scores it once.

    With `warmup_steps` > 0 the probe first trains that many steps (`warm_up`) on the batches that
    follow the scored ones in the shuffled stream, so the proxies never score a batch it trained on
    (unless warm-up and scoring together exceed an epoch: the stream then reshuffles and goes on).
    `normalisation` (proxies.normalise) rescales every model-based proxy's module scores; `params` stays a count.
    `dropout` is the base model's (model.dropout), so the probe sees the network the trainings will."""
    torch.manual_seed(seed)
    probe = Allocation.from_ranks({m.name: probe_rank for m in modules})
    model = apply_lora(load_model(model_name, num_labels, seed, dropout), probe)
    attach_allocation_shortcuts(model, probe, seed)
    loader = make_loader(split, load_tokenizer(model_name), max_length, batch_size, shuffle=True, seed=seed)
    stream = chain.from_iterable(repeat(loader))  # each pass over the loader reshuffles
    batches = list(islice(stream, num_batches))
    start = time.perf_counter()
    warm_up(model, islice(stream, warmup_steps), warmup_lr)
    result = ModuleScores({}, warmup_seconds=time.perf_counter() - start if warmup_steps else 0.0)
    for name in proxies:
        proxy = get_proxy(name)
        torch.manual_seed(seed)  # proxies that draw random numbers stay deterministic
        start = time.perf_counter()
        scores = proxy.module_scores(model, batches, modules, probe_rank)
        result.seconds[name] = time.perf_counter() - start
        result.unit[name] = normalise(scores, modules, normalisation) if proxy.needs_model else scores
    return result
