"""Screen: score many candidate allocations with zero-cost proxies inside a Ray Tune run.

1. One Ray task runs every proxy once on a probe model (adapter on every searchable module).
2. A Tune run driven by OptunaSearch (study persisted in SQLite or any SQLAlchemy URL) samples a
   distribution over allocations per trial; each trial draws `candidates_per_trial` allocations
   inside the budget and scores them from the per-module table, so a trial costs milliseconds.
3. The best distinct candidates by `rank_by` become survivors.
"""

from __future__ import annotations

import json
import math
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import ray
from ray import tune
from ray.tune.search import ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from orchestrator.allocation import Allocation
from orchestrator.allocators import Budget, distribution_space, get_allocator, reachable_caps, sample_allocations
from orchestrator.errors import Interrupted, UserError
from orchestrator.config import RunConfig
from orchestrator.data import TaskData
from orchestrator.models import AdaptableModule
from orchestrator.proxies import ModuleScores, score_modules
from orchestrator.storage import open_storage, run_storage, study_name

CONCURRENT_TRIALS = 2


@dataclass
class ScreenContext:
    """What every screen trial needs; shipped once through the object store."""

    modules: list[AdaptableModule]
    ranks: list[int]
    budget: Budget
    scores: ModuleScores
    candidates_per_trial: int
    rank_by: str
    sign: float  # +1 maximise, -1 minimise
    seed: int

    @classmethod
    def from_config(cls, cfg: RunConfig, searchable: list[AdaptableModule], budget: Budget,
                    scores: ModuleScores) -> ScreenContext:
        sign = 1.0 if cfg.screen.direction == "maximize" else -1.0
        return cls(searchable, cfg.space.ranks, budget, scores, cfg.screen.candidates_per_trial, cfg.screen.rank_by,
                   sign, cfg.screen.seed)


def screen_trial(config: dict, context: ScreenContext) -> None:
    """Tune function trainable: draw a batch of candidates from `config`'s distribution and score them."""
    trial_seed = zlib.crc32(json.dumps(config, sort_keys=True).encode()) ^ context.seed
    allocations = sample_allocations(config, context.modules, context.ranks, context.budget,
                                     context.candidates_per_trial, np.random.default_rng(trial_seed))
    rows = [{"ranks": a.as_dict(), **{f"proxy_{k}": v for k, v in context.scores.scores(a).items()}} for a in allocations]
    key = f"proxy_{context.rank_by}"
    # a NaN score ranks below every finite one (max keeps a NaN that comes first: the trial would be recorded FAIL)
    best = max(((a, row) for a, row in zip(allocations, rows) if math.isfinite(row[key])),
               key=lambda pair: context.sign * pair[1][key], default=None)
    objective = best[1][key] if best else float("nan")
    params = float(best[0].trainable_params(context.modules)) if best else float("nan")  # NSGA-II's 2nd objective
    tune.report({"objective": objective, "params": params, "num_candidates": len(rows), "candidates": json.dumps(rows)})


def storage_url(cfg: RunConfig) -> str:
    from orchestrator.storage import sqlite_url

    return cfg.screen.storage or sqlite_url((cfg.run_dir / "study.db").resolve())


class RecordingOptunaSearch(OptunaSearch):
    """Ray's OptunaSearch tells the study a nan value, Optuna refuses it, and the trial stays RUNNING
    forever; a trial whose distribution drew no candidate inside the budget is recorded as FAIL instead."""

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        metrics = self.metric if isinstance(self.metric, list) else [self.metric]
        if any(isinstance(v, float) and math.isnan(v) for v in ((result or {}).get(m) for m in metrics)):
            result, error = None, True
        super().on_trial_complete(trial_id, result, error)


def _sampler(name: str, seed: int):
    import optuna

    samplers = {"tpe": lambda: optuna.samplers.TPESampler(seed=seed),
                "random": lambda: optuna.samplers.RandomSampler(seed=seed),
                # max_rank is categorical: CMA-ES samples it independently (that is expected, not worth a warning)
                "cmaes": lambda: optuna.samplers.CmaEsSampler(seed=seed, warn_independent_sampling=False),
                "nsga2": lambda: optuna.samplers.NSGAIISampler(seed=seed)}
    return samplers[name]()


