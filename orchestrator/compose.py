"""Adapter composition: registered LoRA adapters of other tasks, mixed for a new task from a few labelled examples.

Every composed adapter is exact: per module, the sources' LoRA factors are concatenated, A = [A_1; …; A_k]
(rows) and B = [w_1 s_1 B_1, …, w_k s_k B_k] (columns), so B·A = Σ w_i s_i B_i A_i at rank Σ r_i with
scaling 1, whatever the sources' ranks. A module only some sources adapt gets only their blocks. It is
saved as a plain PEFT LoRA adapter (rank_pattern / alpha_pattern per module) and registered like any other.

The new task needs its own classification head (the sources' heads are for other label sets). Every
method gets it the same way: a logistic regression on the input features of the head's last Linear (BERT:
the pooled output) of the few-shot examples, with the encoder frozen; its coefficients become that layer. Layers
before it in the head (DistilBERT's pre_classifier, RoBERTa's dense, DeBERTa's pooler) keep the weights the
base model loads with (the checkpoint's, or seeded fresh ones), and are saved with it.

Methods compared (`METHODS`):
  zero_shot          the base model, no adapter, + the head fit
  single_best        the one source whose features give the lowest cross-validated few-shot loss
  uniform            w_i = 1/k
  learned            w ∈ [-bound, bound]^k searched gradient-free with Optuna TPE (LoraHub): minimise the
                     few-shot head's cross-validated cross-entropy + l1 · Σ|w_i|, starting from uniform
  few_shot_training  a fresh LoRA (query, value, r=8) + head trained with AdamW on the same examples

Candidate weights are scored cheaply: ΔW = Σ w_i ΔW_i (precomputed dense per source) merged into the
base weights, one forward pass over the few-shot examples, k-fold logistic regressions on those
features. Accuracy and F1 are measured on the task's eval split, never on the few-shot examples.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import re
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from orchestrator.data import Split, TaskData
from orchestrator.errors import UserError

METHODS = ("zero_shot", "single_best", "uniform", "learned", "few_shot_training")
COMPOSED = ("uniform", "learned")  # the methods that produce an adapter to save
_LORA_A = re.compile(r"^base_model\.model\.(.+)\.lora_A\.weight$")
HEAD_C = 1.0  # inverse L2 strength of the logistic-regression head (sklearn's default)


@dataclass
class ComposeConfig:
    shots: int = 16  # labelled examples per class
    methods: tuple[str, ...] = METHODS
    trials: int = 40  # Optuna trials of the learned search (one forward over the few-shot examples each)
    l1: float = 0.05  # LoraHub's penalty on Σ|w_i|
    bound: float = 1.5  # w_i ∈ [-bound, bound]
    folds: int = 4  # cross-validation folds of the few-shot head loss (fewer when a class has fewer shots)
    max_length: int = 128
    eval_size: int | None = 1000
    batch_size: int = 32
    train_epochs: int = 20  # few_shot_training
    train_lr: float = 2e-3
    seed: int = 0  # the few-shot sample, the search and the fresh LoRA

    def __post_init__(self):
        self.methods = tuple(self.methods)
        repeated = sorted({m for m in self.methods if self.methods.count(m) > 1})
        # named by the CLI's flag where there is one: the CLI passes its flags through unchanged
        checks = [(self.shots >= 2, "compose --shots", f"{self.shots} is too few", "give at least 2 examples per class "
                   "(the head's loss is cross-validated)"),
                  (bool(self.methods) and set(self.methods) <= set(METHODS), "compose --method",
                   f"{list(self.methods)} is not a list of known methods",
                   f"use uniform, learned or all ({', '.join(METHODS)})"),
                  (not repeated, "compose --method", f"{', '.join(repeated)} is given twice",  # would run twice
                   "give each method once"),
                  (self.trials >= 1, "compose --trials", f"{self.trials} is not positive", "use e.g. 40"),
                  (self.l1 >= 0, "compose --l1", f"{self.l1} is negative", "use 0 or more, e.g. 0.05"),
                  (self.bound > 0, "compose.bound", f"{self.bound} is not positive", "use e.g. 1.5"),
                  (self.folds >= 2, "compose.folds", f"{self.folds} is below 2", "use e.g. 4"),
                  (8 <= self.max_length <= 4096, "compose --max-length", f"{self.max_length} is out of range",
                   "use 8..4096"),
                  (self.eval_size is None or self.eval_size >= 8, "compose --eval-size",
                   f"{self.eval_size} is too small", "use at least 8"),
                  (self.batch_size >= 1 and self.train_epochs >= 1, "compose.batch_size/train_epochs",
                   "must be positive", "use 1 or more"),
                  (0 < self.train_lr < 1, "compose.train_lr", f"{self.train_lr} is out of range", "use e.g. 2e-3"),
                  (0 <= self.seed < 2**32, "compose --seed", f"{self.seed} is not a seed in [0, 2**32)",
                   f"use an integer from 0 to {2**32 - 1}, e.g. 0")]
        for ok, name, problem, fix in checks:
            if not ok:
                raise UserError(f"{name}: {problem}; {fix}")


# ---------------------------------------------------------------- sources: registered LoRA adapters


@dataclass(frozen=True)
class LoraBlock:
    A: torch.Tensor  # r × in
    B: torch.Tensor  # out × r
    scaling: float  # PEFT's lora_alpha / r (or / √r with rsLoRA)

    @property
    def delta(self) -> torch.Tensor:
        return self.scaling * (self.B @ self.A)


@dataclass(frozen=True)
class Source:
    name: str  # registry name@version
    task: str
    blocks: dict[str, LoraBlock]  # module name inside the base model → its LoRA factors


def _pattern_value(patterns: dict, module: str, default):
    """PEFT's rule: a rank/alpha pattern key applies to a module whose name ends with it at a dot."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def lora_blocks(config: dict, tensors: dict, label: str) -> dict[str, LoraBlock]:
    """The LoRA factors and scaling of every adapted module of a PEFT adapter (config + state dict)."""
    if config.get("peft_type") != "LORA" or config.get("use_dora") or config.get("fan_in_fan_out"):
        raise UserError(f"compose: '{label}' is not a plain LoRA adapter (peft_type {config.get('peft_type')}, "
                        "DoRA or fan_in_fan_out); compose LoRA adapters trained by lora-search")
    blocks, used = {}, set()
    for key, A in tensors.items():
        match = _LORA_A.match(key)
        if match:
            module = match.group(1)
            rank = A.shape[0]
            alpha = _pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", rank))
            scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
            B_key = key.replace(".lora_A.", ".lora_B.")
            blocks[module] = LoraBlock(A.float(), tensors[B_key].float(), float(scaling))
            used |= {key, B_key}
    if not blocks:
        raise UserError(f"compose: '{label}' holds no lora_A/lora_B weights; compose LoRA adapters")
    unused = sorted(key for key in tensors if ".lora_" in key and key not in used)
    if unused:  # e.g. LoRA on embeddings (lora_embedding_A/B) or a lora_B bias: composing without them is not the adapter
        raise UserError(f"compose: '{label}' holds LoRA weights compose cannot merge ({unused[0]}"
                        f"{f' and {len(unused) - 1} more' if len(unused) > 1 else ''}); compose adapters on Linear "
                        "modules without bias, as lora-search trains them")
    return blocks


