"""The narrow interface every zero-cost proxy implements, and the registry that names them.

A proxy scores *modules*, not candidates: it runs a few forward/backward passes on a probe model
that carries an adapter of rank `probe_rank` on every module of the search space, and returns one
number per module and per unit of rank. A candidate's score is then the rank-weighted sum over its
active modules, so screening thousands of candidates costs one probe plus arithmetic (DESIGN §9).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

from torch import nn

from orchestrator.allocation import Allocation
from orchestrator.allocators import summed_score
from orchestrator.models import AdaptableModule

__all__ = ["Proxy", "PROXIES", "register", "get_proxy"]


class Proxy(ABC):
    """Zero-cost proxy. Higher is not assumed better: the screen's `direction` decides (DESIGN §9.1)."""

    name: str = ""
    needs_model: bool = True  # False: the score follows from module shapes alone

    @abstractmethod
    def module_scores(self, model: nn.Module, batches: list[dict], modules: list[AdaptableModule],
                      probe_rank: int) -> dict[str, float]:
        """Score per module name, normalised to one unit of rank."""

    def candidate_score(self, unit_scores: dict[str, float], allocation: Allocation) -> float:
        """Rank-weighted sum of the per-unit module scores (linear in rank by construction)."""
        return summed_score(unit_scores, allocation)


PROXIES: dict[str, type[Proxy]] = {}


def register(cls: type[Proxy]) -> type[Proxy]:
    PROXIES[cls.name] = cls
    return cls


def get_proxy(name: str) -> Proxy:
    from orchestrator.errors import UserError

    if name not in PROXIES:
        raise UserError(f"screen.proxies: unknown proxy '{name}'; choose from {sorted(PROXIES)}")
    return PROXIES[name]()