def search_algorithm(cfg: RunConfig, points: list[dict]) -> ConcurrencyLimiter:
    """The Optuna searcher, fed in batches: a sampler past its random start-up (TPE, CMA-ES) suggests from the
    trials it has been told about, so telling it each trial as it finishes makes the suggestions depend on
    which of two concurrent trials finished first, and a seeded screen keeps other survivors run to run.
    Told a whole batch at once, it sees the same history at every suggestion."""
    return ConcurrencyLimiter(_searcher(cfg, points), max_concurrent=CONCURRENT_TRIALS, batch=True)


def _searcher(cfg: RunConfig, points: list[dict]) -> RecordingOptunaSearch:
    """Single objective: the best rank_by score of a trial's candidates. NSGA-II adds that candidate's params
    (minimised), so the study maps the score/size trade-off across the budget band. `points` (a warm start's
    distributions) are enqueued as the first trials."""
    mode = cfg.screen.direction[:3]
    metric, mode = (["objective", "params"], [mode, "min"]) if cfg.screen.sampler == "nsga2" else ("objective", mode)
    return RecordingOptunaSearch(metric=metric, mode=mode, study_name=study_name(cfg.name, cfg.screen.storage),
                                 points_to_evaluate=points or None, sampler=_sampler(cfg.screen.sampler, cfg.screen.seed),
                                 storage=open_storage(storage_url(cfg), create=True))


def probe_scores(cfg: RunConfig, task: TaskData, modules: list[AdaptableModule]) -> ModuleScores:
    """Run the proxies on a Ray worker (one CPU), so a cluster keeps the driver light."""
    remote = ray.remote(num_cpus=1)(_probe_in_worker)
    return ray.get(remote.remote(cfg, task, modules))


def _probe_in_worker(cfg: RunConfig, task: TaskData, modules: list[AdaptableModule]) -> ModuleScores:
    import torch

    torch.set_num_threads(1)
    s = cfg.screen
    return score_modules(cfg.model.name, task.num_labels, task.train, modules, s.proxies, probe_rank=s.probe_rank,
                         num_batches=s.proxy_batches, batch_size=s.batch_size, max_length=cfg.model.max_length, seed=s.seed,
                         warmup_steps=s.probe_warmup_steps, warmup_lr=cfg.train.lr, normalisation=s.proxy_normalisation,
                         dropout=cfg.model.dropout)


def run_screen(cfg: RunConfig, context: ScreenContext, points: list[dict] = ()) -> pd.DataFrame:
    """Tune run over allocation distributions → one row per distinct candidate, survivors marked."""
    if cfg.screen.allocator != "optuna":
        return allocator_screen(cfg, context)
    experiment = run_storage(cfg.storage_path, cfg.run_dir, "tune", "screen")
    trainable = tune.with_resources(tune.with_parameters(screen_trial, context=context), {"CPU": 1})
    if tune.Tuner.can_restore(experiment):
        tuner = tune.Tuner.restore(experiment, trainable, resume_errored=True)
    else:
        forget_unrecorded_trials(cfg)
        tuner = tune.Tuner(
            trainable,
            param_space=distribution_space(cfg.space, reachable_caps(context.modules, context.ranks, context.budget)),
            # A trial is milliseconds of arithmetic: reusing a finished trial's process for the next one saves
            # most of its cost (a process start and its imports).
            tune_config=tune.TuneConfig(search_alg=search_algorithm(cfg, list(points)),
                                        num_samples=cfg.screen.num_trials, reuse_actors=True),
            run_config=tune.RunConfig(name="screen", storage_path=run_storage(cfg.storage_path, cfg.run_dir, "tune"),
                                      verbose=1),
        )
    results = tuner.fit()
    check_screen_ended(results, cfg.screen.num_trials)
    return screen_table(results, context, cfg.screen.survivors, list(points))


def forget_unrecorded_trials(cfg: RunConfig) -> None:
    """A screen that Tune cannot restore starts its study over. A driver that died before Tune's first experiment
    checkpoint leaves trials in the study that no screen.csv will list, and they would steer the sampler (a seeded
    screen would keep other survivors). A new run never finds a study here (storage.check_study_storage)."""
    import optuna

    name, storage = study_name(cfg.name, cfg.screen.storage), open_storage(storage_url(cfg), create=True)
    if name in {study.study_name for study in storage.get_all_studies()}:
        optuna.delete_study(study_name=name, storage=storage)


def check_screen_ended(results, num_trials: int) -> None:
    """Tune's fit() returns on Ctrl-C (SIGINT) with trials left pending or running. Their screen must not be
    written: a --resume would take it as the whole screen. A trial ends with its candidates or an error."""
    ended = sum(1 for result in results if result.error or "candidates" in (result.metrics or {}))
    if ended < num_trials:
        raise Interrupted(f"screen stopped after {ended} of {num_trials} trials; nothing was written to screen.csv")


