"""Search quality at equal parameter budget: lora-search vs random search vs uniform q,v, uniform_all and AdaLoRA.

What it measures, on 20 Newsgroups at a tight budget (search_spaces/newsgroups_tight_budget.yaml:
9,216 LoRA params ±5%, where placement matters, DESIGN §9.1), each arm trained with the product's
own pipeline (`orchestrator.pipeline.run` on `orchestrator.config.load_config(path, overrides)`),
every report read back with `orchestrator.report.load`:

- lora-search: proxy probe + Tune/Optuna screen of 500 candidates (20 trials × 25; --quick: 4 × 25 =
  100), ranked by grad_norm minimised as the shipped space says, the top-k survivors trained;
- lora-search (calibrated): the same screen ranked by `calibrated` (orchestrator/calibrate.py): one
  training per module type with the run's recipe (the `calibrate` defaults: the whole training sample and
  schedule, scored on 300 examples held out of the training split) measures which types pay on the task, and
  the top-k by that score (each module's rank counted up to the rank its type was calibrated at) are trained;
  its cost adds the calibration runs (and the probe, which it copies from the lora-search run: it computes
  the other proxies' columns);
- random search: k random allocations inside the same band trained (`screen.allocator=random`,
  num_trials 1 × candidates_per_trial k, so the survivors are exactly the k random draws and the proxy
  picks nothing); it reuses the lora-search run's module_scores.json, so no second probe runs. One set of
  k draws is one sample of random search: `--random-draws N` (N > k) trains N draws instead, and the arm
  becomes the exact expected best of k over every k-subset of them (its cost: k models' mean hours), with
  the share of those draw sets whose best reaches each search arm's best;
- baselines at the same budget, trained in the lora-search run: uniform_qv (r=1 on q,v), uniform_all
  (r=1 on every Linear: its nearest rank misses the band, its exact count is shown), AdaLoRA (PEFT,
  starting at 1.5× the q,v rank and pruned to the q,v budget).

Per arm: best accuracy (model with the best mean over seeds, ± std over seeds), the mean over the
arm's models, models and trainings, device-hours and USD (training rows of the reports; the
lora-search arm adds its probe), device-hours until the arm has a model within 0.5 point of the best
model of any arm (its models trained in screen order), and ROI = gain of the arm's best over uniform_qv in accuracy points
per USD (and per device-hour). Random search's hours are the mean over every order of its draws (its
expectation, not the one order a run happened to draw; before 2026-12-07 its run listed them by the proxy). Picking the best of k on the eval split flatters arms with k > 1;
the table also gives the arm's mean model for that reason.

Presets (both 1 epoch, lr 2e-3, batch 32, 2 trainings at a time on 1 thread each):
  --quick: train_size 300, eval_size 200, max_length 64, seed 0, survivors k = 1, two module types
           (value, FFN-up), proxies on 2 minibatches (not 8), uniform_qv the only baseline — a smoke-sized version (10 optimizer
           steps per model: expect accuracies near the majority class); the calibrated arm's two
           calibration runs see 128 examples for 1 epoch;
  full:    the shipped space (2,000 train / 1,000 eval, max_length 96), seeds 0 1 2, survivors k = 3
           (36 trainings: k × 3 search arms + 3 baselines, each over 3 seeds; + 6 calibration runs; 1.5-4 min each on
           one CPU thread: 48 to 105 minutes on 2 cores, 2026-12-03 to 2026-12-05, as loaded).

Targets: lora-search's best beats uniform_qv and random search at equal budget (seed-averaged, with
the seed spread shown) at a training cost within k + 1 trainings; ROI > 0.

Run (from the repository root):
    python benchmarks/search_quality.py --quick
    python benchmarks/search_quality.py                     # 3 seeds, full data
    python benchmarks/search_quality.py --seeds 0 1 --survivors 4
    python benchmarks/search_quality.py --report-only       # rewrite the tables from the last full run's reports
                                                            # (k and the random draws: the stored runs')
    python benchmarks/search_quality.py --resume            # go on after an interruption: finished trainings are kept
    python benchmarks/search_quality.py --arms random --random-draws 6 --out results/benchmarks/random_draws
                                                            # random search alone, judged by its expectation
    python benchmarks/search_quality.py --split-seed 1 --arms random --random-draws 6 --out results/benchmarks/random_draws_split1
                                                            # the same on another sample of the task (data.split_seed 1)
Writes results/benchmarks/search_quality.{csv,md} (--quick: in results/benchmarks/quick/; --out changes the
folder); the runs themselves (report.md, adapters, study.db) stay in
results/benchmarks/search_quality_runs/<quick|full>/ (<quick|full>-split<N>/ with --split-seed N; an arm's run is
replaced when the arm runs again without --resume).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from orchestrator.errors import UserError  # noqa: E402  (no model library is imported)

SPACE = C.ROOT / "search_spaces" / "newsgroups_tight_budget.yaml"
BASELINES = ["uniform_qv", "uniform_all", "adalora"]
QUICK_BASELINES = BASELINES[:1]  # the reference every gain is measured against; the others in full mode only
RANDOM_NAME = "random-search"
CALIBRATED_NAME = "lora-search-calibrated"
# arm → (run directory name, what the run_arm log calls it); the baselines are read from the lora-search run
SEARCH_RUNS = {"lora-search": ("lora-search", "lora-search"), "random search": (RANDOM_NAME, "random"),
               "lora-search (calibrated)": (CALIBRATED_NAME, "calibrated")}
SEARCH_ARMS = list(SEARCH_RUNS)
QUICK_CALIBRATION = ["calibrate.train_size=128", "calibrate.eval_size=64", "calibrate.epochs=1"]  # a smoke test, like --quick
QUICK_TYPES = "space.module_types=[value,intermediate.dense]"  # two calibration runs (one round of 2), not six


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 train / 200 eval, max_length 64, 1 seed, k = 1, "
                        "2 module types, 100 candidates, uniform_qv the only baseline")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--survivors", type=int, help="k: models each search arm trains")
    parser.add_argument("--train-size", type=int, help="override data.train_size")
    parser.add_argument("--eval-size", type=int, help="override data.eval_size")
    parser.add_argument("--split-seed", type=int, help="data.split_seed: another sample of the task (default the "
                        "space's, 0); its runs go to search_quality_runs/<quick|full>-split<N>/")
    parser.add_argument("--num-trials", type=int, help="Tune trials of the lora-search screen (default: the space's 20; "
                        "quick 4, i.e. 100 candidates)")
    parser.add_argument("--random-draws", type=int, help="random allocations the random arm trains (default k); "
                        "more than k: the arm is the expected best of k over every k-subset of them")
    parser.add_argument("--arms", nargs="+", choices=[name for _, name in SEARCH_RUNS.values()],
                        default=[name for _, name in SEARCH_RUNS.values()], help="search arms to train (default all); the "
                        "others are reported from their earlier runs with the same preset, if any (random and calibrated "
                        "run their own probe when there is no lora-search run)")
    parser.add_argument("--report-only", action="store_true", help="train nothing: re-read the runs of the last "
                        "invocation with the same preset (results/benchmarks/search_quality_runs/<quick|full>/) and rewrite the "
                        "tables, at the k and random draws those runs trained")
    parser.add_argument("--resume", action="store_true", help="continue the last runs (`lora-search run --resume`): "
                        "their finished trainings are kept")
    C.add_out_argument(parser)
    args = parser.parse_args()
    args.seeds = args.seeds or ([0] if args.quick else list(FULL_SEEDS))
    args.num_trials = args.num_trials or (4 if args.quick else None)
    if args.report_only:  # k and the draws are the stored runs' (stored_k)
        return args
    args.survivors = args.survivors or default_k(args.quick)
    args.random_draws = args.random_draws or args.survivors
    if args.random_draws < args.survivors:
        parser.error(f"--random-draws {args.random_draws}: draw at least k = {args.survivors} (--survivors)")
    return args


def default_k(quick: bool) -> int:
    return 1 if quick else 3


FULL_SEEDS = (0, 1, 2)


def full_trainings() -> int:
    """Trainings of the full mode (calibration runs apart): k per search arm and one per baseline, each seed."""
    return (len(SEARCH_ARMS) * default_k(False) + len(BASELINES)) * len(FULL_SEEDS)


def stored_k(args, runs_root: Path) -> None:
    """--report-only: k and the random draws as the stored runs trained them (their run.json `screen.survivors`:
    the lora-search run's, else the calibrated run's; the random run's is its draw count), so the random arm is
    judged at the search arms' k. A --survivors that differs from the stored k is refused (exit 2)."""
    stored = {folder: _stored_survivors(runs_root / folder) for folder, _ in SEARCH_RUNS.values()}
    k = stored["lora-search"] or stored[CALIBRATED_NAME]
    if k and args.survivors not in (None, k):
        print(f"search_quality: --survivors {args.survivors}: the runs in {runs_root} trained k = {k}; drop "
              "--survivors (--report-only reads k from them)", file=sys.stderr)
        raise SystemExit(2)
    args.survivors = k or args.survivors or default_k(args.quick)
    args.random_draws = stored[RANDOM_NAME] or args.survivors


def _stored_survivors(run_dir: Path) -> int | None:
    path = run_dir / "run.json"
    return json.loads(path.read_text())["config"]["screen"]["survivors"] if path.is_file() else None


def baselines(args) -> list[str]:
    return QUICK_BASELINES if args.quick else BASELINES


def common_overrides(args, results_dir: Path) -> list[str]:
    found = C.run_overrides(results_dir, args.seeds, args.quick) + [f"screen.survivors={args.survivors}"]
    found += [QUICK_TYPES] * args.quick
    if args.train_size:
        found.append(f"data.train_size={args.train_size}")
    if args.eval_size:
        found.append(f"data.eval_size={args.eval_size}")
    if args.split_seed is not None:
        found.append(f"data.split_seed={args.split_seed}")
    return found


def runs_folder(args, preset_root: Path) -> Path:
    """The preset's runs folder; another data sample gets its own, so its arms never mix with sample 0's."""
    return preset_root if args.split_seed is None else preset_root.with_name(f"{preset_root.name}-split{args.split_seed}")


def run_arm(name: str, overrides: list[str], log: dict) -> Path | None:
    from orchestrator.config import load_config
    from orchestrator.errors import Interrupted
    from orchestrator.pipeline import run

    cfg = load_config(SPACE, overrides)
    resume = (Path(cfg.run_dir) / "run.json").is_file()  # only after --resume: otherwise the runs root was wiped
    t0 = time.time()
    try:
        run(cfg, resume=resume)
        status = "ok, resumed (wall: this invocation only)" if resume else "ok"
        log[name] = {"status": status, "wall_s": time.time() - t0, "run_dir": str(cfg.run_dir)}
        return Path(cfg.run_dir)
    except Interrupted:  # Ctrl-C stops the benchmark, not just this arm
        raise
    except Exception as err:  # one arm failing must not lose the others
        traceback.print_exc()
        log[name] = {"status": f"failed: {type(err).__name__}: {err}"[:300], "wall_s": time.time() - t0,
                     "run_dir": str(cfg.run_dir)}
        return None


def arm_overrides(args, runs_root: Path) -> dict[str, list[str]]:
    """run_arm's name → the config overrides of its run."""
    base = common_overrides(args, runs_root.resolve())
    screen = [f"screen.num_trials={args.num_trials}"] if args.num_trials else []
    return {"lora-search": base + screen + ["name=lora-search", f"train.baselines=[{','.join(baselines(args))}]"],
            "random": base + [f"name={RANDOM_NAME}", "screen.allocator=random", "screen.num_trials=1",
                              f"screen.candidates_per_trial={args.random_draws}", f"screen.survivors={args.random_draws}",
                              "train.baselines=[]"],
            "calibrated": base + screen + QUICK_CALIBRATION * args.quick + [
                f"name={CALIBRATED_NAME}", "screen.rank_by=calibrated", "screen.direction=maximize", "train.baselines=[]"]}


# (section, key, the option that sets it) an earlier run must share with this call to be reported beside it
SHARED = (("train", "seeds", "--seeds"), ("data", "train_size", "--train-size"), ("data", "eval_size", "--eval-size"),
          ("screen", "survivors", "--survivors"), ("screen", "num_trials", "--num-trials"))


def check_earlier_runs(args, runs_root: Path, arms: dict[str, list[str]]) -> None:
    """Refuse (UserError) an earlier run of an arm not in --arms that trained another k, seeds, data sizes or screen
    than this call: its models would be judged beside this call's as if alike. Random search's survivors are its
    draws: at least k of them will do."""
    from orchestrator.config import load_config

    for folder, name in SEARCH_RUNS.values():
        path = runs_root / folder / "run.json"
        if name in args.arms or not path.is_file():
            continue
        stored = json.loads(path.read_text())["config"]
        wanted = json.loads(json.dumps(load_config(SPACE, arms[name]).to_dict()))
        for section, key, option in SHARED:
            have, want = stored[section][key], args.survivors if key == "survivors" else wanted[section][key]
            if _differs(name, key, have, want):
                shown = " ".join(map(str, have)) if isinstance(have, list) else have
                raise UserError(f"--arms {' '.join(args.arms)}: the earlier {name} run ({path.parent}) has {section}.{key} = "
                                f"{have}, this call {want}; pass {option} {shown}, or add {name} to --arms to train it again")


def _differs(name: str, key: str, have, want) -> bool:
    if name == "random" and key == "num_trials":  # random search screens nothing
        return False
    if name == "random" and key == "survivors":  # its draws: the arm is the expected best of k over them
        return have < want
    return have != want


def train_arms(args, runs_root: Path) -> tuple[dict[str, Path | None], dict]:
    """The lora-search run (with the baselines), then the random-search and calibrated runs on its probe
    (each of --arms; the other arms are read from their earlier runs, if any, and left as they are)."""
    arms = arm_overrides(args, runs_root)
    check_earlier_runs(args, runs_root, arms)  # before anything is deleted or trained
    import ray

    from orchestrator.pipeline import init_ray

    for folder, name in SEARCH_RUNS.values():
        if name in args.arms and (runs_root / folder).exists() and not args.resume:
            shutil.rmtree(runs_root / folder)  # this script's own earlier run of the arm: run names must be new
    runs_root.mkdir(parents=True, exist_ok=True)
    earlier, log = earlier_runs(runs_root, skip=args.arms)  # the arms not run now are reported from their earlier runs
    dirs = dict(earlier)  # None for the arms about to run (skipped above)
    log = {name: entry | {"status": f"earlier run: {entry['status']}"} for name, entry in log.items()}
    init_ray(None)
    try:
        for arm, (folder, name) in SEARCH_RUNS.items():
            if name not in args.arms:
                continue
            probe = dirs["lora-search"] / "module_scores.json" if dirs["lora-search"] else None
            if probe is not None and probe.is_file() and not (runs_root / folder / "module_scores.json").is_file():
                (runs_root / folder).mkdir(exist_ok=True)
                shutil.copy2(probe, runs_root / folder / "module_scores.json")  # one probe for every arm
            dirs[arm] = run_arm(name, arms[name], log)
    finally:
        ray.shutdown()
    return dirs, log


def earlier_runs(runs_root: Path, skip: tuple[str, ...] = ()) -> tuple[dict[str, Path | None], dict]:
    """The runs of an earlier invocation (but the arms in `skip`, about to run again); an interrupted one gets
    its report rebuilt from its finished trainings.

    Wall time comes from run.json (from the run's start, without Ray's), up to the last finished training."""
    from datetime import datetime

    from orchestrator import report

    found, log = {}, {}
    for arm, (folder, name) in SEARCH_RUNS.items():
        run_dir = runs_root / folder
        found[arm] = None
        if name in skip:
            continue
        info = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
        trials = sorted((run_dir / "trials").glob("*.json"))
        if "started_at" not in info or not trials:
            continue
        stamp = lambda key: datetime.strptime(info[key], "%Y-%m-%dT%H:%M:%S%z").timestamp()  # noqa: E731 (run.json's format)
        started = stamp("started_at")
        if "finished_at" in info:
            status, ended = "ok", stamp("finished_at")
        else:
            try:
                report.rebuild(run_dir)
            except UserError:
                continue
            status = f"interrupted: report rebuilt from its {len(trials)} finished trainings"
            ended = max(t.stat().st_mtime for t in trials)
        log[name] = {"status": status, "wall_s": ended - started, "run_dir": str(run_dir)}
        found[arm] = run_dir
    return found, log


def main() -> None:
    args = parse_args()
    ctx, preset_root = C.begin("search_quality", args.quick)
    runs_root = runs_folder(args, preset_root)
    from orchestrator import report

    if args.report_only:
        stored_k(args, runs_root)
        dirs, log = earlier_runs(runs_root)
    else:
        dirs, log = train_arms(args, runs_root)
    tables = {arm: report.load(run_dir) for arm, run_dir in dirs.items() if run_dir is not None}
    arms, models = summarise(tables, dirs, args)
    out = C.out_dir(args)
    C.write_csv(out / "search_quality.csv", arms)
    C.write_text(out / "search_quality.md", markdown(arms, models, log, ctx, args, tables, runs_root))
    print((out / "search_quality.md").read_text())


def _search_cost(run_dir: Path | None) -> tuple[float, float, float]:
    """(seconds, device-hours, USD) a search run spends before training: its proxy probe (priced per CPU
    device-hour) and, for a calibrated run, its calibration trainings (run.json `calibration`)."""
    if run_dir is None:
        return 0.0, 0.0, float("nan")
    scores = json.loads((run_dir / "module_scores.json").read_text())
    info = json.loads((run_dir / "run.json").read_text())
    probe_s = C.probe_seconds(scores)
    calibration = info.get("calibration") or {}
    price = float(info["config"]["cost"]["price_per_device_hour"]["cpu"])
    seconds = probe_s + float(calibration.get("seconds", 0.0))
    hours = probe_s / 3600 + float(calibration.get("device_hours", 0.0))
    return seconds, hours, probe_s / 3600 * price + float(calibration.get("cost_usd", 0.0))


def _screen_rank(label: str) -> int:
    """screen#3 → 3; a baseline's label → 0 (it is an arm's only model)."""
    return int(label.removeprefix("screen#")) if str(label).startswith("screen#") else 0


def _hours_to_within(arm: str, mine: pd.DataFrame, goal: float) -> float:
    """Device-hours an arm trains until a model is within WITHIN_PTS of `goal`: the search arms' survivors in screen
    order; random search's draws in every order (mean): its expectation, not the one order a run drew."""
    if arm == "random search":
        return C.expected_hours_to_reach(mine.accuracy, mine.device_hours, goal)
    in_order = mine.iloc[mine.label.map(_screen_rank).argsort(kind="stable")]
    return C.hours_to_reach(in_order.accuracy, in_order.device_hours, goal)


def summarise(tables: dict[str, pd.DataFrame], dirs: dict[str, Path | None], args) -> tuple[pd.DataFrame, pd.DataFrame]:
    from orchestrator.report import welch_p

    parts = [t[t.kind == "searched"].assign(arm=arm) for arm, t in tables.items()]
    if "lora-search" in tables:
        t = tables["lora-search"]
        for label in BASELINES:
            parts.append(t[(t.kind == "baseline") & (t.label == label)].assign(arm=label))
    rows = pd.concat(parts, ignore_index=True) if parts else pd.DataFrame()
    if rows.empty:
        return pd.DataFrame(), pd.DataFrame()
    models = (rows.groupby(["arm", "candidate_id", "label", "allocation", "trainable_params"], sort=False)
              .agg(accuracy=("accuracy", "mean"), accuracy_std=("accuracy", "std"), seeds=("seed", "nunique"),
                   device_hours=("device_hours", "sum"), cost_usd=("cost_usd", "sum"),
                   beats_majority=("beats_majority", "all"))
              .reset_index())
    # random search reuses the lora-search probe and needs none; the calibrated arm pays for it (it computes
    # the other proxies' columns) and for its calibration
    search_costs = {arm: _search_cost(dirs.get(arm)) for arm in ("lora-search", "lora-search (calibrated)")}
    reference = rows[rows.arm == "uniform_qv"].accuracy
    ref_mean = reference.mean() if len(reference) else float("nan")
    goal = models.accuracy.max()  # the best model of any arm
    k, drawn = getattr(args, "survivors", None), models[models.arm == "random search"]
    expectation = bool(k) and len(drawn) > k  # --random-draws: one draw set is one sample; the arm is the expectation
    out = []
    for arm in SEARCH_ARMS + BASELINES:
        mine = models[models.arm == arm]
        if arm == "random search" and expectation:
            out.append(expected_random(drawn, k, ref_mean, goal))
            continue
        if mine.empty:
            continue
        best = mine.sort_values("accuracy", ascending=False).iloc[0]
        extra_s, extra_h, extra_usd = search_costs.get(arm, (0.0, 0.0, 0.0))
        device_hours = mine.device_hours.sum() + extra_h
        reach = _hours_to_within(arm, mine, goal) + extra_h
        cost = mine.cost_usd.sum() + extra_usd
        gain = 100 * (best.accuracy - ref_mean)
        best_rows = rows[(rows.arm == arm) & (rows.candidate_id == best.candidate_id)].accuracy
        out.append({"arm": arm, "models": len(mine), "trainings": int(mine.seeds.sum()), "seeds": int(best.seeds),
                    "best_label": best.label, "best_allocation": best.allocation,
                    "best_params": int(best.trainable_params), "best_accuracy": best.accuracy,
                    "best_accuracy_std": best.accuracy_std, "mean_accuracy_of_arm": mine.accuracy.mean(),
                    "gain_vs_uniform_qv_pts": gain if arm != "uniform_qv" else float("nan"),
                    "p_vs_uniform_qv": welch_p(best_rows, reference) if arm != "uniform_qv" else float("nan"),
                    "device_hours": device_hours, "cost_usd": cost, "search_s": extra_s,
                    "hours_to_within_0_5_of_best": reach,
                    "roi_pts_per_usd": gain / cost if arm != "uniform_qv" and cost > 0 else float("nan"),
                    "roi_pts_per_device_hour": gain / device_hours if arm != "uniform_qv" and device_hours > 0 else float("nan"),
                    "beats_majority": bool(best.beats_majority)})
    return pd.DataFrame(out), models


def expected_random(drawn: pd.DataFrame, k: int, ref_mean: float, goal: float) -> dict:
    """Random search judged by its expectation: the best of k over every k-subset of the trained draws, at the
    cost of k models (their mean hours and dollars); `share_of_draw_sets_within_0_5_of_best` is how often one
    draw set reaches the best model of any arm."""
    best = C.best_of_every_k_subset(drawn.accuracy, k)
    hours, cost = k * drawn.device_hours.mean(), k * drawn.cost_usd.mean()
    gain = 100 * (best.mean() - ref_mean)
    return {"arm": "random search", "models": k, "trainings": int(k * drawn.seeds.mean()), "seeds": int(drawn.seeds.min()),
            "best_label": f"expected best of {k} (every {k} of {len(drawn)} draws)", "best_allocation": "",
            "best_params": int(drawn.trainable_params.mean()), "best_accuracy": best.mean(),
            "best_accuracy_std": float("nan"), "mean_accuracy_of_arm": drawn.accuracy.mean(),
            "gain_vs_uniform_qv_pts": gain, "p_vs_uniform_qv": float("nan"), "device_hours": hours, "cost_usd": cost,
            "search_s": 0.0, "hours_to_within_0_5_of_best": float("nan"),
            "roi_pts_per_usd": gain / cost if cost > 0 else float("nan"),
            "roi_pts_per_device_hour": gain / hours if hours > 0 else float("nan"), "beats_majority": bool(drawn.beats_majority.all()),
            "share_of_draw_sets_within_0_5_of_best": float(np.mean(best >= goal - C.WITHIN_PTS / 100)),
            "draw_sets": len(best)}


def random_odds(arm: str, a: pd.DataFrame, models: pd.DataFrame) -> str:
    """With --random-draws: how often one set of k random draws does at least as well as the search arm."""
    drawn = models[models.arm == "random search"]
    k = int(a.loc["random search", "models"])
    if len(drawn) <= k:
        return ""
    best = C.best_of_every_k_subset(drawn.accuracy, k)
    share = float(np.mean(best >= a.loc[arm, "best_accuracy"]))
    return (f" against the expectation over {len(best)} draw sets of {k} (their best: {100 * best.min():.1f}–"
            f"{100 * best.max():.1f}%); {100 * share:.0f}% of them reach {arm}'s best")


def markdown(arms, models, log, ctx, args, tables, runs_root: Path) -> str:
    command = C.invoked_command(__file__)  # as invoked: --arms, --random-draws…
    lines = ["# Search quality at equal budget: 20 Newsgroups, 9,216 LoRA params", "",
             f"Command: `{command}` · {time.strftime('%Y-%m-%d %H:%M')}", "",
             C.context_line(ctx) + ".", "", C.NOISE_NOTE, ""]
    task = None
    for name in ("lora-search", "random", "calibrated"):
        if log.get(name, {}).get("status", "").startswith("ok"):
            info = json.loads((Path(log[name]["run_dir"]) / "run.json").read_text())
            task = info.get("task")
            break
    if args.quick:
        lines += ["**--quick is a smoke-sized version**: 300 train / 200 eval examples, max_length 64, one seed, k = 1, "
                  "one epoch (10 optimizer steps), two module types (value, FFN-up; two calibration runs), proxies on 2 minibatches, "
                  "100 candidates screened (4 Tune trials × 25), uniform_qv the only "
                  "baseline (uniform_all and AdaLoRA train in the full mode). It checks that every arm runs end to end through the product and "
                  "shows the cost columns; its accuracies say nothing about which arm is better (one seed, models "
                  "near the majority class). The full mode (3 seeds, 2,000 train) is the measurement.", ""]
    if task:
        lines += [f"Task: {task.get('train_examples')} train / {task.get('eval_examples')} eval examples, "
                  f"{len(task.get('labels', []))} classes, majority-class rate {task.get('majority_rate')}; "
                  f"data sample (split_seed) {0 if args.split_seed is None else args.split_seed}; seeds {args.seeds}; "
                  f"k = {args.survivors} trained models per search arm.", ""]
    lines += ["## Arms", ""]
    missing = [arm for arm in SEARCH_ARMS + baselines(args) if arms.empty or arm not in set(arms.arm)]
    if missing:
        lines += [f"Not trained in this invocation (see Runs below): {', '.join(missing)}.", ""]
    if arms.empty:
        lines += ["No arm finished: see the run log below.", ""]
    else:
        shown = arms.assign(best_accuracy=[f"{100 * m:.1f}" + ("" if math.isnan(s) else f" ± {100 * s:.1f}")
                                           for m, s in zip(arms.best_accuracy, arms.best_accuracy_std)],
                            mean_accuracy_of_arm=(100 * arms.mean_accuracy_of_arm).round(1))
        shown = shown[["arm", "models", "trainings", "best_label", "best_params", "best_accuracy", "mean_accuracy_of_arm",
                       "gain_vs_uniform_qv_pts", "p_vs_uniform_qv", "device_hours", "hours_to_within_0_5_of_best",
                       "cost_usd", "roi_pts_per_usd",
                       "roi_pts_per_device_hour", "beats_majority"]]
        lines += [C.md_table(shown, blank_missing=True), "",
                  "Accuracies in %, mean ± std over seeds of the arm's best model (best by mean accuracy on the eval "
                  "split); `gain` in points over uniform_qv's mean; ROI = gain / cost (USD, or device-hours). Cost = "
                  "the arm's training rows (device-hours × price, CPU $0.0446 per vCPU-hour) + the proxy probe for "
                  "both lora-search arms + the calibration trainings for the calibrated one. hours_to_within_0_5_of_best = "
                  "device-hours the arm spends (its probe and calibration, then its models in screen "
                  "order; random search: the mean over every order of its draws) until "
                  "a model is within 0.5 point of the best model of any arm; blank if none is. "
                  "p = Welch t-test over seeds (blank with one seed). uniform_all puts r=1 on every "
                  "Linear: the smallest rank already exceeds the band, so it trains more parameters (best_params).", ""]
        if "draw_sets" in arms and arms.draw_sets.notna().any():
            lines += [f"random search is judged by its expectation (`--random-draws {args.random_draws}`): its best_accuracy "
                      f"is the mean, over all {int(arms.draw_sets.max())} sets of k of the trained draws, of the set's best "
                      "model; its cost is k models' mean; in "
                      f"{100 * arms.set_index('arm').loc['random search', 'share_of_draw_sets_within_0_5_of_best']:.0f}% "
                      "of the sets the best is within 0.5 point of the best model of any arm.", ""]
        verdict = []
        a = arms.set_index("arm")
        for arm in ("lora-search", "lora-search (calibrated)"):
            if {arm, "uniform_qv"} <= set(a.index):
                g, pv = a.loc[arm, ["gain_vs_uniform_qv_pts", "p_vs_uniform_qv"]]
                outcome = ("beats it" if g > 0 else "loses to it") if pv < 0.05 else f"no difference beyond seed noise, p = {pv:.2f}"
                verdict.append(f"{arm} vs uniform_qv: {g:+.1f} points ({outcome if pv == pv else 'one seed: no claim'}); "
                               "target +1.6 points (HeteroLoRA): " + ("met" if g >= 1.6 and pv < 0.05 else "not met"))
            if {arm, "random search"} <= set(a.index):
                d = 100 * (a.loc[arm, "best_accuracy"] - a.loc["random search", "best_accuracy"])
                verdict.append(f"{arm} vs random search (same k): {d:+.1f} points" + random_odds(arm, a, models))
        if verdict:
            lines += ["- " + v for v in verdict] + [""]
    if not models.empty:
        m = models.assign(accuracy=[f"{100 * a:.1f}" + ("" if math.isnan(s) else f" ± {100 * s:.1f}")
                                    for a, s in zip(models.accuracy, models.accuracy_std)],
                          allocation=[a if len(a) <= 90 else a[:87] + "…" for a in models.allocation.astype(str)])
        lines += ["## Every trained model", "", C.md_table(m[["arm", "label", "trainable_params", "accuracy", "seeds",
                                                               "device_hours", "beats_majority", "allocation"]],
                                                            blank_missing=True), ""]
    lines += ["## Runs", ""]
    for name, entry in log.items():
        lines.append(f"- {name}: {entry['status']}, wall {entry['wall_s']:.0f} s, "
                     f"`{Path(entry['run_dir']).relative_to(C.ROOT) if Path(entry['run_dir']).is_relative_to(C.ROOT) else entry['run_dir']}`"
                     " (report.md there)")
    lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        main()
    except UserError as error:
        print(f"search_quality: {error}", file=sys.stderr)
        raise SystemExit(2) from None
