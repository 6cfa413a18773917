"""Learning-rate tuning before the training stage (`train.lr_grid`).

Why: on 20 Newsgroups at 9,216 LoRA params the learning rate moved every allocation more than placement did
(uniform q,v r1: 45.1% at lr 2e-3, 61.7% at 8e-3), and by different amounts per allocation, so allocations compared
at one untuned lr partly compare how well that lr suits each (README, Benchmarks). With a grid, each model the run
trains (survivors, baselines, their variants) trains once, on the first seed, at every lr of the grid, in the sub-run
`<name>.lr-sweep` inside the run directory; the lr with the best validation accuracy (data.validation_size: the
eval split never picks) then trains that model for every other seed. Its first seed is the sweep's training at that
lr, copied into the run (a seed repeats its training: results/benchmarks/ddp_parity.md; README), so a grid of g lrs
costs g - 1 trainings per model. Written: lr_sweep.{csv,md} and run.json `lr_sweep`.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import time
from pathlib import Path

import pandas as pd

from orchestrator.config import LR_SWEEP_SUFFIX, RunConfig
from orchestrator.data import TaskData
from orchestrator.train import TrainJob, adapter_dir, run_training

TABLE = "lr_sweep.csv"


def sweep_config(cfg: RunConfig) -> RunConfig:
    """The main run's recipe on its first seed, in its own run directory inside the main one. Without ASHA: a rate is
    picked on each training's last epoch, and ASHA would stop some at an earlier one, judged against other rates."""
    train = dataclasses.replace(cfg.train, seeds=cfg.train.seeds[:1], lr_grid=None, early_stopping=False)
    return dataclasses.replace(cfg, name=cfg.name + LR_SWEEP_SUFFIX, results_dir=str(cfg.run_dir.resolve()), train=train)


def sweep_id(candidate_id: str, lr: float) -> str:
    """A model's candidate id in the sweep: one per lr, so each training has its own trial file and adapter folder."""
    return f"{candidate_id}-lr{lr:g}"


def sweep_jobs(jobs: list[TrainJob], grid: list[float], seed: int) -> list[TrainJob]:
    """Each model's `seed` job once per lr, under its sweep id."""
    return [dataclasses.replace(job, candidate_id=sweep_id(job.candidate_id, lr), lr=lr)
            for job in jobs if job.seed == seed for lr in grid]


def sweep_table(tried: list[TrainJob], trials: dict[str, dict]) -> pd.DataFrame:
    """One row per (model, lr); `chosen` marks each model's best validation accuracy (then F1, then the lower lr)."""
    rows = []
    for job in tried:
        trial = trials.get(job.job_id, {})
        rows.append({"candidate_id": job.candidate_id.removesuffix(sweep_id("", job.lr)), "label": job.label, "lr": job.lr,
                     "val_accuracy": trial.get("val_accuracy"), "val_f1": trial.get("val_f1"),
                     "accuracy": trial.get("accuracy"), "status": trial.get("status", "not run"),
                     "train_wall_s": trial.get("train_wall_s", 0.0), "device_hours": trial.get("device_hours", 0.0),
                     "cost_usd": trial.get("cost_usd", 0.0)})
    table = pd.DataFrame(rows)
    table["chosen"] = False
    ranked = table.dropna(subset=["val_accuracy"]).sort_values(["val_accuracy", "val_f1", "lr"],
                                                               ascending=[False, False, True], kind="stable")
    table.loc[ranked.drop_duplicates("candidate_id").index, "chosen"] = True
    table["reused"] = table.chosen & (table.status == "completed")  # the model's first seed in the main run
    return table


def summary(table: pd.DataFrame) -> dict:
    """What run.json records: the trainings, their cost, each model's chosen lr and its sweep seconds."""
    chosen, extra = table[table.chosen], table[~table.reused]  # reused trainings count in the main run's training
    return {"trainings": int(extra.val_accuracy.notna().sum()), "seconds": float(extra.train_wall_s.sum()),
            "device_hours": float(extra.device_hours.sum()), "cost_usd": float(extra.cost_usd.sum()),
            "grid": sorted(table.lr.unique().tolist()), "chosen": dict(zip(chosen.candidate_id, chosen.lr)),
            "seconds_by_candidate": extra.groupby("candidate_id").train_wall_s.sum().to_dict()}


def at_the_edge(table: pd.DataFrame) -> str:
    """The models whose chosen lr is the grid's lowest or highest (their best may lie beyond it), as one sentence."""
    chosen, grid = table[table.chosen], sorted(table.lr.unique())
    sides = {"lowest": chosen[chosen.lr == grid[0]].label, "highest": chosen[chosen.lr == grid[-1]].label}
    found = [f"{', '.join(labels)} at the {side} ({grid[0] if side == 'lowest' else grid[-1]:g})"
             for side, labels in sides.items() if len(labels)]
    return f"At the edge of the grid, so their best lr may lie beyond it: {'; '.join(found)}." if found else ""


