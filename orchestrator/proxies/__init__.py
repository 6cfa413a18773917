"""Zero-cost proxies for LoRA allocations: a registry of `Proxy` classes and the probe that runs them."""

from orchestrator.proxies import grad_norm, params  # noqa: F401  (registers the proxies)
from orchestrator.proxies.base import PROXIES, Proxy, get_proxy, register
from orchestrator.proxies.probe import ModuleScores, score_modules

__all__ = ["PROXIES", "Proxy", "get_proxy", "register", "ModuleScores", "score_modules"]