def load_sources(registry, specs: list[str], base_model: str | None = None) -> tuple[list[Source], str]:
    """Registered adapters (`name` = current version, `name@3` = version 3), checksums and base model checked.

    Returns the sources and the base model they share (default: the one they were stored with)."""
    from orchestrator.registry import CONFIG_FILE, SHORTCUT_SPECS, decode

    if len(specs) < 2:
        raise UserError(f"compose --adapters: {len(specs)} adapter(s) given; give at least 2 registered names, "
                        "comma-separated (see `lora-search registry list`)")
    sources, entries = [], []
    for spec in specs:
        name, at, version = spec.partition("@")
        if at and not re.fullmatch(r"[0-9]+", version):
            raise UserError(f"compose --adapters: '{spec}' is not NAME or NAME@VERSION; e.g. rotten_tomatoes@2")
        entry, contents = registry.verified_files(name, int(version) if version else None)
        label = f"{entry.name}@{entry.version}"
        if label in {s.name for s in sources}:  # e.g. `tiny` and `tiny@1` while v1 is current
            raise UserError(f"compose --adapters: {specs} names {label} twice; give each adapter version once")
        if SHORTCUT_SPECS in contents:  # a shortcut is no Linear module's ΔW: merging without it is not the adapter
            raise UserError(f"compose --adapters: {label} carries shortcut connections ({entry.allocation}), which "
                            "compose cannot merge; compose adapters without shortcuts")
        tensors = decode(contents[entry.weights_file], entry.precision)
        sources.append(Source(label, entry.task, lora_blocks(json.loads(contents[CONFIG_FILE]), tensors, label)))
        entries.append(entry)
    shas = {e.base_model_sha256 for e in entries}
    # two hashes of one base model where some entries were stored before its config.json was hashed too
    if len(shas) > 1 and not shas <= set(registry.base_model_hashes(entries[0].base_model)):
        found = ", ".join(f"{s.name} on {e.base_model}" for s, e in zip(sources, entries))
        raise UserError(f"compose --adapters: the adapters were trained on different base models ({found}); "
                        "compose adapters of one base model")
    base = base_model or entries[0].base_model
    if not shas <= set(registry.base_model_hashes(base)):
        raise UserError(f"compose --model: '{base}' is not the base model the adapters were stored with "
                        f"('{entries[0].base_model}'); leave --model out or give that model")
    return sources, base