def markdown(table: pd.DataFrame, cfg: RunConfig, task: TaskData) -> str:
    shown = table.assign(val_accuracy=100 * table.val_accuracy, accuracy=100 * table.accuracy,
                         chosen=table.chosen.map({True: "✓", False: ""}), reused=table.reused.map({True: "✓", False: ""}))
    models = list(dict.fromkeys(zip(table.label, table.candidate_id)))  # run order: survivors, then baselines
    wide = shown.set_index(["label", "candidate_id", "lr"]).val_accuracy.unstack("lr").reindex(models)
    wide = wide.apply(lambda column: column.map(lambda v: "" if pd.isna(v) else f"{v:.2f}"))
    wide.columns = [f"lr {lr:g}" for lr in wide.columns]
    picked = table[table.chosen].set_index("candidate_id").lr
    wide["chosen lr"] = [f"{picked[cid]:g}" if cid in picked else "none finished" for _, cid in wide.index]
    edge = at_the_edge(table)
    return "\n".join([
        "# Learning-rate sweep: each model's lr, picked on validation accuracy", "",
        f"Every model trained once (seed {cfg.train.seeds[0]}) at each lr of train.lr_grid, scored on "
        f"{len(task.validation)} validation examples held out of the training split (data.validation_size). At the best "
        f"lr (✓) that training is the model's seed {cfg.train.seeds[0]} in the run (`reused`: copied, not trained again), "
        f"and the other seeds of train.seeds {cfg.train.seeds} train at it. {time.strftime('%Y-%m-%d %H:%M')}.", "",
        "## Validation accuracy (%) by lr", "", wide.reset_index().to_markdown(index=False, disable_numparse=True), "",
        *([edge, ""] if edge else []),
        "## Every training", "", shown.drop(columns=["train_wall_s"]).to_markdown(index=False, floatfmt=".4g"), "",
        "`accuracy` (the eval split) is shown only to read; it never picks.", ""])


def run_sweep(cfg: RunConfig, task: TaskData, jobs: list[TrainJob]) -> pd.DataFrame:
    """Train every model of `jobs` at every lr of train.lr_grid (a resumed run keeps finished ones); writes and
    returns the sweep's table."""
    from orchestrator.report import write_atomic

    sub = sweep_config(cfg)
    sub.run_dir.mkdir(parents=True, exist_ok=True)
    tried = sweep_jobs(jobs, cfg.train.lr_grid, sub.train.seeds[0])
    print(f"lr sweep: {len(tried)} trainings ({len(tried) // len(cfg.train.lr_grid)} models × lr "
          f"{', '.join(f'{lr:g}' for lr in cfg.train.lr_grid)}), seed {sub.train.seeds[0]}", flush=True)
    table = sweep_table(tried, run_training(sub, task, tried))
    reuse_chosen(cfg, sub, table, {job.candidate_id: job for job in tried})
    if edge := at_the_edge(table):
        print(f"lr sweep: {edge}", flush=True)
    write_atomic(cfg.run_dir / TABLE, lambda p: table.to_csv(p, index=False))
    write_atomic(cfg.run_dir / "lr_sweep.md", lambda p: Path(p).write_text(markdown(table, cfg, task), encoding="utf-8"))
    return table


def reuse_chosen(cfg: RunConfig, sub: RunConfig, table: pd.DataFrame, tried: dict[str, TrainJob]) -> None:
    """Each model's completed sweep training at its chosen lr becomes its first seed in the main run: the trial and
    its adapter are copied (adapter first: the trial file is what marks a job finished), never trained again. `sub`
    is the sweep's own run (sweep_config)."""
    from orchestrator.report import write_atomic

    for row in table[table.reused].itertuples():
        job = tried[sweep_id(row.candidate_id, row.lr)]
        model = dataclasses.replace(job, candidate_id=row.candidate_id)  # the main run's job of the same seed
        target = cfg.run_dir / "trials" / f"{model.job_id}.json"
        if target.is_file():
            continue
        trial = json.loads((sub.run_dir / "trials" / f"{job.job_id}.json").read_text())
        adapter = adapter_dir(cfg.run_dir, model, job.seed)
        shutil.copytree(sub.run_dir / trial["adapter_dir"], adapter, dirs_exist_ok=True)
        trial |= {"candidate_id": row.candidate_id, "adapter_dir": str(adapter.relative_to(cfg.run_dir)),
                  "lr_sweep_trial": job.job_id}
        write_atomic(target, lambda p: Path(p).write_text(json.dumps(trial, indent=1)))
