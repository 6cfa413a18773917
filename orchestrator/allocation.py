"""The central value type: which modules get a LoRA adapter and at what rank.

An `Allocation` maps full module names to ranks (0 = off). It counts its trainable parameters
exactly (r · (in + out) per module) and converts to a PEFT `LoraConfig` whose `target_modules` is
the exact list of names and whose `rank_pattern`/`alpha_pattern` keys are regex-escaped full names.
PEFT silently ignores keys that match nothing and over-matches unescaped ones, so `check_against`
verifies that every key matches exactly one module of the model.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from torch import nn

from orchestrator.errors import UserError
from orchestrator.models import AdaptableModule, head_modules
from orchestrator.shortcuts import (ShortcutSpec, attach_shortcuts, check_specs, format_compact, is_shortcut_item,
                                    shortcut_sites)


@dataclass(frozen=True)
class Allocation:
    ranks: tuple[tuple[str, int], ...]  # (full module name, rank > 0), sorted by name
    alpha_ratio: float = 2.0  # lora_alpha = alpha_ratio · r per module, so scaling is equal at every rank

    @classmethod
    def from_ranks(cls, ranks: dict[str, int], alpha_ratio: float = 2.0) -> Allocation:
        bad = {name: r for name, r in ranks.items() if not isinstance(r, int) or r < 0}
        if bad:
            raise UserError(f"allocation: ranks must be integers ≥ 0, got {bad}; use 0 to switch a module off")
        return cls(tuple(sorted((name, r) for name, r in ranks.items() if r > 0)), alpha_ratio)

    @classmethod
    def from_compact(cls, text: str, modules: list[AdaptableModule]) -> Allocation:
        """Parse `L0.query:8,L3.output.dense:4,L3.shortcut.residual:2` (the report's `allocation` column)."""
        by_short = {m.short: m.name for m in modules}
        ranks = {}
        for item in filter(None, (part.strip() for part in text.split(","))):
            if is_shortcut_item(item):
                spec = ShortcutSpec.parse(item)
                name, rank = spec.name, spec.rank
            else:
                short, _, rank = item.rpartition(":")
                if short not in by_short or not (rank.isascii() and rank.isdigit()):
                    example = f"{modules[0].short}:8" if modules else "L0.query:8"
                    raise UserError(f"allocation: '{item}' is not `L<layer>.<module type>:<rank>` for this model; "
                                    f"e.g. {example} (see `lora-search modules`)")
                name, rank = by_short[short], int(rank)
            if name in ranks:  # the later one silently won
                raise UserError(f"allocation: '{item}' gives a module a second rank in '{text}'; give each module once")
            ranks[name] = rank
        return cls.from_ranks(ranks)

    def as_dict(self) -> dict[str, int]:
        return dict(self.ranks)

    @property
    def lora_ranks(self) -> tuple[tuple[str, int], ...]:
        """The PEFT LoRA part: every entry that is not a shortcut."""
        return tuple(item for item in self.ranks if not is_shortcut_item(item[0]))

    @property
    def shortcuts(self) -> tuple[ShortcutSpec, ...]:
        """HeteroLoRA shortcut connections, stored as `L<layer>.shortcut.<kind>` entries of `ranks`."""
        return tuple(ShortcutSpec.parse(f"{name}:{r}") for name, r in self.ranks if is_shortcut_item(name))

    def trainable_params(self, modules: list[AdaptableModule]) -> int:
        """Exact LoRA (+ shortcut) parameter count: A is r×in, B is out×r.

        `modules` must hold every entry's module or shortcut site (see `searchable_units`)."""
        by_name = {m.name: m for m in modules}
        missing = [name for name, _ in self.ranks if name not in by_name]
        if missing:
            raise UserError(f"allocation: {missing[:3]} are not modules or shortcut sites of this model; check the names")
        return sum(r * by_name[name].params_per_rank for name, r in self.ranks)

    def compact(self, modules: list[AdaptableModule]) -> str:
        rank = self.as_dict()
        lora = [f"{m.short}:{rank[m.name]}" for m in modules if m.name in rank and not is_shortcut_item(m.name)]
        return ",".join(lora + ([format_compact(self.shortcuts)] if self.shortcuts else []))

    @property
    def candidate_id(self) -> str:
        text = ",".join(f"{name}:{r}" for name, r in self.ranks)
        return "a" + hashlib.sha1(text.encode()).hexdigest()[:10]

    @property
    def total_rank(self) -> int:
        return sum(r for _, r in self.ranks)

    def check_against(self, model: nn.Module) -> None:
        """Every key must match exactly one Linear module by PEFT's own suffix rule."""
        if not self.lora_ranks:
            raise UserError("allocation: no LoRA module has a rank > 0; switch on at least one module")
        check_specs(model, self.shortcuts)
        names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
        for key, _ in self.lora_ranks:
            pattern = re.compile(rf"(.*\.)?({re.escape(key)})$")
            hits = [name for name in names if pattern.match(name)]
            if len(hits) != 1:
                raise UserError(f"allocation: module '{key}' matches {len(hits)} Linear modules of the model; "
                                "use full module names from `lora-search modules`")

    def to_lora_config(self, heads: list[str]):
        """PEFT LoraConfig: exact target list, one escaped rank/alpha pattern per module, the `heads` trained."""
        from peft import LoraConfig

        default_rank = Counter(r for _, r in self.lora_ranks).most_common(1)[0][0]
        return LoraConfig(
            r=default_rank,
            lora_alpha=self.alpha_ratio * default_rank,
            target_modules=[name for name, _ in self.lora_ranks],
            rank_pattern={re.escape(name): r for name, r in self.lora_ranks},
            alpha_pattern={re.escape(name): self.alpha_ratio * r for name, r in self.lora_ranks},
            lora_dropout=0.0,
            modules_to_save=heads,
            task_type="SEQ_CLS",
        )


def uniform(modules: list[AdaptableModule], types: tuple[str, ...], rank: int) -> Allocation:
    return Allocation.from_ranks({m.name: rank for m in modules if m.type in types})


def budget_params(modules: list[AdaptableModule], params: int | None, qv_rank: int | None) -> int:
    """Absolute budget, or the parameters of uniform q,v LoRA at `qv_rank`."""
    if params is not None:
        return params
    return uniform(modules, ("query", "value"), qv_rank).trainable_params(modules)


def apply_adalora(model: nn.Module, allocation: Allocation, total_steps: int):
    """AdaLoRA baseline (PEFT) at the allocation's budget.

    Every module starts at 1.5× the target rank and AdaLoRA masks singular values down on its cubic
    schedule until the total rank is target_r × modules, i.e. the allocation's own parameter count
    (DESIGN §5). It trains more parameters than it keeps: the report shows both counts.
    """
    from peft import AdaLoraConfig, get_peft_model

    allocation.check_against(model)
    target_r = max(r for _, r in allocation.lora_ranks)
    config = AdaLoraConfig(init_r=math.ceil(1.5 * target_r), target_r=target_r, lora_alpha=allocation.alpha_ratio * target_r,
                           target_modules=[name for name, _ in allocation.lora_ranks], lora_dropout=0.0,
                           total_step=total_steps, tinit=int(0.1 * total_steps), tfinal=int(0.2 * total_steps),
                           deltaT=max(1, total_steps // 50), modules_to_save=head_modules(model), task_type="SEQ_CLS")
    return get_peft_model(model, config)


ADALORA_STATE = "adalora_state.safetensors"
_ALLOCATOR_STATE = ("ipt", "exp_avg_ipt", "exp_avg_unc")  # RankAllocator's importance scores and their moving averages


def save_adalora_state(peft_model: nn.Module, directory: str | Path) -> None:
    """What a restarted AdaLoRA worker needs, into `directory`/adalora_state.safetensors: the trainable weights
    untrimmed, the rank pattern and the importance averages. PEFT's save_pretrained cuts the weights to the pruned
    ranks, which a fresh AdaLoRA model cannot load, and keeps no importance scores."""
    from safetensors.torch import save_file

    tuner = peft_model.base_model
    tensors = {f"param.{n}": p for n, p in peft_model.named_parameters() if p.requires_grad}
    for kind in _ALLOCATOR_STATE:
        tensors |= {f"{kind}.{n}": t for n, t in getattr(tuner.rankallocator, kind).items()}
    pattern = tuner.peft_config[tuner.trainable_adapter_name].rank_pattern
    save_file({k: t.detach().cpu().contiguous() for k, t in tensors.items()}, Path(directory) / ADALORA_STATE,
              metadata={"rank_pattern": json.dumps(pattern)})


def load_adalora_state(peft_model: nn.Module, directory: str | Path) -> None:
    """Restore what save_adalora_state wrote onto a fresh AdaLoRA model built the same way (apply_adalora)."""
    import torch
    from safetensors import safe_open

    with safe_open(str(Path(directory) / ADALORA_STATE), framework="pt") as f:
        saved, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    params = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    weights = {k.removeprefix("param."): t for k, t in saved.items() if k.startswith("param.")}
    if set(weights) != set(params):
        raise RuntimeError(f"{ADALORA_STATE} does not fit this AdaLoRA model: missing {sorted(set(params) - set(weights))[:3]}, "
                           f"unexpected {sorted(set(weights) - set(params))[:3]}")
    device = next(iter(params.values())).device
    with torch.no_grad():
        for name, param in params.items():
            param.copy_(weights[name])
    tuner = peft_model.base_model
    for kind in _ALLOCATOR_STATE:
        setattr(tuner.rankallocator, kind,
                {k.removeprefix(f"{kind}."): t.to(device) for k, t in saved.items() if k.startswith(f"{kind}.")})
    tuner.peft_config[tuner.trainable_adapter_name].rank_pattern = json.loads(metadata["rank_pattern"])


def apply_lora(model: nn.Module, allocation: Allocation):
    """Wrap `model` in a PeftModel carrying the allocation's LoRA modules (checked first) with a trainable head.

    Its shortcuts, if any, go on afterwards with `attach_allocation_shortcuts` (PEFT freezes all else when it wraps)."""
    from peft import get_peft_model

    allocation.check_against(model)
    return get_peft_model(model, allocation.to_lora_config(head_modules(model)))


def attach_allocation_shortcuts(peft_model: nn.Module, allocation: Allocation, seed: int):
    """The allocation's shortcut modules on a PEFT model, or None when it has none."""
    if not allocation.shortcuts:
        return None
    return attach_shortcuts(peft_model, allocation.shortcuts, alpha_ratio=allocation.alpha_ratio, seed=seed)


def searchable_units(model: nn.Module, modules: list[AdaptableModule], shortcut_kinds=(), layers=None) -> list:
    """Adaptable modules plus the shortcut sites of the allowed kinds (same interface for allocators)."""
    return list(modules) + (shortcut_sites(model, shortcut_kinds, layers) if shortcut_kinds else [])
