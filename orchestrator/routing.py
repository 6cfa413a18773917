"""Sparse modular adapters: several small LoRA experts per module behind a router (DESIGN §6, seed 003).

Each selected Linear becomes a `RoutedLoRALinear`: the frozen base layer, E LoRA experts (A: r_e×in,
Kaiming-uniform as in PEFT; B: out×r_e, zeros; scaling alpha/r_e with alpha = 2·r_e, so every rank
starts on the same footing) and a router, a Linear to E logits. The router reads

- `per_input`: one vector per sequence, the embeddings output averaged over the attention mask.
  `RoutingState` captures it with a forward hook on the embeddings and sets it on every routed
  module (`route_input`) before the encoder layers run, so all tokens of an input share experts.
- `per_token`: the module's own input, so every token picks its experts.

Gating: softmax over the router logits; `topk` keeps the k largest and zeroes the rest, `dense` keeps
all (a soft mixture, for comparison). output = base(x) + Σ_e g_e · B_e A_e x · scaling_e.
The kept probabilities are renormalised to sum to 1 (Mixtral). With k = 1 that makes the gate 1.0, so
only the aux term trains the router; `renormalize=False` keeps the raw probability as the gate
(Switch Transformer), which lets the task loss reach the router but scales the expert down (p ≈ 1/E
at the start). Measured on Rotten Tomatoes (4,000 train, 1 epoch, 1 seed, E=4 r=2 on q,v): k=1
renormalised 74.6%, k=1 raw gate 70.7%, k=2 77.3%, dense 76.9%, plain LoRA r=10 77.8%.
One expert with k = 1 is exactly plain LoRA.
By default all experts run in one pair of matmuls with zero gates for the unselected ones (cheapest
at small ranks); `RoutingState.set_sparse_compute(True)` runs each expert only on the rows routed to
it instead (what pays with large experts). Outputs are the same either way.

The router probabilities and gates of the last forward stay on each module for `aux_loss`:
`balance` is the Switch-Transformer load-balancing term E · Σ_e f_e · P_e (f_e: share of routing
slots given to expert e, P_e: mean router probability; 1.0 when balanced); `entropy` is the mean
per-input router entropy (minimising it makes each input's routing sharper, i.e. sparser).
Padding tokens are left out of both and of the statistics.

    state = attach_routed_adapters(model, names, num_experts=4, expert_rank=2, top_k=1)
    loss = model(**batch).loss + state.aux_loss(0.01)
    state.stats()  # fraction of experts active per input, router entropy, expert usage
    save_routed(model, state, "out/")  ->  routed_adapters.safetensors + routed_config.json
    state = load_routed(fresh_base_model, "out/")

In `lora-search run` (config `routing:`): `budget_expert_ranks` turns a searched allocation into
expert ranks at its modules with experts + routers ≤ its plain LoRA count, and orchestrator/train.py
trains them (job method "routed") beside the plain survivor.
"""

from __future__ import annotations

import ctypes
import json
import math
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from orchestrator.config import LAYER_MODULE, module_type
from orchestrator.data import accuracy_and_macro_f1
from orchestrator.errors import UserError
from orchestrator.models import head_modules, head_params
from orchestrator.report import replace_atomically

__all__ = [
    "RoutedLoRALinear", "RoutingConfig", "RoutingState", "attach_routed_adapters", "save_routed", "load_routed",
    "load_routed_weights", "budget_expert_ranks", "check_expert_counts", "check_routable",
    "train_routed", "measure_inference", "ROUTER_MODES", "GATINGS", "AUX_KINDS",
]

ROUTER_MODES = ("per_input", "per_token")
GATINGS = ("topk", "dense")
AUX_KINDS = ("balance", "entropy", "none")
WEIGHTS_FILE = "routed_adapters.safetensors"
CONFIG_FILE = "routed_config.json"
FORMAT_VERSION = 2  # 2: expert_ranks per module (1: one list for every module)


# ---------------------------------------------------------------- the routed module


