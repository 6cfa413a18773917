"""`vote`: module-level rank average of several proxies (Abdelfattah et al.'s "vote", per module).

What it measures: the consensus of its member proxies. Each member scores the modules; its scores
are turned into ranks normalised to [0, 1] (lowest 0, highest 1, ties share their average rank) and
the vote of a module is the mean of its normalised ranks. Ranks make members with very different
scales comparable, and a rank is a per-module value, so a candidate scores Σ r · vote.

Members: the class attribute `members` (default grad_norm, snip, fisher) or the constructor's
`members` argument; a leading '-' flips a member's sign (DESIGN §9.1: signs must be measured, and
a member known to rank backwards can be voted in reversed). Non-finite scores rank lowest.

B = 0: handled by each member as documented there. Each member runs as the probe would run it
alone: the global RNG is re-seeded with `torch.initial_seed()` before each one, so the vote equals
the rank average of the scores the members report themselves. The model's train/eval flags are
restored after the members (some set train()).
"""

from __future__ import annotations

import math

import torch

from orchestrator.proxies.base import PROXIES, Proxy, get_proxy, register
from orchestrator.proxies.scoring import scoring_mode


def normalised_ranks(scores: dict[str, float]) -> dict[str, float]:
    """Ranks in [0, 1], higher score → higher rank; ties get the average; a non-finite score (NaN, or ±inf from an
    overflow, which a '-member' may flip to +inf) counts as −∞."""
    names = list(scores)
    if not names:
        return {}
    if len(names) == 1:
        return {names[0]: 0.5}
    key = {name: (float(v) if math.isfinite(v) else -math.inf) for name, v in scores.items()}
    order = sorted(names, key=lambda name: key[name])
    ranks: dict[str, float] = {}
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and key[order[end + 1]] == key[order[start]]:
            end += 1
        for name in order[start:end + 1]:
            ranks[name] = (start + end) / 2 / (len(order) - 1)
        start = end + 1
    return ranks


def parse_member(member: str) -> tuple[str, float]:
    """'fisher' → ('fisher', +1); '-fisher' → ('fisher', −1)."""
    return (member[1:], -1.0) if member.startswith("-") else (member, 1.0)


def rank_average(member_scores: dict[str, dict[str, float]]) -> dict[str, float]:
    """Mean normalised rank per module. Keys are member specs ('-name' votes reversed)."""
    if not member_scores:
        raise ValueError("vote: no member scores to combine")
    module_sets = {frozenset(scores) for scores in member_scores.values()}
    if len(module_sets) != 1:
        raise ValueError("vote: members scored different module sets")
    totals: dict[str, float] = {}
    for member, scores in member_scores.items():
        _, sign = parse_member(member)
        for name, rank in normalised_ranks({k: sign * v for k, v in scores.items()}).items():
            totals[name] = totals.get(name, 0.0) + rank
    return {name: total / len(member_scores) for name, total in totals.items()}


@register
class VoteProxy(Proxy):
    name = "vote"
    members: tuple[str, ...] = ("grad_norm", "snip", "fisher")

    def __init__(self, members: tuple[str, ...] | list[str] | None = None):
        from orchestrator.errors import UserError

        if members is not None:
            self.members = tuple(members)
        if not self.members:
            raise UserError("vote: give at least one member proxy")
        for member in self.members:
            name, _ = parse_member(member)
            if name == self.name or (name in PROXIES and issubclass(PROXIES[name], VoteProxy)):
                raise UserError("vote: a vote cannot be a member of a vote")
            get_proxy(name)  # unknown names fail here, with the list of choices
        self.needs_model = any(PROXIES[parse_member(m)[0]].needs_model for m in self.members)

    def module_scores(self, model, batches, modules, probe_rank):
        seed = torch.initial_seed()
        member_scores = {}
        with scoring_mode(model, model.training):  # restores every submodule's flag afterwards
            for member in self.members:
                torch.manual_seed(seed)
                member_scores[member] = get_proxy(parse_member(member)[0]).module_scores(
                    model, batches, modules, probe_rank)
        return rank_average(member_scores)
