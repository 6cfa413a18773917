"""Does placement still pay once each model has its own learning rate? Two allocations side by side over rates.

What it measures: two allocations at the same ~9,216-param budget, labels of benchmarks/exhaustive.small_space or any
allocation given as NAME=ALLOCATION (the report's compact form, shortcut connections included), by default
FFN-up layers 1-5 r1 (the 20 Newsgroups exhaustive best at tuned rates) and uniform q,v r1, trained through
`orchestrator.train.run_training` (Ray Tune + Ray Train) at every learning rate given, over seeds, on a shipped
space's data and recipe, every epoch of it (no ASHA early stopping). Per rate: each arm's last-epoch eval accuracy
(mean ± std over seeds) and their difference with Welch's p; then the difference at each arm's own best rate. The
rate is picked on the eval split for both arms alike: a diagnostic of whether placement matters at a tuned rate, not
a product claim (the product picks each model's rate on held-out validation data: `train.lr_grid`). A best rate at
the edge of its arm's own rates is flagged: add rates with --resume before reading it.

Target (issue #12): the first arm − uniform q,v ≥ +1.6 points at their best rates (HeteroLoRA's MRPC result),
Welch p < 0.05.

Run (from the repository root):
    python benchmarks/placement_check.py --quick   # smoke: 300 train / 200 eval, max_length 64, one rate, seeds 0 1
    python benchmarks/placement_check.py           # Reuters R8 (search_spaces/reuters_r8.yaml: 4,000 train / 1,000
                                                   # eval), rates 4e-3 8e-3 1.6e-2, seeds 0 1 2: 18 trainings
    python benchmarks/placement_check.py --lrs 3.2e-2 --resume   # add a rate: the earlier trainings are kept
    python benchmarks/placement_check.py --space search_spaces/newsgroups_tight_budget.yaml \\
        --set data.train_size=8000 --lrs 8e-3 1.6e-2 3.2e-2 --out results/examples/newsgroups-split0-budget9k-train8000
    python benchmarks/placement_check.py --set name=reuters-r52 data.task=reuters_r52 --lrs 8e-3 1.6e-2 2.4e-2 3.2e-2 \\
        --out results/examples/reuters-r52-budget9k   # Reuters R52 under its own name: the R8 run is kept
    python benchmarks/placement_check.py --arms "cross-layer=L0.query:1,L0.value:1,L1.shortcut.cross_layer:2,\
L2.shortcut.cross_layer:2,L3.shortcut.cross_layer:2,L4.shortcut.cross_layer:2,L5.shortcut.cross_layer:2" "q+v r1" \
        --set name=reuters-r52 data.task=reuters_r52 --lrs 8e-3 1.6e-2 --resume --out results/examples/reuters-r52-shortcuts
                                                   # HeteroLoRA shortcuts against the R52 run's q+v r1 (kept, not retrained)
Writes <out>/placement_check.{csv,md} (default results/benchmarks/, --quick results/benchmarks/quick/): every rate
the run has trained, not only those of this call. The run (trials, adapters) stays in
results/benchmarks/placement_check_runs/<quick|full>/<run name>/ (the space's `name`, or --set name=...); without
--resume it starts over there.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import pandas as pd  # noqa: E402

TARGET_PTS = 1.6  # issue #12: HeteroLoRA's MRPC gain over uniform q,v at equal params
ARMS = ("ffn_up L1-5 r1", "q+v r1")  # the second arm is the yardstick
FULL_SPACE = C.ROOT / "search_spaces" / "reuters_r8.yaml"
FULL_LRS, QUICK_LRS = (4e-3, 8e-3, 1.6e-2), (8e-3,)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300/200 examples, max_length 64, one rate, seeds 0 1")
    parser.add_argument("--space", type=Path, default=FULL_SPACE, help="the shipped space whose data and recipe to use")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides, e.g. data.train_size=8000")
    parser.add_argument("--lrs", type=float, nargs="+", help="learning rates (default 4e-3 8e-3 1.6e-2; --quick 8e-3)")
    parser.add_argument("--seeds", type=int, nargs="+", help="training seeds (default 0 1 2; --quick 0 1)")
    parser.add_argument("--arms", nargs=2, default=ARMS, metavar="ARM",
                        help="two labels of benchmarks/exhaustive.small_space, or NAME=ALLOCATION in the report's compact "
                             "form (e.g. qv-low=L0.query:1,L0.value:1,L1.shortcut.cross_layer:2); the second is the yardstick")
    parser.add_argument("--resume", action="store_true", help="add rates or seeds to the earlier run; its trainings are kept")
    C.add_out_argument(parser)
    args = parser.parse_args(argv)
    args.lrs = args.lrs or list(QUICK_LRS if args.quick else FULL_LRS)
    args.seeds = args.seeds or ([0, 1] if args.quick else [0, 1, 2])
    return args


def config_overrides(runs: Path, args: argparse.Namespace) -> list[str]:
    """The space's config as this script trains it: no baselines, and no ASHA with train.epochs > 1, which would stop
    the arms at different epochs and compare unequal training (--set can still turn it back on)."""
    return C.run_overrides(runs, args.seeds, args.quick) + ["train.baselines=[]", "train.early_stopping=false", *args.set]


def runs_folder(runs_root: Path, args: argparse.Namespace) -> Path:
    """The run's folder, named by the run (the space's name, or --set name=...): a run of the same space under its own
    name keeps the other's trainings, which starting over would delete."""
    from orchestrator.config import load_config

    return runs_root / load_config(args.space, args.set).name


