"""Calibrate the screen on the task: short trainings measure which module types pay, before screening.

Zero-cost proxies rank module types differently from one task (or data sample) to the next (DESIGN §9.1;
benchmarks/search_quality.py: grad_norm minimised lost to random search on 20 Newsgroups, because the FFN
up-projection, the best place there, has large gradients). With `screen.rank_by: calibrated` the run first
trains one allocation per module type of the space, the whole budget on that type at the lowest rank that
fits, with the real trainings' recipe on their training sample (or a smaller seeded sample and other epochs:
`calibrate.train_size`, `calibrate.epochs`), scored on `calibrate.eval_size` examples held out of that training
sample (never the eval split, which scores the report). The `calibrated` score of a candidate is then the
accuracy its parameters buy over the calibration mean,

    score = 100 × Σ_m params_per_rank_m × min(r_m, r_cal) × (accuracy(type of m) − mean accuracy) / budget  (points),

and the screen keeps the highest scores. r_cal is the rank the type was calibrated at: rank above it earns
nothing, because no run measured what it buys. Without that cap every allocation of one type with the same
parameter count scores the same, and the screen picked among them arbitrarily: on one 20 Newsgroups sample
it kept the whole budget on two FFN-up modules (r4 + r1), where the calibration had measured r1 on five,
and lost 6 points to uniform q,v. Allocators see the uncapped per-unit score (rank-linear, as every proxy);
the survivors are ranked by the capped one.
The calibration runs are ordinary Ray Train jobs in their own run directory (`<run>/<run>.calibration/`),
resumable like the main trainings; their device-hours are the price of the calibration and count in the report.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd

from orchestrator import report
from orchestrator.allocation import Allocation
from orchestrator.allocators import Budget, space_modules
from orchestrator.config import CALIBRATED, CALIBRATION_SUFFIX, RunConfig, TrainConfig
from orchestrator.data import TaskData
from orchestrator.errors import UserError
from orchestrator.models import AdaptableModule
from orchestrator.shortcuts import is_shortcut_item

TABLE = "calibration.csv"
STORED_COLUMNS = ("module_type", "allocation", "accuracy", "train_wall_s", "device_hours", "cost_usd")  # read back


def type_allocation(modules: list[AdaptableModule], ranks: list[int], budget: Budget) -> Allocation | None:
    """The budget on these modules alone: the lowest rank, then the fewest modules (spread over the layers)
    whose parameters land inside the band; None when no such allocation exists."""
    ordered = sorted(modules, key=lambda m: (m.layer, m.name))
    for rank in sorted(ranks):
        for count in range(1, len(ordered) + 1):
            picked = [ordered[i] for i in sorted(set(np.linspace(0, len(ordered) - 1, count).round().astype(int)))]
            if len(picked) == count and budget.admits(sum(rank * m.params_per_rank for m in picked)):
                return Allocation.from_ranks({m.name: rank for m in picked})
    return None


def calibration_allocations(cfg: RunConfig, modules: list[AdaptableModule], budget: Budget) -> dict[str, Allocation | None]:
    """Module type → its single-type allocation (None: the type alone cannot meet the budget band). Shortcut
    sites are not calibrated (a shortcut alone has no LoRA module for PEFT to train): they score 0, the mean."""
    searchable = [m for m in space_modules(modules, cfg.space) if not is_shortcut_item(m.name)]
    types = sorted({m.type for m in searchable})
    return {t: type_allocation([m for m in searchable if m.type == t], cfg.space.ranks, budget) for t in types}


def check_calibratable(cfg: RunConfig, modules: list[AdaptableModule], budget: Budget) -> None:
    """Before Ray starts: the ranking needs two module types that each meet the band alone (with one measured type,
    its gain over the mean is 0 and so is every candidate's score)."""
    fitting = [t for t, allocation in calibration_allocations(cfg, modules, budget).items() if allocation is not None]
    if len(fitting) < 2:
        raise UserError(f"screen.rank_by: calibrated compares module types that each meet the budget band alone, and "
                        f"{len(fitting)} of space.module_types do ({', '.join(fitting) or 'none'}); add module types, "
                        "widen space.budget.tolerance, or rank by a proxy")


def calibration_task(task: TaskData, cfg: RunConfig) -> TaskData:
    """Seeded, disjoint samples of the run's training split: about `calibrate.eval_size` examples (at most half of
    it), whole groups or texts at a time (Split.hold_out), score the calibration runs, which train on the rest (or
    `calibrate.train_size` of it). The eval split is not used: it scores the report, and a calibration that chose
    module types on it would bias the survivors' accuracy upward. Its own seed stream: a different sample from the
    one the proxies probe."""
    rng = np.random.default_rng([cfg.screen.seed, 1])
    held, rest = task.train.hold_out(min(cfg.calibrate.eval_size, len(task.train) // 2), rng)
    size = len(rest) if cfg.calibrate.train_size is None else min(cfg.calibrate.train_size, len(rest))
    return TaskData(task.name, task.label_names, task.train.subset(np.sort(rest[:size])), task.train.subset(held))


def calibration_config(cfg: RunConfig) -> RunConfig:
    """The main run's recipe on the calibration sample, in its own run directory inside the main one; explicit
    calibrate.epochs replace the recipe's epochs and step cap."""
    schedule = {} if cfg.calibrate.epochs is None else {"epochs": cfg.calibrate.epochs, "max_steps": None}
    train = dataclasses.replace(cfg.train, seeds=[cfg.screen.seed], early_stopping=False, lr_grid=None, **schedule)
    return dataclasses.replace(cfg, name=cfg.name + CALIBRATION_SUFFIX, results_dir=str(cfg.run_dir.resolve()), train=train)


def run_calibration(cfg: RunConfig, task: TaskData, modules: list[AdaptableModule], budget: Budget) -> pd.DataFrame:
    """One row per module type: its allocation, calibration accuracy and device-hours (read back on resume)."""
    from orchestrator.train import TrainJob, run_training

    path = cfg.run_dir / TABLE
    if path.is_file():  # a damaged one is one line naming it (delete it and resume: calibrated again)
        return report.read_stored(path, *STORED_COLUMNS)
    sub = calibration_config(cfg)
    sub.run_dir.mkdir(parents=True, exist_ok=True)
    chosen = calibration_allocations(cfg, modules, budget)
    seed = sub.train.seeds[0]
    jobs = {t: TrainJob(f"cal-{a.candidate_id}", "searched", f"calibrate {t}", a.as_dict(), seed)
            for t, a in chosen.items() if a is not None}
    sample = calibration_task(task, cfg)
    print(f"calibrate: training {len(jobs)} module types on {len(sample.train)} examples for {sub.train.epochs} "
          f"epoch(s) ({', '.join(jobs)})", flush=True)
    trials = run_training(sub, sample, list(jobs.values()))
    rows = []
    for module_type, allocation in chosen.items():
        trial = trials.get(jobs[module_type].job_id, {}) if module_type in jobs else {}
        rows.append({"module_type": module_type, "allocation": allocation.compact(modules) if allocation else "",
                     "trainable_params": allocation.trainable_params(modules) if allocation else 0,
                     "accuracy": trial.get("accuracy", float("nan")), "status": trial.get("status", "no allocation fits"),
                     "train_wall_s": trial.get("train_wall_s", 0.0), "device_hours": trial.get("device_hours", 0.0),
                     "cost_usd": trial.get("cost_usd", 0.0)})
    table = pd.DataFrame(rows)
    if table.accuracy.notna().sum() < 2:  # one type's gain over the mean is 0: every candidate would score 0
        raise UserError(f"calibrate: {table.accuracy.notna().sum()} calibration run(s) finished, fewer than the two a "
                        f"comparison needs (their errors are in '{sub.run_dir / 'trials'}'); fix the cause, remove "
                        f"'{sub.run_dir}' and run again with --resume")
    write_outputs(table, cfg.run_dir, sample, sub.train)
    return table


def unit_scores(table: pd.DataFrame, modules: list[AdaptableModule], budget: Budget) -> dict[str, float]:
    """Per module and unit of rank: 100 × params_per_rank × (its type's accuracy − the mean) / budget.
    Types without a calibration accuracy (outside the space, failed, or unable to meet the band) score 0."""
    measured = table.dropna(subset=["accuracy"])
    if measured.empty:
        return {m.name: 0.0 for m in modules}
    gain = dict(zip(measured.module_type, measured.accuracy - measured.accuracy.mean()))
    return {m.name: 100.0 * m.params_per_rank * gain.get(m.type, 0.0) / budget.target for m in modules}


def measured_ranks(table: pd.DataFrame, modules: list[AdaptableModule]) -> dict[str, int]:
    """Per module of a measured type: the rank its type was calibrated at (the cap of its score)."""
    measured = table.dropna(subset=["accuracy"])
    rank = {t: max(r for _, r in Allocation.from_compact(a, modules).ranks)
            for t, a in zip(measured.module_type, measured.allocation)}
    return {m.name: rank[m.type] for m in modules if m.type in rank}


def summary(table: pd.DataFrame) -> dict:
    """What run.json records: trainings, their device-hours and cost, and the types best to worst."""
    measured = table.dropna(subset=["accuracy"]).sort_values("accuracy", ascending=False)
    return {"trainings": int(len(measured)), "seconds": float(table.train_wall_s.sum()),
            "device_hours": float(table.device_hours.sum()),
            "cost_usd": float(table.cost_usd.sum()),
            "accuracy_by_type": {t: round(float(a), 4) for t, a in zip(measured.module_type, measured.accuracy)}}


def write_outputs(table: pd.DataFrame, run_dir: Path, sample: TaskData, schedule: TrainConfig) -> None:
    steps = f", at most {schedule.max_steps} steps" if schedule.max_steps else ""
    plot(table, run_dir / "calibration.png")
    shown = table.assign(accuracy=100 * table.accuracy).sort_values("accuracy", ascending=False)
    text = ["# Calibration: which module types pay on this task", "",
            f"One training per module type, the whole budget on that type, on {len(sample.train)} training examples for "
            f"{schedule.epochs} epoch(s){steps}, scored on {len(sample.eval)} other examples of the training split "
            f"(accuracy in %; the eval split is left to the report). The screen ranks candidates by `{CALIBRATED}`: "
            "the points their parameters buy over the mean of these runs, each module's rank counted up to the rank "
            "its type was calibrated at.", "",
            shown.to_markdown(index=False, floatfmt=".4g"), "",
            f"Calibration cost: {table.device_hours.sum():.4f} device-hours (${table.cost_usd.sum():.4f}).", "",
            "![calibration accuracy per module type](calibration.png)", ""]
    report.write_atomic(run_dir / "calibration.md", lambda p: Path(p).write_text("\n".join(text), encoding="utf-8"))
    report.write_atomic(run_dir / TABLE, lambda p: table.to_csv(p, index=False))  # last: its presence marks the stage done


def plot(table: pd.DataFrame, path: Path) -> None:
    shown = table.dropna(subset=["accuracy"]).sort_values("accuracy")
    fig, axes = report.figure(6.4, 0.5 * max(len(shown), 2) + 1.2)
    ax = axes[0, 0]
    ax.barh(shown.module_type, 100 * shown.accuracy, color="#4C72B0")
    if not shown.empty:
        ax.axvline(100 * shown.accuracy.mean(), color="grey", linestyle="--", label="mean (score 0)")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_xlabel("calibration accuracy (%)")
    ax.set_title("Whole budget on one module type (short training)")
    ax.grid(axis="x", alpha=0.3)
    report.save_png(fig, path)