class RoutedLoRALinear(nn.Module):
    """A frozen nn.Linear plus E LoRA experts and a router; see the module docstring."""

    def __init__(self, base_layer: nn.Linear, expert_ranks: Sequence[int], top_k: int, mode: str = "per_input",
                 gating: str = "topk", router_in_features: int | None = None, alpha_ratio: float = 2.0,
                 renormalize: bool = True):
        super().__init__()
        self.base_layer = base_layer.requires_grad_(False)
        self.in_features, self.out_features = base_layer.in_features, base_layer.out_features
        self.expert_ranks = tuple(int(r) for r in expert_ranks)
        self.num_experts = len(self.expert_ranks)
        self.top_k = self.num_experts if gating == "dense" else int(top_k)
        self.mode, self.gating = mode, gating
        self.renormalize = bool(renormalize)
        self.scaling = [alpha_ratio * r / r for r in self.expert_ranks]  # lora_alpha / r as PEFT computes it
        factory = {"device": base_layer.weight.device, "dtype": base_layer.weight.dtype}
        self.lora_A = nn.ModuleList(nn.Linear(self.in_features, r, bias=False, **factory) for r in self.expert_ranks)
        self.lora_B = nn.ModuleList(nn.Linear(r, self.out_features, bias=False, **factory) for r in self.expert_ranks)
        for a, b in zip(self.lora_A, self.lora_B):
            nn.init.kaiming_uniform_(a.weight, a=math.sqrt(5))  # PEFT's default LoRA init
            nn.init.zeros_(b.weight)
        router_in = self.in_features if mode == "per_token" else router_in_features
        if router_in is None:
            raise ValueError("per_input routing needs router_in_features (the pooled hidden size)")
        self.router = nn.Linear(router_in, self.num_experts, **factory)
        owner = [e for e, r in enumerate(self.expert_ranks) for _ in range(r)]  # expert of each rank column
        self.register_buffer("rank_owner", torch.tensor(owner, device=factory["device"]), persistent=False)
        self.register_buffer("rank_scaling", torch.tensor([self.scaling[e] for e in owner], device=factory["device"]),
                             persistent=False)
        # Set by RoutingState's hooks before each model forward (not parameters, not saved).
        self.route_input: torch.Tensor | None = None  # per_input: (batch, hidden)
        self.token_mask: torch.Tensor | None = None  # (batch, seq) attention mask, to leave padding out
        self.last_probs: torch.Tensor | None = None
        self.last_gates: torch.Tensor | None = None
        # How top-k is computed (same outputs either way): False (default) runs every expert in one pair of
        # matmuls with zero gates, which is faster at small ranks (measured on MiniLM, r=2, E=4); True gathers
        # the rows routed to each expert and runs only those, which pays once experts are large.
        self.sparse_compute = False
        self.reset_stats()

    # -- forward

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        result = self.base_layer(x)
        logits = self.router(self._router_input(x).to(self.router.weight.dtype))
        probs = logits.float().softmax(-1)
        gates = self._gates(probs)
        self.last_probs, self.last_gates = probs, gates
        self._record(probs.detach(), gates.detach())
        x = x.to(self.lora_A[0].weight.dtype)
        if self.sparse_compute and self.top_k < self.num_experts:
            delta = self._sparse_delta(x, gates)
        else:
            delta = self._dense_delta(x, gates)
        return (result + delta).to(result.dtype)

    def _router_input(self, x: torch.Tensor) -> torch.Tensor:
        if self.mode == "per_token":
            return x
        pooled = self.route_input
        if pooled is None:
            raise RuntimeError("per_input routing has no pooled input: call the whole model (the RoutingState "
                               "hook sets it) or set `route_input` on the module first")
        if pooled.shape[0] != x.shape[0]:
            raise RuntimeError(f"route_input holds {pooled.shape[0]} inputs but the module sees {x.shape[0]}: "
                               "it is stale from another forward")
        return pooled

    def _gates(self, probs: torch.Tensor) -> torch.Tensor:
        if self.top_k >= self.num_experts:
            return probs
        top, index = probs.topk(self.top_k, dim=-1)
        if self.renormalize:
            top = top / top.sum(-1, keepdim=True)
        return torch.zeros_like(probs).scatter(-1, index, top)

    def _gate_of(self, gates: torch.Tensor, e: int, ndim: int) -> torch.Tensor:
        g = gates[..., e]
        return g.reshape(g.shape + (1,) * (ndim - g.dim()))  # (B,)→(B,1,1) per input; (B,T)→(B,T,1) per token

    def _dense_delta(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Every expert at once: x·[A_1;…;A_E]ᵀ (the r_e columns of expert e scaled by g_e·scaling_e) ·[B_1 … B_E]ᵀ."""
        if self.num_experts == 1:  # PEFT's own operation order, so one expert at gate 1.0 equals plain LoRA exactly
            return self.lora_B[0](self.lora_A[0](x)) * self.scaling[0] * self._gate_of(gates, 0, x.dim()).to(x.dtype)
        a = torch.cat([a.weight for a in self.lora_A], 0)
        b = torch.cat([b.weight for b in self.lora_B], 1)
        column_gates = (gates[..., self.rank_owner] * self.rank_scaling).to(x.dtype)  # (..., Σ r_e)
        if self.mode == "per_input":
            column_gates = column_gates.reshape(column_gates.shape[:1] + (1,) * (x.dim() - 2) + column_gates.shape[1:])
        return nn.functional.linear(nn.functional.linear(x, a) * column_gates, b)

    def _sparse_delta(self, x: torch.Tensor, gates: torch.Tensor) -> torch.Tensor:
        """Run each expert only on the rows routed to it: whole sequences per input, single tokens per token."""
        rows_x = x if self.mode == "per_input" else x.reshape(-1, self.in_features)
        rows_g = gates if self.mode == "per_input" else gates.reshape(-1, self.num_experts)
        out = None
        for e, (a, b) in enumerate(zip(self.lora_A, self.lora_B)):
            rows = rows_g[:, e].nonzero().squeeze(1)
            if rows.numel() == 0:
                continue
            xe = rows_x.index_select(0, rows)
            ge = rows_g[:, e].index_select(0, rows).reshape((-1,) + (1,) * (xe.dim() - 1))
            term = b(a(xe)) * self.scaling[e] * ge.to(xe.dtype)
            if out is None:
                out = term.new_zeros(rows_x.shape[:-1] + (self.out_features,))
            out = out.index_add(0, rows, term.to(out.dtype))
        if out is None:  # no row routed anywhere (cannot happen with k ≥ 1, kept for safety)
            out = x.new_zeros(rows_x.shape[:-1] + (self.out_features,))
        return out.reshape(x.shape[:-1] + (self.out_features,))

    # -- statistics and auxiliary loss

    def _row_weights(self, probs: torch.Tensor) -> torch.Tensor:
        """One weight per routing decision: 1 per input, or the attention mask per token (padding 0)."""
        rows = probs.reshape(-1, self.num_experts).shape[0]
        if self.mode == "per_token" and self.token_mask is not None and self.token_mask.numel() == rows:
            return self.token_mask.reshape(-1).to(probs.dtype)
        return probs.new_ones(rows)

    def reset_stats(self) -> None:
        self._stats = None  # (decisions, Σ active experts, Σ router entropy, usage counts per expert)

    def _record(self, probs: torch.Tensor, gates: torch.Tensor) -> None:
        w = self._row_weights(probs)
        p = probs.reshape(-1, self.num_experts)
        active = (gates.reshape(-1, self.num_experts) > 0).to(p.dtype)
        entropy = -(p * p.clamp_min(1e-12).log()).sum(-1)
        update = torch.stack([w.sum(), (active.sum(-1) * w).sum(), (entropy * w).sum()])
        usage = (active * w[:, None]).sum(0)
        if self._stats is None:
            self._stats = (update.double(), usage.double())
        else:
            self._stats = (self._stats[0] + update.double(), self._stats[1] + usage.double())

    def stats(self) -> dict:
        if self._stats is None:
            return {"decisions": 0.0, "fraction_active": float("nan"), "router_entropy": float("nan"),
                    "usage": [float("nan")] * self.num_experts, "usage_entropy": float("nan")}
        (n, active, entropy), usage = self._stats[0].tolist(), self._stats[1]
        share = (usage / usage.sum().clamp_min(1e-12)).tolist()
        return {"decisions": n, "fraction_active": active / max(n, 1e-12) / self.num_experts,
                "router_entropy": entropy / max(n, 1e-12), "usage": share,
                "usage_entropy": float(-sum(s * math.log(s) for s in share if s > 0))}

    def aux_loss(self, kind: str) -> torch.Tensor:
        """This module's auxiliary term for the last forward (differentiable through the probabilities)."""
        if self.last_probs is None:
            raise RuntimeError("aux_loss needs a forward pass first")
        p = self.last_probs.reshape(-1, self.num_experts)
        w = self._row_weights(self.last_probs)
        w = w / w.sum().clamp_min(1e-12)
        if kind == "balance":
            chosen = (self.last_gates.reshape(-1, self.num_experts) > 0).to(p.dtype)
            f = (chosen * w[:, None]).sum(0) / self.top_k  # share of routing slots, sums to 1
            mean_p = (p * w[:, None]).sum(0)
            return self.num_experts * (f.detach() * mean_p).sum()
        if kind == "entropy":
            return (-(p * p.clamp_min(1e-12).log()).sum(-1) * w).sum()
        raise ValueError(f"unknown aux kind '{kind}'")

    def adapter_state_dict(self, keep_vars: bool = False) -> dict[str, torch.Tensor]:
        """Experts and router only (the base layer is frozen and comes from the base model)."""
        return {k: v for k, v in self.state_dict(keep_vars=keep_vars).items() if not k.startswith("base_layer.")}

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, experts={list(self.expert_ranks)}, "
                f"top_k={self.top_k}, mode={self.mode}, gating={self.gating}, renormalize={self.renormalize}")