def modules_of(sources: list[Source]) -> list[str]:
    return sorted({name for s in sources for name in s.blocks})


def concatenate(sources: list[Source], weights) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per module (A, B) with B·A = Σ w_i s_i B_i A_i exactly: A stacks the A_i, B the scaled B_i side by side."""
    composed = {}
    for name in modules_of(sources):
        parts = [(float(w), s.blocks[name]) for w, s in zip(weights, sources) if name in s.blocks]
        composed[name] = (torch.cat([b.A for _, b in parts], dim=0),
                          torch.cat([w * b.scaling * b.B for w, b in parts], dim=1))
    return composed


# ---------------------------------------------------------------- tasks: built-in, files, regrouped labels


def _cap(split: Split, size: int | None, seed: int) -> Split:
    if size is None or len(split) <= size:
        return split
    return split.subset(np.sort(np.random.default_rng(seed).choice(len(split), size, replace=False)))


def regroup(task: TaskData, groups: list[str], name: str) -> TaskData:
    """A task whose classes are groups of the original labels (names or fnmatch patterns joined by '+');
    examples of labels in no group are dropped."""
    members = [[i for i, label in enumerate(task.label_names) if any(fnmatch.fnmatchcase(label, p) for p in g.split("+"))]
               for g in groups]
    for group, found in zip(groups, members):
        if not found:
            raise UserError(f"compose --task: group '{group}' matches no label of {task.name} "
                            f"({', '.join(task.label_names[:8])}{', …' if task.num_labels > 8 else ''}); "
                            "use label names or patterns such as 'comp.*'")
    mapping = {old: new for new, found in enumerate(members) for old in found}
    if len(groups) < 2 or sum(map(len, members)) != len(mapping):
        raise UserError(f"compose --task: groups {groups} must be at least 2 and must not share a label; "
                        "e.g. newsgroups20:sci.med,sci.space")

    def keep(split: Split) -> Split:
        kept = split.subset([i for i, label in enumerate(split.labels) if label in mapping])
        return Split(kept.texts, [mapping[label] for label in kept.labels], kept.texts_b, kept.groups)

    return TaskData(name, list(groups), keep(task.train), keep(task.eval))


def load_task_spec(spec: str, eval_size: int | None = None, seed: int = 0, train_size: int | None = None) -> TaskData:
    """`rotten_tomatoes` (a built-in task), a CSV/JSONL/Parquet file, or `<task>:<group>,<group>,…`;
    splits capped to seeded samples of train_size / eval_size."""
    from orchestrator.config import DataConfig
    from orchestrator.data import BUILTIN_TASKS, load_task

    base, colon, groups = spec.partition(":")
    if not colon or base not in BUILTIN_TASKS:  # a plain task or a file path (which may hold a colon)
        return load_task(DataConfig(task=spec, train_size=train_size, eval_size=eval_size, split_seed=seed))
    task = regroup(load_task(DataConfig(task=base, train_size=None, eval_size=None, split_seed=seed)),
                   [g.strip() for g in groups.split(",") if g.strip()], spec)
    task.train, task.eval = _cap(task.train, train_size, seed), _cap(task.eval, eval_size, seed)
    return task


def few_shot_sample(split: Split, num_labels: int, shots: int, seed: int) -> Split:
    """`shots` examples of every class, drawn without replacement."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(split.labels)
    picked = []
    for label in range(num_labels):
        pool = np.flatnonzero(labels == label)
        if len(pool) < shots:
            fix = (f"use --shots {len(pool)} or fewer" if len(pool) >= 2 else
                   "no --shots works (at least 2 are needed): add training examples of it, or leave that label out")
            raise UserError(f"compose --shots: class {label} has only {len(pool)} training examples, fewer than "
                            f"{shots}; {fix}")
        picked += rng.choice(pool, shots, replace=False).tolist()
    return split.subset(sorted(picked))