def allocator_screen(cfg: RunConfig, context: ScreenContext) -> pd.DataFrame:
    """A score-driven allocator (top_p, proportional, knapsack) or the random control: no sampler to tune,
    so one call in the driver (milliseconds) makes num_trials × candidates_per_trial candidates."""
    allocator = get_allocator(cfg.screen.allocator)
    count = cfg.screen.num_trials * cfg.screen.candidates_per_trial
    allocations = allocator.propose(context.scores.unit[context.rank_by], context.modules, context.ranks, context.budget,
                                    count, np.random.default_rng(context.seed), context.sign,
                                    context.scores.rank_caps.get(context.rank_by))
    if not allocations:
        raise UserError(f"screen.allocator: '{allocator.name}' found no allocation inside the budget band "
                        f"{context.budget.low}..{context.budget.high} params; widen space.budget.tolerance or add space.ranks")
    rows = [_row(a, context, allocator.name, {f"proxy_{k}": v for k, v in context.scores.scores(a).items()})
            for a in allocations]
    return _survivors(rows, context, cfg.screen.survivors, by_score=allocator.uses_scores)


def _row(allocation: Allocation, context: ScreenContext, trial: str, proxies: dict) -> dict:
    return {"candidate_id": allocation.candidate_id, "allocation": allocation.compact(context.modules),
            "trainable_params": allocation.trainable_params(context.modules), "num_modules": len(allocation.ranks),
            "total_rank": allocation.total_rank, "screen_trial": trial, **proxies}


def screen_table(results, context: ScreenContext, survivors: int, points: list[dict] = ()) -> pd.DataFrame:
    """One row per distinct candidate; `warm_start` marks those drawn from an enqueued earlier distribution."""
    rows = []
    for result in results:
        if result.error or not result.metrics or "candidates" not in result.metrics:
            continue
        warm = any(all(result.config.get(k) == v for k, v in point.items()) for point in points)
        for row in json.loads(result.metrics["candidates"]):
            rows.append(_row(Allocation.from_ranks(row.pop("ranks")), context, result.metrics["trial_id"], row)
                        | {"warm_start": warm})
    return _survivors(rows, context, survivors)


def _survivors(rows: list[dict], context: ScreenContext, survivors: int, by_score: bool = True) -> pd.DataFrame:
    """The distinct candidates, survivors first: the best by rank_by, or (by_score False: the random control) the
    first drawn, so that a random screen trains random draws, not the proxy's pick among them."""
    if not rows:  # the band is reachable (make_budget checked) but the sampler drew nothing inside it
        raise UserError(f"screen: no trial drew an allocation inside the budget band {context.budget.low}..{context.budget.high} "
                        "params; raise screen.num_trials or screen.candidates_per_trial, or widen space.budget.tolerance")
    table = pd.DataFrame(rows).drop_duplicates("candidate_id").reset_index(drop=True)
    if not by_score:
        return table.assign(survivor=table.index < survivors)
    score = table[f"proxy_{context.rank_by}"].astype(float)
    # ±inf is an overflowed proxy, not a best score: it ranks with NaN, after every finite one (as trial objectives do)
    order = (context.sign * score.where(np.isfinite(score))).rank(ascending=False, method="first")
    table["survivor"] = order <= survivors
    # rank order, ties as `order` broke them (so the survivors are the first rows), non-finite scores last
    return table.loc[order.sort_values(na_position="last", kind="stable").index].reset_index(drop=True)


def survivor_shortfall(table: pd.DataFrame, cfg: RunConfig) -> str | None:
    """A line for a screen that kept fewer survivors than screen.survivors asked (too few distinct candidates, or
    too few with a finite score: a non-finite one never survives), else None."""
    kept, asked = int(table.survivor.sum()), cfg.screen.survivors
    if kept >= asked:
        return None
    score = table.get(f"proxy_{cfg.screen.rank_by}", pd.Series(dtype=float)).astype(float)
    return (f"screen: {kept} of {asked} survivors ({len(table)} distinct candidates, {int((~np.isfinite(score)).sum())} "
            f"with a non-finite {cfg.screen.rank_by} score); {'only those train' if kept else 'no screened model trains'}")


def write_screen(table: pd.DataFrame, run_dir: Path) -> None:
    from orchestrator.report import write_atomic

    write_atomic(run_dir / "screen.csv", lambda p: table.to_csv(p, index=False))