# ---------------------------------------------------------------- attaching to a model


@dataclass(frozen=True)
class RoutingConfig:
    """Everything `load_routed` needs to rebuild the routed modules; written as routed_config.json.

    expert_ranks holds one tuple of E ranks per module (module_names order); every module has E experts.
    """

    module_names: tuple[str, ...]
    expert_ranks: tuple[tuple[int, ...], ...]
    top_k: int
    mode: str = "per_input"
    gating: str = "topk"
    aux: str = "balance"
    renormalize: bool = True
    alpha_ratio: float = 2.0

    @property
    def num_experts(self) -> int:
        return len(self.expert_ranks[0]) if self.expert_ranks else 0

    def check(self) -> None:
        _need(bool(self.module_names), "routing.modules", "is empty", "name at least one Linear module")
        _need(len(self.expert_ranks) == len(self.module_names), "routing.expert_rank",
              f"gives ranks for {len(self.expert_ranks)} of {len(self.module_names)} modules", "give one list per module")
        for ranks in self.expert_ranks:
            _need(len(ranks) >= 1 and all(isinstance(r, int) and r > 0 for r in ranks),
                  "routing.expert_rank", f"{list(ranks)} must be positive integers", "e.g. 2 or [2, 2, 4, 4]")
            _need(len(ranks) == self.num_experts, "routing.num_experts", f"{len(ranks)} experts at one module but "
                  f"{self.num_experts} at another", "give every module the same number of experts")
        _need(self.mode in ROUTER_MODES, "routing.mode", f"'{self.mode}' is unknown", f"use one of {list(ROUTER_MODES)}")
        _need(self.gating in GATINGS, "routing.gating", f"'{self.gating}' is unknown", f"use one of {list(GATINGS)}")
        _need(self.aux in AUX_KINDS, "routing.aux", f"'{self.aux}' is unknown", f"use one of {list(AUX_KINDS)}")
        _need(self.gating == "dense" or 1 <= self.top_k <= self.num_experts, "routing.top_k",
              f"{self.top_k} is not in 1..{self.num_experts} (routing.num_experts)", "lower top_k or add experts")
        _need(self.alpha_ratio > 0, "routing.alpha_ratio", f"{self.alpha_ratio} is not positive", "use e.g. 2.0")