# ---------------------------------------------------------------- the head


@dataclass(frozen=True)
class Head:
    weight: np.ndarray  # num_labels × hidden
    bias: np.ndarray  # num_labels


def fit_head(features: np.ndarray, labels, num_labels: int) -> Head:
    """Multinomial logistic regression as classifier weights (a binary model as ±half logits: same softmax)."""
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=HEAD_C, max_iter=2000).fit(features, labels)
    weight, bias = model.coef_, model.intercept_
    if num_labels == 2 and weight.shape[0] == 1:
        weight, bias = np.concatenate([-weight / 2, weight / 2]), np.concatenate([-bias / 2, bias / 2])
    return Head(weight.astype(np.float32), bias.astype(np.float32))


def head_cv_loss(features: np.ndarray, labels, num_labels: int, folds: int, seed: int) -> float:
    """Cross-entropy of out-of-fold head predictions: the few-shot score of an encoder (a head fit and
    scored on the same few examples would score ≈ 0 for any encoder)."""
    from sklearn.metrics import log_loss
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    folds = min(folds, int(np.bincount(labels, minlength=num_labels).min()))
    probs = np.zeros((len(labels), num_labels))
    for train, test in StratifiedKFold(folds, shuffle=True, random_state=seed).split(features, labels):
        head = fit_head(features[train], labels[train], num_labels)
        logits = features[test] @ head.weight.T + head.bias
        probs[test] = torch.softmax(torch.from_numpy(logits).double(), dim=-1).numpy()
    return float(log_loss(labels, probs, labels=list(range(num_labels))))


# ---------------------------------------------------------------- the merged model


class MergedModel:
    """The base classifier with Σ w_i ΔW_i merged into its weights: a candidate costs one plain forward pass."""

    def __init__(self, base_model: str, num_labels: int, sources: list[Source], device: torch.device):
        from orchestrator.models import load_model, output_layer

        self.model = load_model(base_model, num_labels).to(device).eval()
        # the fitted head is the head's last Linear; layers before it (DistilBERT's pre_classifier, RoBERTa's dense)
        # keep load_model's weights (seeded where fresh), and save_composed stores them with it
        self.output = self.model.get_submodule(output_layer(self.model, num_labels, "compose --model"))
        self.device = device
        self.modules = {name: self.model.get_submodule(name) for name in modules_of(sources)}
        self.base = {name: m.weight.detach().clone() for name, m in self.modules.items()}
        self.deltas = {name: [(i, s.blocks[name].delta.to(device)) for i, s in enumerate(sources) if name in s.blocks]
                       for name in self.modules}

    @torch.no_grad()
    def set_weights(self, weights) -> None:
        for name, module in self.modules.items():
            module.weight.copy_(self.base[name] + sum(float(weights[i]) * d for i, d in self.deltas[name]))

    @torch.no_grad()
    def set_head(self, head: Head) -> None:
        self.output.weight.copy_(torch.from_numpy(head.weight))
        self.output.bias.copy_(torch.from_numpy(head.bias))

    @torch.no_grad()
    def features(self, loader) -> np.ndarray:
        """The input of the head's last Linear (BERT: the pooled output) for every example."""
        captured = []
        hook = self.output.register_forward_pre_hook(lambda _, args: captured.append(args[0].float().cpu()))
        try:
            for batch in loader:
                batch.pop("labels")
                self.model(**{k: v.to(self.device) for k, v in batch.items()})
        finally:
            hook.remove()
        return torch.cat(captured).numpy()


# ---------------------------------------------------------------- the methods