def refuse(message: str) -> None:
    print(message, file=sys.stderr)
    raise SystemExit(2)


def pick_arms(args: argparse.Namespace, modules) -> dict:
    """label → Allocation for each --arms entry: a label of exhaustive.small_space, or NAME=ALLOCATION in the report's
    compact form (shortcut connections included). Sets args.arms to the labels; a bad entry exits 2 in one line."""
    from exhaustive import small_space

    from orchestrator.allocation import Allocation
    from orchestrator.errors import UserError

    space, arms = small_space(modules, quick=False), {}
    for entry in args.arms:
        label, given, compact = entry.partition("=")
        if not given and label not in space:
            refuse(f"--arms: '{entry}' is not a label of benchmarks/exhaustive.small_space ({', '.join(sorted(space))}) "
                   "nor NAME=ALLOCATION, e.g. qv-low=L0.query:1,L0.value:1")
        try:
            arms[label] = Allocation.from_compact(compact, modules) if given else space[label]
        except UserError as error:
            refuse(f"--arms {label}: {error}")
    if len(arms) != 2:
        refuse("--arms: give two different labels")
    args.arms = list(arms)
    return arms


def arm_labels(trials: dict[str, dict], arms: dict) -> dict[str, str]:
    """Each training's arm, by its allocation (so an arm renamed between calls keeps its trainings, and other
    allocations of the run are left out): trial id → label."""
    from orchestrator.lr_tuning import sweep_id

    rates = {t["lr"] for t in trials.values()}
    label_of = {sweep_id(a.candidate_id, lr): label for label, a in arms.items() for lr in rates}
    return {trial_id: label_of[t["candidate_id"]] for trial_id, t in trials.items() if t["candidate_id"] in label_of}


def arm_rows(trials: dict[str, dict], arms: dict) -> list[dict]:
    """One row per finished training of an arm, at every rate the run holds."""
    return [{"lr": trials[i]["lr"], "label": label, "seed": trials[i]["seed"], "accuracy": trials[i]["accuracy"],
             "trainable_params": trials[i]["trainable_params"], "train_wall_s": trials[i]["train_wall_s"]}
            for i, label in arm_labels(trials, arms).items() if trials[i].get("status") == "completed"]


def check_every_arm_trained(trials: dict[str, dict], arms: dict, run_dir: Path) -> None:
    """Refuse in one line when an arm finished no training: there is no best rate to compare. A --resume skips
    failed trainings too, so the fix names their files; the finished ones stay."""
    label_of = arm_labels(trials, arms)
    done = {label for i, label in label_of.items() if trials[i].get("status") == "completed"}
    missing = [label for label in arms if label not in done]
    if missing:
        errors = [trials[i].get("error", trials[i].get("status")) for i, label in label_of.items() if label in missing]
        refuse(f"placement_check: no finished training of {' nor of '.join(map(repr, missing))} ({len(errors)} failed, "
               f"first: {errors[0] if errors else 'none ran'}; all in {run_dir / 'trials'}/*.json); fix the cause, delete "
               "those arms' failed trials/<job>.json and rerun with --resume: the finished trainings are kept")


def summarise(rows: pd.DataFrame, arms: tuple[str, str]) -> tuple[pd.DataFrame, dict]:
    """Per rate: each arm's accuracy (%) mean ± std and the difference with Welch's p; and the comparison at each
    arm's own best rate (by mean), with the flag `at_edge` when a best rate is the lowest or highest that arm trained."""
    from orchestrator.report import welch_p

    first, yardstick = arms
    percent = rows.assign(accuracy=100 * rows.accuracy)
    by_arm = {arm: percent[percent.label == arm] for arm in arms}
    lrs = sorted(percent.lr.unique())
    per_lr = []
    for lr in lrs:
        a, b = (by_arm[arm][by_arm[arm].lr == lr].accuracy for arm in arms)
        per_lr.append({"lr": lr, f"{first} %": _mean_std(a), f"{yardstick} %": _mean_std(b),
                       "gain": round(a.mean() - b.mean(), 2), "welch_p": round(welch_p(a, b), 3), "seeds": f"{len(a)}/{len(b)}"})
    means = {arm: by_arm[arm].groupby("lr").accuracy.mean() for arm in arms}
    best_lr = {arm: float(means[arm].idxmax()) for arm in arms}
    best = {arm: by_arm[arm][by_arm[arm].lr == best_lr[arm]].accuracy for arm in arms}
    gain = best[first].mean() - best[yardstick].mean()
    p = welch_p(best[first], best[yardstick])
    summary = {"best_lr": best_lr, "best_mean": {arm: float(best[arm].mean()) for arm in arms}, "gain": float(gain),
               "welch_p": p, "met": bool(gain >= TARGET_PTS and p < 0.05),
               "at_edge": [arm for arm in arms if at_edge(best_lr[arm], means[arm].index)]}
    return pd.DataFrame(per_lr), summary