def _need(condition: bool, field: str, problem: str, fix: str) -> None:
    if not condition:
        raise UserError(f"{field}: {problem}; {fix}")


class RoutingState:
    """The routed modules of one model, the hooks that feed their routers, the loss term and statistics."""

    def __init__(self, model: nn.Module, config: RoutingConfig, modules: dict[str, RoutedLoRALinear]):
        self.model, self.config, self.modules = model, config, modules
        self.pooled: torch.Tensor | None = None
        self.attention_mask: torch.Tensor | None = None
        base = getattr(model, "base_model", model)
        self._hooks = [base.register_forward_pre_hook(self._capture_mask, with_kwargs=True)]
        if config.mode == "per_input":
            self._hooks.append(_embeddings_of(model).register_forward_hook(self._pool))

    # -- hooks

    def _capture_mask(self, module, args, kwargs):
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.attention_mask = mask
        for routed in self.modules.values():
            routed.token_mask = mask

    def _pool(self, module, args, output):
        hidden = output[0] if isinstance(output, tuple) else output  # (batch, seq, hidden)
        mask = self.attention_mask
        if mask is None or mask.shape != hidden.shape[:2]:
            pooled = hidden.mean(1)
        else:
            m = mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * m).sum(1) / m.sum(1).clamp_min(1.0)
        self.pooled = pooled.detach()
        for routed in self.modules.values():
            routed.route_input = self.pooled

    def remove_hooks(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def detach(self) -> None:
        """Put the original Linear modules back and remove the hooks: the model computes as before attaching
        (the caller restores requires_grad, which attaching set)."""
        self.remove_hooks()
        for name, routed in self.modules.items():
            self.model.set_submodule(name, routed.base_layer)

    # -- loss, parameters, statistics

    def aux_loss(self, weight: float, kind: str | None = None) -> torch.Tensor:
        """weight · mean over modules of the `balance` or `entropy` term of the last forward (0 for `none`)."""
        kind = kind or self.config.aux
        first = next(iter(self.modules.values()))
        if kind == "none" or weight == 0:
            return first.router.weight.new_zeros(())
        return weight * torch.stack([m.aux_loss(kind) for m in self.modules.values()]).mean()

    def trainable_parameters(self) -> list[nn.Parameter]:
        """Experts, routers and the classification head: what the optimizer updates."""
        return [p for p in self.model.parameters() if p.requires_grad]

    def trainable_params(self) -> int:
        """Experts + routers (the head is counted apart, as for plain LoRA: `head_params`)."""
        return sum(t.numel() for m in self.modules.values() for t in m.adapter_state_dict().values())

    def expert_params(self) -> int:
        return sum(p.numel() for m in self.modules.values() for p in [*m.lora_A.parameters(), *m.lora_B.parameters()])

    def router_params(self) -> int:
        return sum(p.numel() for m in self.modules.values() for p in m.router.parameters())

    def head_params(self) -> int:
        return head_params(self.model)

    def set_sparse_compute(self, enabled: bool) -> None:
        """True: run each expert only on its routed rows; False (default): all experts, zero gates. Same outputs."""
        for m in self.modules.values():
            m.sparse_compute = enabled

    def reset_stats(self) -> None:
        for m in self.modules.values():
            m.reset_stats()

    def stats(self) -> dict:
        """Routing since the last `reset_stats`, averaged over modules.

        fraction_active: experts with a nonzero gate per input (or token) / E; router_entropy: mean
        entropy of the router distribution in nats (log E = uniform); usage_entropy: entropy of each
        module's expert-usage histogram (log E = perfectly balanced); usage_sorted: mean share of the
        most used, second most used, ... expert; per_module: each module's own usage histogram.
        """
        per_module = {name: m.stats() for name, m in self.modules.items()}
        rows = list(per_module.values())
        mean = lambda key: float(np.mean([r[key] for r in rows]))  # noqa: E731
        width = max(len(r["usage"]) for r in rows)
        sorted_usage = np.mean([sorted(r["usage"], reverse=True) + [0.0] * (width - len(r["usage"])) for r in rows], 0)
        return {"fraction_active": mean("fraction_active"), "router_entropy": mean("router_entropy"),
                "usage_entropy": mean("usage_entropy"), "max_entropy": math.log(self.config.num_experts),
                "usage_sorted": [float(v) for v in sorted_usage], "decisions": mean("decisions"),
                "per_module": per_module}


def _embeddings_of(model: nn.Module) -> nn.Module:
    embeddings = getattr(getattr(model, "base_model", model), "embeddings", None)
    if embeddings is None:
        raise UserError("routing.mode: per_input routing needs the model's embeddings module (BERT-style "
                        "`base_model.embeddings`); use mode: per_token for this model")
    return embeddings


def attach_routed_adapters(model: nn.Module, module_names: Sequence[str], num_experts: int,
                           expert_rank: int | Sequence[int] | Mapping[str, Sequence[int]], top_k: int = 1,
                           mode: str = "per_input",
                           gating: str = "topk", aux: str = "balance", renormalize: bool = True,
                           alpha_ratio: float = 2.0) -> RoutingState:
    """Replace the named Linear modules in place by routed LoRA experts; train only them and the head.

    expert_rank: one rank for every expert, one per expert (len = num_experts), or {module name: ranks of
    its experts} (e.g. from `budget_expert_ranks`). gating="dense"
    activates every expert with softmax weights (top_k is ignored). The initialisation draws from
    torch's global RNG (seed it for reproducible experts, as with PEFT).
    """
    if isinstance(expert_rank, Mapping):
        per_module = [tuple(expert_rank.get(name, ())) for name in module_names]
    else:
        per_module = [tuple([expert_rank] * num_experts if isinstance(expert_rank, int) else expert_rank)] * len(module_names)
    for ranks in per_module:
        _need(len(ranks) == num_experts, "routing.expert_rank", f"gives {len(ranks)} ranks for {num_experts} experts",
              "give one rank or one per expert")
    config = RoutingConfig(tuple(module_names), tuple(per_module), num_experts if gating == "dense" else top_k, mode,
                           gating, aux, renormalize, float(alpha_ratio))
    config.check()
    linears = dict(model.named_modules())
    for name in config.module_names:
        module = linears.get(name)
        _need(isinstance(module, nn.Linear), "routing.modules",
              f"'{name}' is {'not in the model' if module is None else type(module).__name__ + ', not nn.Linear'}",
              "use full names from `lora-search modules` (and attach once per model)")
    router_in = _router_width(model) if mode == "per_input" else None
    model.requires_grad_(False)
    for head in head_modules(model):
        model.get_submodule(head).requires_grad_(True)
    modules = {}
    for name, ranks in zip(config.module_names, config.expert_ranks):
        routed = RoutedLoRALinear(linears[name], ranks, config.top_k, mode, gating, router_in,
                                  config.alpha_ratio, renormalize)
        model.set_submodule(name, routed)
        modules[name] = routed
    return RoutingState(model, config, modules)


def _router_width(model: nn.Module) -> int:
    """Input width of a per_input router: what the embeddings module outputs, i.e. its last LayerNorm's width (ELECTRA's
    and ALBERT's are narrower than hidden_size: they project up after it), else config.hidden_size."""
    norms = [m for m in _embeddings_of(model).modules() if isinstance(m, nn.LayerNorm)]
    width = norms[-1].normalized_shape[-1] if norms else getattr(getattr(model, "config", None), "hidden_size", None)
    if not width:
        raise UserError("routing: cannot tell the embeddings' width; give the model a `config.hidden_size`")
    return width


def _site_costs(model: nn.Module, names, mode: str) -> tuple[dict[str, int], dict[str, int]]:
    """Per named Linear: the parameters of one rank of LoRA (in + out) and of one expert's router row (inputs + bias)."""
    linears = dict(model.named_modules())
    bad = [n for n in names if not isinstance(linears.get(n), nn.Linear)]
    _need(not bad, "routing.modules", f"{bad[:2]} are not nn.Linear modules of the model", "route LoRA modules only")
    router_in = _router_width(model) if mode == "per_input" else None
    return ({n: linears[n].in_features + linears[n].out_features for n in names},
            {n: (router_in or linears[n].in_features) + 1 for n in names})


def _need_room(fits: bool, experts: int, budget: int) -> None:
    _need(fits, "routing.num_experts", f"{experts} rank-1 experts and a router do not fit in {budget:,} parameters",
          "use fewer experts or a larger space.budget")


def check_sparse_variants(top_k: int, num_experts: Sequence[int], gating: Sequence[str]) -> None:
    """A new run's sparse variant must activate fewer than all its experts: the top E of E is the dense model, trained
    again under a sparse label. (A run started before this check still resumes as it began: routing.* is fixed.)"""
    every = [e for e in num_experts if e == top_k]
    _need("topk" not in gating or not every, "routing.top_k", f"{top_k} activates every one of "
          f"{every[0] if every else 0} experts, which is the dense model again under a sparse label",
          "use num_experts above top_k, or leave topk out of routing.gating")


def check_expert_counts(model: nn.Module, names: Sequence[str], num_experts: Sequence[int], mode: str,
                        budget_high: int) -> None:
    """Refuse an expert count that budget_expert_ranks refuses for every allocation of these modules within
    `budget_high` LoRA parameters: E rank-1 experts and a router cost more than that even at the cheapest site.
    A run checks before its screen; each routed job would otherwise fail only after it and the plain trainings."""
    width, router_row = _site_costs(model, names, mode)
    cheapest = min(width[n] + router_row[n] for n in names)
    for e in num_experts:
        _need_room(e * cheapest <= budget_high, e, budget_high)


def check_routable(model: nn.Module, names: Sequence[str], batch: int = 2, tokens: int = 4) -> None:
    """Refuse modules the model also calls on inputs other than its tokens (DeBERTa-v3 projects its relative
    positions with query_proj and key_proj): a router picks experts per input or per token, and those rows are
    neither. One forward of a dummy batch tells, whatever the model."""
    modules = dict(model.named_modules())
    shapes: dict[str, set] = {name: set() for name in names}
    handles = [modules[name].register_forward_hook(lambda _m, args, _out, name=name: shapes[name].add(args[0].shape[:-1]))
               for name in names]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            model(input_ids=torch.zeros(batch, tokens, dtype=torch.long, device=device),
                  attention_mask=torch.ones(batch, tokens, dtype=torch.long, device=device))
    finally:
        for handle in handles:
            handle.remove()
    off = sorted({module_type(LAYER_MODULE.search(name).group(2)) for name, seen in shapes.items()
                  if seen - {torch.Size([batch, tokens])}})
    _need(not off, "space.module_types", f"{off} also run on inputs other than the tokens in this model (DeBERTa-v3 "
          "projects its relative positions with them), which a router cannot route",
          "with routing.enabled, leave them out of space.module_types")


def budget_expert_ranks(model: nn.Module, ranks: Mapping[str, int], num_experts: int,
                        mode: str = "per_input") -> dict[str, list[int]]:
    """Expert ranks per routed site so that experts + routers ≈ plain LoRA at `ranks` (never above it).

    The budget is the LoRA allocation's own count, Σ r_m·(in_m + out_m). Sites keep its proportions:
    site m gets a total expert rank ≈ share·r_m, split as evenly as possible over its E experts, where
    share is what is left after the routers. Every expert needs rank ≥ 1, so where E rank-1 experts
    and a router per site do not fit, the sites with the lowest allocated rank are left out. Whatever
    rounding leaves over goes, one rank at a time, to the sites furthest below their share: the
    result is under the budget by less than one rank of one site.
    """
    e = num_experts
    ranks = {n: r for n, r in ranks.items() if r > 0}  # a site without rank has no budget for experts
    width, router_row = _site_costs(model, ranks, mode)
    router = {n: e * router_row[n] for n in ranks}
    budget = sum(r * width[n] for n, r in ranks.items())
    order = {name: i for i, (name, _) in enumerate(model.named_modules())}
    sites = sorted(ranks, key=lambda n: (-ranks[n], order[n]))  # model order among equal ranks: the last are left out
    while sites and sum(e * width[n] + router[n] for n in sites) > budget:
        sites.pop()
    _need_room(bool(sites), e, budget)
    share = (budget - sum(router[n] for n in sites)) / sum(ranks[n] * width[n] for n in sites)
    total = {n: max(e, int(share * ranks[n])) for n in sites}
    cost = lambda: sum(total[n] * width[n] + router[n] for n in sites)  # noqa: E731
    while cost() > budget:  # the rank-≥-1 floor can overshoot: take back from the largest sites
        total[max((n for n in sites if total[n] > e), key=lambda n: total[n])] -= 1
    while True:
        room = [n for n in sites if cost() + width[n] <= budget]
        if not room:
            break
        total[max(room, key=lambda n: share * ranks[n] - total[n])] += 1
    return {n: [total[n] // e + (i < total[n] % e) for i in range(e)] for n in ranks if n in total}


def routed_params(model: nn.Module, sites: Mapping[str, Sequence[int]], mode: str = "per_input") -> int:
    """Experts + routers at these sites (budget_expert_ranks' expert ranks): RoutingState.trainable_params of the
    routed model, without attaching it."""
    width, router_row = _site_costs(model, sites, mode)
    return sum(sum(ranks) * width[n] + len(ranks) * router_row[n] for n, ranks in sites.items())


# ---------------------------------------------------------------- save and load (safetensors only)


def _expected_tensors(model: nn.Module, state: RoutingState, keep_vars: bool) -> dict[str, torch.Tensor]:
    tensors = {f"{name}.{k}": v for name, m in state.modules.items() for k, v in m.adapter_state_dict(keep_vars).items()}
    for head in head_modules(model):
        tensors.update({f"{head}.{k}": v for k, v in model.get_submodule(head).state_dict(keep_vars=keep_vars).items()})
    return tensors


def save_routed(model: nn.Module, state: RoutingState, path: str | Path) -> Path:
    """Write routed_adapters.safetensors (experts, routers, head) and routed_config.json into `path`."""
    from safetensors.torch import save_file

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in _expected_tensors(model, state, False).items()}
    replace_atomically(path / WEIGHTS_FILE, lambda p: save_file(tensors, p, metadata={"format": "routed-lora"}))
    config = asdict(state.config) | {"format_version": FORMAT_VERSION,
                                     "num_labels": int(model.config.num_labels),
                                     "trainable_params": state.trainable_params(), "head_params": state.head_params()}
    replace_atomically(path / CONFIG_FILE, lambda p: Path(p).write_text(json.dumps(config, indent=1)))
    return path


def load_routed(base_model: nn.Module, path: str | Path) -> RoutingState:
    """Rebuild the routed modules on a fresh base model (in place) and load the saved tensors exactly."""
    path = Path(path)
    if not (path / CONFIG_FILE).is_file() or not (path / WEIGHTS_FILE).is_file():
        raise UserError(f"routing: '{path}' lacks {CONFIG_FILE} or {WEIGHTS_FILE}; point at a folder written by save_routed")
    try:
        raw = json.loads((path / CONFIG_FILE).read_text(encoding="utf-8"))
        if raw.get("format_version") not in (1, FORMAT_VERSION):
            raise UserError(f"routing: '{path}' has format_version {raw.get('format_version')}, expected {FORMAT_VERSION}")
        names = tuple(raw["module_names"])
        ranks = [raw["expert_ranks"]] * len(names) if raw["format_version"] == 1 else raw["expert_ranks"]
        config = RoutingConfig(names, tuple(tuple(r) for r in ranks), raw["top_k"], raw["mode"],
                               raw["gating"], raw["aux"], raw["renormalize"], raw["alpha_ratio"])
        config.check()
    except (ValueError, KeyError, TypeError, AttributeError) as err:  # not JSON, not a mapping, a key missing or mistyped
        raise UserError(f"routing: '{path / CONFIG_FILE}' is damaged or not written by save_routed "
                        f"({type(err).__name__}: {err}); write it again with save_routed") from None
    flags = [p.requires_grad for p in base_model.parameters()]
    state = attach_routed_adapters(base_model, config.module_names, config.num_experts,
                                   dict(zip(config.module_names, config.expert_ranks)),
                                   config.top_k, config.mode, config.gating, config.aux, config.renormalize,
                                   config.alpha_ratio)
    try:
        load_routed_weights(base_model, state, path)
    except BaseException:  # leave the model as it came, so a retry with the right files works on it
        state.detach()
        for parameter, flag in zip(base_model.parameters(), flags):
            parameter.requires_grad_(flag)
        raise
    return state


def load_routed_weights(model: nn.Module, state: RoutingState, path: str | Path) -> None:
    """Load saved experts, routers and head into an already attached model (e.g. resuming from a checkpoint)."""
    from safetensors.torch import load_file

    path = Path(path)
    try:
        saved = load_file(path / WEIGHTS_FILE)
    except Exception as err:  # safetensors raises its own error type on a truncated or corrupt file
        raise UserError(f"routing: '{path / WEIGHTS_FILE}' is not a readable safetensors file ({err}); "
                        "restore it from its source") from None
    target = _expected_tensors(model, state, keep_vars=True)
    missing, unexpected = sorted(set(target) - set(saved)), sorted(set(saved) - set(target))
    if missing or unexpected:
        raise UserError(f"routing: '{path / WEIGHTS_FILE}' does not fit the config: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}; the files come from different runs")
    with torch.no_grad():
        for key, tensor in target.items():
            if tensor.shape != saved[key].shape:
                raise UserError(f"routing: '{key}' has shape {tuple(saved[key].shape)} in the file but "
                                f"{tuple(tensor.shape)} in the model; load it onto the same base model and label count")
            tensor.copy_(saved[key])


# ---------------------------------------------------------------- training and inference measurement


def train_routed(model: nn.Module, state: RoutingState | None, train_loader, eval_loader, epochs: int = 1,
                 lr: float = 2e-3, aux_weight: float = 0.01, warmup_ratio: float = 0.06, weight_decay: float = 0.0,
                 device: torch.device | str | None = None) -> dict:
    """The recipe of orchestrator/train.py (AdamW, warm-up + linear decay, bf16 autocast on GPUs with bf16 kernels) plus the
    aux term; then one measured pass over the eval set. `state=None` trains any model's trainable
    parameters the same way (e.g. a PEFT LoRA baseline), so all variants share one loop and one clock.
    """
    from orchestrator.train import _linear_warmup_decay, trains_in_bf16

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model.to(device)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=weight_decay)
    scheduler = _linear_warmup_decay(optimizer, epochs * len(train_loader), warmup_ratio)
    use_bf16 = trains_in_bf16(device)
    losses, aux_losses, elapsed, cpu = [], [], 0.0, 0.0
    for epoch in range(epochs):
        model.train()
        sync(device)
        started, cpu_started = time.perf_counter(), time.process_time()
        for batch in train_loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                task_loss = model(**batch).loss
                aux = state.aux_loss(aux_weight) if state is not None else task_loss.new_zeros(())
            loss = task_loss + aux
            if not math.isfinite(float(loss.detach())):
                raise FloatingPointError(f"non-finite training loss {float(loss.detach())} at epoch {epoch}")
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(task_loss.detach()))
            aux_losses.append(float(aux.detach()))
        sync(device)
        elapsed += time.perf_counter() - started
        cpu += time.process_time() - cpu_started
    if state is not None:
        adapter, head = state.trainable_params(), state.head_params()
    else:  # e.g. PEFT: LoRA matrices are the adapter, every other trainable tensor is the head
        adapter = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
        head = sum(p.numel() for p in trainable) - adapter
    result = {"train_loss": float(np.mean(losses)), "aux_loss": float(np.mean(aux_losses)), "train_wall_s": elapsed,
              "train_cpu_s": cpu, "train_steps": len(losses), "trainable_params": adapter, "head_params": head}
    if state is not None:
        state.reset_stats()
    result |= measure_inference(model, eval_loader, device, state=state)
    if state is not None:
        stats = state.stats()
        result |= {k: stats[k] for k in ("fraction_active", "router_entropy", "usage_entropy", "usage_sorted")}
    return result


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued kernels, so a timer around them measures them (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def measure_inference(model: nn.Module, loader, device: torch.device | str, state: RoutingState | None = None,
                      warmup_batches: int = 1) -> dict:
    """Accuracy, macro-F1 and eval loss (as orchestrator.train.evaluate), per-batch forward latency
    (mean and p95, after `warmup_batches` untimed batches; wall clock, and the process's CPU time,
    which a busy shared machine distorts far less) and peak inference memory above the
    pre-eval baseline: CUDA max_memory_allocated on GPU; on CPU the process's peak RSS (VmHWM, reset
    through /proc/self/clear_refs after malloc_trim), or RSS sampled every millisecond where that is refused.
    """
    device = torch.device(device)
    model.eval()
    for i, batch in enumerate(loader):
        if i >= warmup_batches:
            break
        model(**{k: v.to(device) for k, v in batch.items()})
    if state is not None:
        state.reset_stats()
    predictions, labels, losses, seconds, cpu_seconds = [], [], [], [], []
    with _PeakMemory(device) as memory:
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            sync(device)
            start, cpu_start = time.perf_counter(), time.process_time()
            output = model(**batch)
            sync(device)
            seconds.append(time.perf_counter() - start)
            cpu_seconds.append(time.process_time() - cpu_start)
            losses.append(float(output.loss) * len(batch["labels"]))
            predictions.append(output.logits.argmax(-1).cpu())
            labels.append(batch["labels"].cpu())
    predicted, truth = torch.cat(predictions).numpy(), torch.cat(labels).numpy()
    ms, cpu_ms = 1000 * np.asarray(seconds), 1000 * np.asarray(cpu_seconds)
    return {**accuracy_and_macro_f1(truth, predicted), "eval_loss": sum(losses) / len(truth),
            "latency_ms_mean": float(ms.mean()), "latency_ms_p95": float(np.percentile(ms, 95)), "eval_batches": len(ms),
            "latency_cpu_ms_mean": float(cpu_ms.mean()), "latency_cpu_ms_p95": float(np.percentile(cpu_ms, 95)),
            "peak_infer_mem_mb": memory.peak_mb, "peak_infer_mem_method": memory.method}


def _proc_kib(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return float(line.split()[1])
    raise OSError(f"{field} not in /proc/self/status")


class _PeakMemory:
    """Peak memory above the starting level while the block runs, in MiB (see measure_inference)."""

    def __init__(self, device: torch.device):
        self.device, self.peak_mb, self.method = device, float("nan"), "none"
        self._sampler: threading.Thread | None = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self._base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.method = "cuda_max_allocated"
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)  # give freed training memory back, or eval would reuse it unseen
        except (OSError, AttributeError):
            pass
        try:
            self._base = _proc_kib("VmRSS")
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            if _proc_kib("VmHWM") > self._base * 1.05 + 1024:
                raise OSError("VmHWM did not reset")
            self.method = "rss_hwm"
        except OSError:
            self._base = _proc_kib("VmRSS") if Path("/proc/self/status").exists() else 0.0
            self.method, self._peak, self._stop = "rss_sampled_1ms", self._base, threading.Event()
            self._sampler = threading.Thread(target=self._sample, daemon=True)
            self._sampler.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self._peak = max(self._peak, _proc_kib("VmRSS"))
            time.sleep(0.001)

    def __exit__(self, *exc):
        if self.method == "cuda_max_allocated":
            torch.cuda.synchronize(self.device)
            self.peak_mb = (torch.cuda.max_memory_allocated(self.device) - self._base) / 2**20
        elif self.method == "rss_hwm":
            self.peak_mb = max(0.0, _proc_kib("VmHWM") - self._base) / 1024
        elif self._sampler is not None:
            self._stop.set()
            self._sampler.join()
            self.peak_mb = max(0.0, self._peak - self._base) / 1024
        return False
