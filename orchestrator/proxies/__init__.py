"""Zero-cost proxies for LoRA allocations: a registry of `Proxy` classes and the probe that runs them."""

# importing a proxy module registers its proxy
from orchestrator.proxies import fisher, grad_norm, grasp, nwot, params, snip, synflow, vote  # noqa: F401
from orchestrator.proxies.base import PROXIES, Proxy, get_proxy, register
from orchestrator.proxies.normalise import NORMALISATIONS, normalise
from orchestrator.proxies.probe import ModuleScores, score_modules

__all__ = ["PROXIES", "Proxy", "get_proxy", "register", "ModuleScores", "score_modules", "NORMALISATIONS", "normalise"]