def at_edge(best: float, rates: pd.Index) -> bool:
    """The arm's own rates (sorted): another arm trained beyond them says nothing about this one's optimum."""
    return len(rates) > 1 and best in (rates[0], rates[-1])


def _mean_std(values: pd.Series) -> str | None:
    if values.empty:
        return None  # no training at this rate: a blank cell, not "nan"
    return f"{values.mean():.2f} ± {values.std():.2f}" if len(values) > 1 else f"{values.mean():.2f}"


def rate_table(per_lr: pd.DataFrame) -> str:
    """The per-rate table; a rate one arm did not train leaves its cells blank."""
    return C.md_table(per_lr.assign(lr=[f"{lr:g}" for lr in per_lr.lr]), blank_missing=True)


def verdict(summary: dict, arms: tuple[str, str]) -> str:
    first, yardstick = arms
    lr, mean = summary["best_lr"], summary["best_mean"]
    line = (f"At each arm's best rate ({first} {lr[first]:g}: {mean[first]:.2f}%; {yardstick} {lr[yardstick]:g}: "
            f"{mean[yardstick]:.2f}%): **{summary['gain']:+.2f} points** (Welch p = {summary['welch_p']:.2f}); "
            f"target ≥ +{TARGET_PTS} with p < 0.05: ")
    if summary["met"]:
        line += "**met**."
    elif summary["gain"] >= TARGET_PTS:
        line += "**missed**: the gain is there, but the seeds cannot tell it from noise."
    else:
        line += f"**missed** by {TARGET_PTS - summary['gain']:.2f} points."
    if summary["at_edge"]:
        line += (f" The best rate of {' and of '.join(summary['at_edge'])} is at the edge of the grid: the optimum may "
                 "lie beyond it (add rates with --resume).")
    return line


def main(argv=None) -> None:
    args = parse_args(argv)
    ctx, runs_root = C.begin("placement_check", args.quick)

    import ray

    from orchestrator import pipeline
    from orchestrator.config import load_config
    from orchestrator.data import load_task
    from orchestrator.lr_tuning import sweep_id
    from orchestrator.models import adaptable_modules, load_model
    from orchestrator.train import TrainJob, run_training

    runs = runs_folder(runs_root, args)
    if not args.resume:
        C.fresh_runs_root(runs)  # this script's own earlier run of the space: without --resume it starts over
    cfg = load_config(args.space, config_overrides(runs.resolve(), args))
    task = load_task(cfg.data)
    modules = adaptable_modules(load_model(cfg.model.name, task.num_labels))
    arms = pick_arms(args, modules)
    jobs = [TrainJob(sweep_id(a.candidate_id, lr), "searched", label, a.as_dict(), seed, lr=lr)
            for lr in args.lrs for seed in args.seeds for label, a in arms.items()]

    pipeline.prepare_run_dir(cfg, args.resume)
    pipeline.write_run_json(cfg, command=C.invoked_command(__file__), allocations=len(arms))
    pipeline.init_ray(None)
    try:
        trials = run_training(cfg, task, jobs)
    finally:
        ray.shutdown()
    check_every_arm_trained(trials, arms, cfg.run_dir)
    rows = pd.DataFrame(arm_rows(trials, arms)).sort_values(["lr", "label", "seed"])
    per_lr, summary = summarise(rows, tuple(args.arms))
    params = rows.groupby("label").trainable_params.first()
    text = "\n\n".join([
        f"# Placement at a tuned learning rate: {args.arms[0]} vs {args.arms[1]} ({cfg.data.task})",
        f"Command: `{C.invoked_command(__file__)}` · {time.strftime('%Y-%m-%d %H:%M')} · load after {C.load_now()} · "
        f"{C.context_line(ctx)}",
        f"Space {args.space.name} with {' '.join(args.set) or 'no overrides'}: {cfg.data.train_size} train / "
        f"{cfg.data.eval_size} eval examples, max_length {cfg.model.max_length}, {cfg.train.epochs} epoch(s), early stopping "
        f"{'on' if cfg.train.early_stopping and cfg.train.epochs > 1 else 'off'}; trainable "
        f"LoRA params {', '.join(f'{label} {params[label]:,}' for label in args.arms)}; every model trains at its row's "
        "rate (the space's train.lr is not used). Rates picked on the eval split "
        "for both arms alike (a diagnostic, not a product claim). Per seed: placement_check.csv.",
        rate_table(per_lr), verdict(summary, tuple(args.arms)), C.NOISE_NOTE])
    out = C.out_dir(args)
    C.write_results(out, "placement_check", rows, text + "\n")


if __name__ == "__main__":
    main()