@dataclass
class Outcome:
    method: str
    weights: list[float] | None  # None: not a composition (few-shot training)
    head: Head | None
    search_s: float
    few_shot_loss: float | None = None
    chosen: str | None = None  # single_best: the source picked
    model: torch.nn.Module | None = None  # few_shot_training: the trained PeftModel
    extra: dict = field(default_factory=dict)


class Few:
    """The few-shot examples and the scoring of a weight vector on them."""

    def __init__(self, merged: MergedModel, loader, labels: list[int], num_labels: int, cfg: ComposeConfig):
        self.merged, self.loader, self.labels, self.num_labels, self.cfg = merged, loader, labels, num_labels, cfg

    def score(self, weights) -> tuple[float, np.ndarray]:
        self.merged.set_weights(weights)
        features = self.merged.features(self.loader)
        return head_cv_loss(features, self.labels, self.num_labels, self.cfg.folds, self.cfg.seed), features

    def outcome(self, method: str, weights, started: float, **extra) -> Outcome:
        loss, features = self.score(weights)
        head = fit_head(features, self.labels, self.num_labels)
        return Outcome(method, [float(w) for w in weights], head, time.perf_counter() - started, loss, **extra)


def learn_weights(few: Few, k: int, cfg: ComposeConfig):
    """Optuna TPE over w ∈ [-bound, bound]^k minimising few-shot CV loss + l1 · Σ|w|; starts at uniform."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(
        seed=cfg.seed, multivariate=True, n_startup_trials=min(10, max(1, cfg.trials // 3))))
    study.enqueue_trial({f"w{i}": min(1.0 / k, cfg.bound) for i in range(k)})  # inside the box, as every trial

    def objective(trial) -> float:
        weights = [trial.suggest_float(f"w{i}", -cfg.bound, cfg.bound) for i in range(k)]
        loss, _ = few.score(weights)
        trial.set_user_attr("loss", loss)
        return loss + cfg.l1 * sum(abs(w) for w in weights)

    study.optimize(objective, n_trials=cfg.trials)
    return [study.best_params[f"w{i}"] for i in range(k)], study


def run_method(method: str, few: Few, sources: list[Source], task: TaskData, few_split: Split, base_model: str,
               cfg: ComposeConfig) -> Outcome:
    """One method, timed from its first step: models are built before the clock (the composed methods share the
    MergedModel that `compare` builds, and the few-shot reference's fresh LoRA is built here first)."""
    if method == "few_shot_training":
        model = few_shot_lora(base_model, task.num_labels, cfg.seed, few.merged.device)
        started = time.perf_counter()
        train_few_shot(model, base_model, few_split, cfg, few.merged.device)
        return Outcome(method, None, None, time.perf_counter() - started, model=model)
    started, k = time.perf_counter(), len(sources)
    if method == "zero_shot":
        return few.outcome(method, [0.0] * k, started)
    if method == "uniform":
        return few.outcome(method, [1.0 / k] * k, started)
    if method == "single_best":
        losses = [few.score(np.eye(k)[i])[0] for i in range(k)]
        best = int(np.argmin(losses))
        return few.outcome(method, np.eye(k)[best], started, chosen=sources[best].name,
                           extra={"source_losses": dict(zip((s.name for s in sources), losses))})
    assert method == "learned", method  # ComposeConfig admits only METHODS
    weights, study = learn_weights(few, k, cfg)
    return few.outcome(method, weights, started, extra={"trials": len(study.trials)})


def few_shot_lora(base_model: str, num_labels: int, seed: int, device: torch.device):
    """The reference's model: a fresh LoRA on query and value (r=8) and a fresh head."""
    from orchestrator.allocation import apply_lora, uniform
    from orchestrator.models import adaptable_modules, load_model

    base = load_model(base_model, num_labels, seed=seed)
    return apply_lora(base, uniform(adaptable_modules(base), ("query", "value"), 8)).to(device)


def train_few_shot(model, base_model: str, few_split: Split, cfg: ComposeConfig, device: torch.device):
    """The reference: `model` (few_shot_lora) trained with AdamW, warm-up and decay, on the few examples."""
    from orchestrator.data import make_loader
    from orchestrator.models import load_tokenizer
    from orchestrator.train import _linear_warmup_decay

    loader = make_loader(few_split, load_tokenizer(base_model), cfg.max_length, min(8, len(few_split)), shuffle=True,
                         seed=cfg.seed)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.train_lr)
    scheduler = _linear_warmup_decay(optimizer, cfg.train_epochs * len(loader), 0.06)
    model.train()
    for _ in range(cfg.train_epochs):
        for batch in loader:
            model(**{k: v.to(device) for k, v in batch.items()}).loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
    return model.eval()


def device_price(device: torch.device) -> tuple[int, float]:
    """(devices charged, USD per device-hour) at the default `cost` prices: torch threads × one vCPU, or one GPU."""
    from orchestrator.config import DEFAULT_PRICES

    return (1, DEFAULT_PRICES["gpu"]) if device.type == "cuda" else (torch.get_num_threads(), DEFAULT_PRICES["cpu"])


def compare(sources: list[Source], base_model: str, task: TaskData, cfg: ComposeConfig,
            device: torch.device | None = None) -> tuple[pd.DataFrame, dict[str, Outcome]]:
    """Every method of cfg.methods on one task: one row each (held-out accuracy/F1, search time, cost)."""
    from orchestrator.data import make_loader
    from orchestrator.models import check_max_length, load_tokenizer
    from orchestrator.train import evaluate

    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    few_split = few_shot_sample(task.train, task.num_labels, cfg.shots, cfg.seed)
    tokenizer = load_tokenizer(base_model)
    few_loader = make_loader(few_split, tokenizer, cfg.max_length, cfg.batch_size, shuffle=False)
    eval_loader = make_loader(task.eval, tokenizer, cfg.max_length, cfg.batch_size, shuffle=False)
    merged = MergedModel(base_model, task.num_labels, sources, device)
    check_max_length(merged.model, cfg.max_length)
    few = Few(merged, few_loader, few_split.labels, task.num_labels, cfg)
    few.score([0.0] * len(sources))  # untimed warm-up (imports, first forward): the first method would pay for it
    devices, price = device_price(device)

    rows, outcomes = [], {}
    for method in cfg.methods:
        outcome = run_method(method, few, sources, task, few_split, base_model, cfg)
        started = time.perf_counter()
        if outcome.model is None:
            merged.set_weights(outcome.weights)
            merged.set_head(outcome.head)
        metrics = evaluate(outcome.model or merged.model, eval_loader, device)
        outcome.model = None  # a trained reference model is not kept
        rows.append({"task": task.name, "shots": cfg.shots, "few_shot_examples": len(few_split), "seed": cfg.seed,
                     "method": method, "accuracy": metrics["accuracy"], "f1": metrics["f1"],
                     "eval_loss": metrics["eval_loss"], "few_shot_cv_loss": outcome.few_shot_loss,
                     "search_s": outcome.search_s, "cost_usd": outcome.search_s / 3600 * devices * price,
                     "eval_s": time.perf_counter() - started, "eval_examples": len(task.eval),
                     "chosen": outcome.chosen, "weights": None if outcome.weights is None else
                     json.dumps({s.name: round(w, 6) for s, w in zip(sources, outcome.weights)})})
        outcomes[method] = outcome
    table = pd.DataFrame(rows)
    table.attrs = {"majority_rate": task.majority_rate(), "device": device.type, "devices": devices, "price": price}
    return table, outcomes


# ---------------------------------------------------------------- the composed adapter on disk


def save_composed(sources: list[Source], weights, head: Head, base_model: str, out_dir: str | Path) -> Path:
    """A plain PEFT LoRA adapter (concatenated factors, scaling 1, the fitted head) that from_pretrained loads."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    from orchestrator.models import head_modules, load_model, output_layer
    from orchestrator.report import replace_dir_atomically

    composed = concatenate(sources, weights)
    base = load_model(base_model, head.weight.shape[0])
    output, heads = output_layer(base, head.weight.shape[0], "compose --model"), head_modules(base)
    # the head's other layers as MergedModel fitted on them: load_model's, seeded where fresh
    head_state = {f"base_model.model.{k}": t.clone() for k, t in base.state_dict().items() if k.split(".")[0] in heads}
    ranks = {name: A.shape[0] for name, (A, _) in composed.items()}
    default = max(set(ranks.values()), key=list(ranks.values()).count)
    config = LoraConfig(r=default, lora_alpha=default, target_modules=sorted(composed), lora_dropout=0.0,
                        rank_pattern={re.escape(n): r for n, r in ranks.items()},
                        alpha_pattern={re.escape(n): float(r) for n, r in ranks.items()},  # alpha = r: scaling 1
                        modules_to_save=heads, task_type="SEQ_CLS")
    model = get_peft_model(base, config)
    state = {f"base_model.model.{n}.lora_{part}.weight": t for n, (A, B) in composed.items() for part, t in (("A", A), ("B", B))}
    state |= head_state | {f"base_model.model.{output}.weight": torch.from_numpy(head.weight),
              f"base_model.model.{output}.bias": torch.from_numpy(head.bias)}
    result = set_peft_model_state_dict(model, state)
    missing = [k for k in result.missing_keys if "lora_" in k or "modules_to_save" in k]
    if result.unexpected_keys or missing:  # a PEFT key layout this code does not know: fail loudly, not silently
        raise RuntimeError(f"composed adapter did not load into PEFT: unexpected {result.unexpected_keys[:3]}, "
                           f"missing {missing[:3]}")
    out = Path(out_dir)
    replace_dir_atomically(out, model.save_pretrained)  # a rerun with the same --out replaces it whole
    return out


def register(registry, name: str, adapter_dir: Path, sources: list[Source], base_model: str, task: str,
             row: dict):
    """Store the composed adapter as the next version of `name`, with what it was composed from."""
    metrics = {k: row[k] for k in ("accuracy", "f1", "eval_loss", "search_s", "cost_usd", "shots", "seed")}
    metrics |= {"method": row["method"], "weights": json.loads(row["weights"]), "sources": [s.name for s in sources],
                "evaluated_at": "fp32"}
    return registry.add(name, adapter_dir, task, base_model, None, metrics,
                        source=f"compose:{row['method']}:{','.join(s.name for s in sources)}")


# ---------------------------------------------------------------- the report


def summarise(table: pd.DataFrame) -> pd.DataFrame:
    """Mean (± std over seeds where there are several) per task, shots and method, in METHODS order."""
    grouped = table.groupby(["task", "shots", "method"], sort=False)
    summary = grouped.agg(accuracy=("accuracy", "mean"), accuracy_std=("accuracy", "std"), f1=("f1", "mean"),
                          search_s=("search_s", "mean"), cost_usd=("cost_usd", "mean"), seeds=("seed", "nunique")).reset_index()
    summary["order"] = summary.method.map({m: i for i, m in enumerate(METHODS)})
    return summary.sort_values(["task", "shots", "order"], kind="stable").drop(columns="order")


def plot(summary: pd.DataFrame, path: Path) -> None:
    from orchestrator.report import figure, save_png

    groups = list(summary.groupby(["task", "shots"], sort=False))
    fig, axes = figure(max(6, 2.2 * len(groups)), 4)
    _bars(axes[0, 0], groups, [m for m in METHODS if m in set(summary.method)])
    save_png(fig, path)


def _bars(ax, groups: list, methods: list[str]) -> None:
    """Accuracy (± std over seeds) by method, one cluster of bars per (task, shots)."""
    width = 0.8 / len(methods)
    for j, method in enumerate(methods):
        values = [g.set_index("method").accuracy.get(method, np.nan) for _, g in groups]
        errors = [g.set_index("method").accuracy_std.get(method, np.nan) for _, g in groups]
        ax.bar(np.arange(len(groups)) + j * width, values, width, yerr=np.nan_to_num(errors), label=method, capsize=2)
    ax.set_xticks(np.arange(len(groups)) + width * (len(methods) - 1) / 2)
    ax.set_xticklabels([f"{t}\n{s} shots/class" for (t, s), _ in groups], fontsize=7)
    ax.set_ylabel("eval accuracy")
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7, ncol=len(methods), loc="lower center")


def write_report(table: pd.DataFrame, out_dir: str | Path, stem: str = "compose", header: list[str] = ()) -> list[Path]:
    """<stem>.csv (every row), <stem>.md (the mean table + every row) and <stem>.png (accuracy by method)."""
    from orchestrator.report import markdown_table, write_atomic

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary = summarise(table)
    shown = table.drop(columns=["weights"]).assign(weights=table.weights.fillna("-"))
    # blank, not `nan`, where a number is undefined (the std of one seed), as in report.md
    md = [*header, "## Mean over seeds", "", markdown_table(summary), "", "## Every run", "", markdown_table(shown), ""]
    paths = [out / f"{stem}.csv", out / f"{stem}.md", out / f"{stem}.png"]
    write_atomic(paths[0], lambda p: table.to_csv(p, index=False))
    write_atomic(paths[1], lambda p: Path(p).write_text("\n".join(md), encoding="utf-8"))
    plot(summary, paths[2])
    return paths


def check_out_dir(out_dir: str | Path) -> Path:
    """--out, checked before the methods run (minutes) rather than when their adapters are saved; made only then,
    so that bad input elsewhere leaves no empty directory behind."""
    from orchestrator.config import nearest_existing

    out = Path(out_dir)
    existing = nearest_existing(out)
    if not (existing.is_dir() and os.access(existing, os.W_OK | os.X_OK)):
        raise UserError(f"compose --out: '{out}' cannot be made a directory ('{existing}' is "
                        f"{'read-only' if existing.is_dir() else 'a file'}); give a directory you can write")
    return out


# The model and data helpers are `run`'s and name its config fields; compose's user gave these flags instead.
_FLAGS = {"model.name": "--model", "model.max_length": "--max-length", "data": "--task", "data.task": "--task"}


@contextmanager
def _named_by_flags():
    """A helper's UserError about a `run` config field, re-raised naming the compose flag that set it."""
    try:
        yield
    except UserError as err:
        field, _, rest = str(err).partition(": ")
        if field not in _FLAGS:
            raise
        raise UserError(f"compose {_FLAGS[field]}: {rest}") from None


def run_compose(registry_root: str | Path, adapters: list[str], task_spec: str, cfg: ComposeConfig, out_dir: str | Path,
                register_as: str | None = None, base_model: str | None = None) -> tuple[pd.DataFrame, dict]:
    """`lora-search compose`: compare the methods, save the composed adapters, write the report, register one.

    The registered adapter is the learned composition when it ran, else the uniform one."""
    from orchestrator.config import DataConfig
    from orchestrator.registry import Registry, _check_name

    if register_as is not None:
        _check_name(register_as)
        if not set(COMPOSED) & set(cfg.methods):
            raise UserError(f"compose --register: --method {','.join(cfg.methods)} composes no adapter to register; "
                            "add uniform or learned to --method, or drop --register")
    out = check_out_dir(out_dir)
    registry = Registry(registry_root)
    if not registry.db_path.is_file():
        raise UserError(f"compose --registry: no registry at '{registry_root}'; add adapters with "
                        "`lora-search registry add` or give the right --registry")
    with _named_by_flags():
        sources, base = load_sources(registry, adapters, base_model)
        # The split the source runs used (data.split_seed's default), whatever --seed is: another split would put the
        # training examples of a source trained on this dataset into the eval split. --seed draws the few-shot sample.
        task = load_task_spec(task_spec, cfg.eval_size, DataConfig().split_seed)
        table, outcomes = compare(sources, base, task, cfg)
    try:
        saved = {m: save_composed(sources, outcomes[m].weights, outcomes[m].head, base, out / "adapters" / m)
                 for m in COMPOSED if m in outcomes}
    except OSError as err:  # a full disk, no permission, or a link or file where an adapter's directory goes
        raise UserError(f"compose --out: could not save a composed adapter under '{out / 'adapters'}' "
                        f"({err.strerror or err}); free disk space, fix permissions or remove what is in the way, "
                        "then run it again") from None
    header = [f"# Adapter composition: {task.name}", "",
              f"Sources: {', '.join(f'{s.name} ({s.task})' for s in sources)}; base model {base}. "
              f"{cfg.shots} examples per class, {len(task.eval)} eval examples, majority rate "
              f"{table.attrs['majority_rate']:.4f}; learned: {cfg.trials} TPE trials, l1 {cfg.l1}, bound ±{cfg.bound}. "
              f"Cost = search_s × {table.attrs['devices']} {table.attrs['device']} device(s) × "
              f"{table.attrs['price']} USD/device-hour.", ""]
    paths = write_report(table, out, header=header)
    entry = None  # registered last: a failed report write must not leave a version that a rerun stores again
    if register_as and saved:
        method = "learned" if "learned" in saved else "uniform"
        row = table[table.method == method].iloc[0].to_dict()
        entry = register(registry, register_as, saved[method], sources, base, task_spec, row)
    return table, {"saved": saved, "entry": entry, "paths": paths}
