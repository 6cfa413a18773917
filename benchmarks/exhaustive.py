"""Train every candidate of a small space, and compare with what the proxies would have trained.

What it measures, on 20 Newsgroups at the tight budget (search_spaces/newsgroups_tight_budget.yaml: 9,216
LoRA params ±5%, DESIGN §9.1), on the packaged MiniLM-L6, with the product's own parts:

- the small space: 12 structured allocations inside the band — every pair of attention types
  (query, key, value, attention.output.dense) at r=1 on all 6 layers (6; one of them is uniform q,v),
  every single attention type at r=2 on all 6 layers (4), and FFN-up (intermediate.dense) at r=1 on
  layers 0-4 and on layers 1-5 (2, 9,600 params each);
- train-every-candidate: all 12 trained through `orchestrator.train.run_training` (Ray Tune + Ray
  Train, the shipped training settings), each over the seeds; the exhaustive best is the model with
  the best mean accuracy;
- lora-search on that space: the product's proxy probe (`pipeline.module_scores`, the shipped proxies)
  scores all 12 exactly as the screen scores candidates (`ModuleScores.scores`); the top k by the
  shipped `rank_by`/`direction` (grad_norm, minimised) are the ones it would train. Training repeats
  bit for bit per seed on one machine (README "Reproducibility"), so the arm reuses those k models'
  trainings instead of training them twice. Every other proxy's pick (both directions) is shown beside it;
- lora-search (calibrated): the product's calibration (`pipeline.calibrated_scores`, the `calibrate`
  defaults: one training per module type of this space with the run's recipe) scores all 12 by
  `calibrated`, and the top k by it (maximised) are the ones it would train; its cost adds the
  calibration runs to the probe;
- random k: the expected best of k models drawn at random from the 12 (exact, over all subsets).

Per arm: best accuracy, gap to the exhaustive best, device-hours (training rows, plus the probe for
the proxy arms and the calibration runs for the calibrated one) as a share of train-every-candidate's,
and the device-hours it takes to reach a model within 0.5 point of the exhaustive best when candidates
are trained in the arm's order (train every candidate and random: the exact mean over every order; exact ties
in a proxy's score: the mean over the orders of the tied candidates, and a tie across the k-th place makes the
arm the mean over which of them it trains).

Target (issue #12): within 0.5 point of the exhaustive best in ≤ 20% of its device-hours.

Run (from the repository root):
    python benchmarks/exhaustive.py --quick    # 2 of the 12 (q+v r1, ffn_up L0-4 r1), k = 1, 300 train / 200 eval, max_length 64, seed 0,
                                               # proxies on 2 minibatches, calibration of value and FFN-up only (a smoke test)
    python benchmarks/exhaustive.py            # the shipped data, seeds 0 1 2 (36 trainings + 5 calibration runs, 60–92 min on 2 cores: 2026-12-04, 2026-12-03)
    python benchmarks/exhaustive.py --resume   # go on after an interruption: finished trainings are kept
    python benchmarks/exhaustive.py --lr 8e-3 --out results/benchmarks/exhaustive-lr8e-3   # at another learning rate
                                               # (at 8e-3 no allocation beats uniform q,v r1 by more than 0.6: README, Benchmarks)
Writes results/benchmarks/exhaustive.{csv,md,png} (--quick: in results/benchmarks/quick/; --out changes the
folder); the run (trials, adapters, module_scores.json) stays in
results/benchmarks/exhaustive_runs/<quick|full>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import math
import shutil
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from orchestrator.config import CALIBRATED  # noqa: E402  (a constant: no model library is imported)

SPACE = C.ROOT / "search_spaces" / "newsgroups_tight_budget.yaml"
ATTENTION = ("query", "key", "value", "attention.output.dense")
SHORT = {"query": "q", "key": "k", "value": "v", "attention.output.dense": "o"}
TARGET_SHARE = 0.20
UNIFORM_QV = "q+v r1"
QUICK_LABELS = (UNIFORM_QV, "ffn_up L0-4 r1")  # the habit and the place §9.1 found best: one round of 2 trainings
TYPES = (*ATTENTION, "intermediate.dense")  # the module types the 12 use: what the calibration trains, one run each
QUICK_TYPES = ("value", "intermediate.dense")  # one round of 2 calibration runs; query scores 0, as in search_quality's quick


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 of the 12 allocations (q+v r1, ffn_up L0-4 r1), k = 1, 300 train / 200 eval, max_length 64, seed 0")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--survivors", type=int, help="k: models a proxy arm trains (default 2; quick 1)")
    parser.add_argument("--resume", action="store_true", help="keep the earlier run's finished trainings")
    parser.add_argument("--lr", type=float, help="train.lr instead of the space's 2e-3 (needs --out: the default "
                                                 "folder holds the space's tables)")
    C.add_out_argument(parser)
    args = parser.parse_args()
    if args.lr is not None and args.out is None:
        parser.error("--lr needs --out, e.g. --out results/benchmarks/exhaustive-lr8e-3")
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.survivors = args.survivors or (1 if args.quick else 2)
    return args


def small_space(modules, quick: bool) -> dict[str, object]:
    """label → Allocation: the 12 structured allocations named in the header (--quick: QUICK_LABELS of them)."""
    from orchestrator.allocation import Allocation, uniform

    found = {}
    for a, b in itertools.combinations(ATTENTION, 2):
        found[f"{SHORT[a]}+{SHORT[b]} r1"] = uniform(modules, (a, b), 1)
    for kind in ATTENTION:
        found[f"{SHORT[kind]} r2"] = uniform(modules, (kind,), 2)
    for first, last in ((0, 4), (1, 5)):
        found[f"ffn_up L{first}-{last} r1"] = Allocation.from_ranks(
            {m.name: 1 for m in modules if m.type == "intermediate.dense" and first <= m.layer <= last})
    return {label: found[label] for label in QUICK_LABELS} if quick else found


def module_types(quick: bool) -> tuple[str, ...]:
    """The run's space: the calibration trains one run per type (the full space's types; two of them in --quick)."""
    return QUICK_TYPES if quick else TYPES


def run_setup(args, runs_root: Path) -> tuple[Path, list[str]]:
    """The runs folder (one per --lr, so the space's run stays resumable) and the config overrides."""
    if args.lr is not None:
        runs_root = runs_root.with_name(f"{runs_root.name}-lr{args.lr:g}")
    overrides = C.run_overrides(runs_root.resolve(), args.seeds, args.quick) + [
        "name=exhaustive", "train.baselines=[]", f"space.module_types=[{','.join(module_types(args.quick))}]"]
    return runs_root, overrides + [f"train.lr={args.lr}"] * (args.lr is not None)


def train_all(cfg, task, modules, budget, space: dict, resume: bool):
    """Probe and calibration scores, and every allocation × seed trained through the product; returns
    (scores, trials, calibration device-hours)."""
    import ray

    from orchestrator import calibrate, pipeline
    from orchestrator.train import TrainJob, run_training

    pipeline.prepare_run_dir(cfg, resume)
    pipeline.write_run_json(cfg, command="benchmarks/exhaustive.py", allocations=len(space))
    pipeline.init_ray(None)
    try:
        scores = pipeline.calibrated_scores(cfg, task, modules, budget, pipeline.module_scores(cfg, task, modules))
        # seed-major: an interrupted run has whole seeds, which `--resume --seeds …` can report on
        jobs = [TrainJob(a.candidate_id, "searched", label, a.as_dict(), seed)
                for seed in cfg.train.seeds for label, a in space.items()]
        trials = run_training(cfg, task, jobs)
    finally:
        ray.shutdown()
    calibration_hours = calibrate.summary(pd.read_csv(cfg.run_dir / calibrate.TABLE))["device_hours"]
    return scores, trials, calibration_hours


def model_table(space: dict, scores, trials: dict, modules, seeds: list[int]) -> pd.DataFrame:
    rows = []
    for label, allocation in space.items():
        done = [t for t in trials.values() if t["candidate_id"] == allocation.candidate_id and t.get("status") == "completed"
                and t["seed"] in seeds]
        if not done:
            continue
        accuracy = [t["accuracy"] for t in done]
        rows.append({"label": label, "candidate_id": allocation.candidate_id,
                     "trainable_params": allocation.trainable_params(modules),
                     "accuracy": float(np.mean(accuracy)), "accuracy_std": float(np.std(accuracy, ddof=1)) if len(done) > 1 else float("nan"),
                     "seeds": len(done), "device_hours": float(sum(t["device_hours"] for t in done)),
                     **{f"proxy_{name}": value for name, value in scores.scores(allocation).items()}})
    return pd.DataFrame(rows)


def ranking(models: pd.DataFrame, column: str, direction: str) -> tuple[pd.DataFrame, np.ndarray]:
    """The models in an arm's training order, best score first, and their sort keys: exact ties share a key, and
    which of them comes first is averaged over (top_k, C.expected_hours_to_reach), never the order of small_space."""
    key = (-1.0 if direction == "maximize" else 1.0) * models[column].to_numpy(float)
    order = np.argsort(key, kind="stable")
    return models.iloc[order], key[order]


def top_k(ranked: pd.DataFrame, key: np.ndarray, k: int) -> dict:
    """The arm's top k. A tie across the k-th place is no pick: the arm is the expectation over which r of the n tied
    models it trains (the best over every r-subset, r times their mean hours); `tied_at_k` says "r of n"."""
    k = min(k, len(ranked))
    sure, tied = ranked[key < key[k - 1]], ranked[key == key[k - 1]]
    r = k - len(sure)
    if r == len(tied):
        top = ranked.iloc[:k]
        return {"best_label": top.label.iat[int(top.accuracy.argmax())], "best_accuracy": top.accuracy.max(),
                "device_hours": top.device_hours.sum(), "tied_at_k": ""}
    floor = sure.accuracy.max() if len(sure) else -np.inf  # the sure picks' best: the tied ones must beat it to count
    decided = floor >= tied.accuracy.max()
    return {"best_label": sure.label.iat[int(sure.accuracy.argmax())] if decided else f"expected ({r} of {len(tied)} tied)",
            "best_accuracy": float(np.maximum(floor, C.best_of_every_k_subset(tied.accuracy, r)).mean()),
            "device_hours": sure.device_hours.sum() + r * tied.device_hours.mean(), "tied_at_k": f"{r} of {len(tied)}"}


def arms(models: pd.DataFrame, k: int, probe_hours: float, shipped: tuple[str, str],
         calibration_hours: float = 0.0) -> pd.DataFrame:
    """One row per arm: train every candidate, each proxy in each direction (top k; `calibrated` maximised only, at
    the probe's + the calibration's hours), uniform q,v, random k (expected)."""
    goal = models.accuracy.max()
    near = goal - C.WITHIN_PTS / 100
    any_order = C.expected_hours_to_reach(models.accuracy, models.device_hours, goal)
    rows = [{"arm": "train every candidate", "trains": len(models), "best_label": models.label.iat[int(models.accuracy.argmax())],
             "best_accuracy": goal, "device_hours": models.device_hours.sum(), "hours_to_within": any_order}]
    proxies = sorted(c.removeprefix("proxy_") for c in models.columns if c.startswith("proxy_"))
    for proxy, direction in itertools.product(proxies, ("maximize", "minimize")):
        if proxy == CALIBRATED and direction == "minimize":  # measured accuracy gains: only more is better
            continue
        ranked, key = ranking(models, f"proxy_{proxy}", direction)
        top = top_k(ranked, key, k)
        scoring_hours = probe_hours + (calibration_hours if proxy == CALIBRATED else 0.0)
        name = f"lora-search ({proxy}, {direction})" + (" — as shipped" if (proxy, direction) == shipped else "")
        reach = C.expected_hours_to_reach(ranked.accuracy, ranked.device_hours, goal, key)
        rows.append({"arm": name, "trains": k, **top, "device_hours": top["device_hours"] + scoring_hours,
                     "hours_to_within": reach + scoring_hours})
    qv = models[models.label == UNIFORM_QV]
    if not qv.empty:  # the hand-picked default, trained as one of the 12
        rows.append({"arm": "uniform_qv (q+v r1)", "trains": 1, "best_label": UNIFORM_QV, "best_accuracy": qv.accuracy.iat[0],
                     "device_hours": qv.device_hours.iat[0],
                     "hours_to_within": C.hours_to_reach(qv.accuracy, qv.device_hours, goal)})
    subsets = C.best_of_every_k_subset(models.accuracy, k)
    rows.append({"arm": f"random {k} (expected)", "trains": k, "best_label": "—", "best_accuracy": float(np.mean(subsets)),
                 "device_hours": k * models.device_hours.mean(), "hours_to_within": any_order,
                 "p_within": float(np.mean([b >= near for b in subsets]))})
    table = pd.DataFrame(rows)
    table["gap_pts"] = 100 * (table.best_accuracy - goal)
    table["within_0_5"] = table.best_accuracy >= near
    table["share_of_exhaustive_hours"] = table.device_hours / models.device_hours.sum()
    table["meets_target"] = table.within_0_5 & (table.share_of_exhaustive_hours <= TARGET_SHARE)
    return table


def plot(models: pd.DataFrame, shipped: tuple[str, str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    proxy, direction = shipped
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    ax.errorbar(models[f"proxy_{proxy}"], 100 * models.accuracy, yerr=100 * models.accuracy_std.fillna(0),
                fmt="o", capsize=3)
    for row in models.itertuples():
        ax.annotate(row.label, (getattr(row, f"proxy_{proxy}"), 100 * row.accuracy), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")
    ax.axhline(100 * models.accuracy.max() - C.WITHIN_PTS, color="grey", ls="--", lw=0.8,
               label=f"within {C.WITHIN_PTS} pt of the exhaustive best")
    ax.set_xlabel(f"{proxy} score (the screen {direction}s it)")
    ax.set_ylabel("eval accuracy, % (mean ± std over seeds)")
    ax.set_title("20 Newsgroups, 9.2k LoRA params: every candidate of the small space")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def markdown(table: pd.DataFrame, models: pd.DataFrame, ctx: dict, args, task_line: str, probe_s: float) -> str:
    picks = {"the shipped proxy": table[table.arm.str.endswith("as shipped")].iloc[0],
             "the calibration": table[table.arm.str.startswith(f"lora-search ({CALIBRATED},")].iloc[0]}
    verdicts = [f"- **{'MET' if row.meets_target else 'MISSED'}**: {who}'s top {args.survivors} reach "
                f"{100 * row.best_accuracy:.1f}% ({row.gap_pts:+.1f} points from the exhaustive best) in "
                f"{100 * row.share_of_exhaustive_hours:.1f}% of its device-hours (target: within {C.WITHIN_PTS} point in "
                f"≤ {100 * TARGET_SHARE:.0f}%)." for who, row in picks.items()]
    shown = table.assign(best_accuracy=(100 * table.best_accuracy).round(2))
    m = models.assign(accuracy=[f"{100 * a:.1f}" + ("" if math.isnan(s) else f" ± {100 * s:.1f}")
                                for a, s in zip(models.accuracy, models.accuracy_std)]).drop(columns=["accuracy_std"])
    return "\n".join([
        "# Train every candidate vs the proxies' pick: 20 Newsgroups, 9,216 LoRA params", "",
        f"Command: `{C.invoked_command(__file__)}` · {time.strftime('%Y-%m-%d %H:%M')}", "",  # as invoked: --survivors…
        C.context_line(ctx) + ".", "", C.NOISE_NOTE, "",
        f"{task_line}; {len(models)} structured allocations (header of the script), seeds {args.seeds}, k = {args.survivors}; "
        f"one proxy probe ({probe_s:.0f} s, all proxies) and one calibration run per module type ({len(module_types(args.quick))}) "
        "score all of them.", "", *verdicts, "",
        "## Arms", "", C.md_table(shown, blank_missing=True), "",
        "best_accuracy in % (mean over seeds of the arm's best model); gap in points to the exhaustive best; device-hours = "
        "training rows (+ the probe for proxy arms, + the calibration runs for the calibrated one); hours_to_within = device-hours until the first model within "
        f"{C.WITHIN_PTS} point of the exhaustive best when the arm trains candidates in its order (train every candidate "
        "and random: the exact mean over every order); p_within = chance a random k-subset holds such a model. "
        "Exact ties in a proxy's score are trained in a random order: hours_to_within is the mean over the orders of each "
        "tied group, and a tie across the k-th place (tied_at_k: r of n tied trained) makes the arm the mean over which "
        "r it trains (best_accuracy, device-hours; best_label \"expected\" when the tie decides it). "
        "`params` is a floor, not a proxy of placement: it orders candidates by parameter count alone, and the band "
        "lets the two FFN-up allocations use 9,600 parameters against 9,216 for the others. Device-hours are wall "
        "times under a load that changed during the run: compare them loosely.", "",
        "## Every candidate", "", C.md_table(m, blank_missing=True), "",
        "![accuracy vs the shipped proxy](exhaustive.png)", ""])


def main() -> None:
    args = parse_args()
    ctx, runs_root = C.begin("exhaustive", args.quick)  # before the imports: it sets HF_HUB_OFFLINE
    runs_root, overrides = run_setup(args, runs_root)
    from orchestrator.allocators import make_budget
    from orchestrator.config import load_config
    from orchestrator.data import load_task, task_summary
    from orchestrator.models import adaptable_modules, load_model

    if runs_root.exists() and not args.resume:
        shutil.rmtree(runs_root)  # this script's own earlier run
    cfg = load_config(SPACE, overrides)
    task = load_task(cfg.data)
    modules = adaptable_modules(load_model(cfg.model.name, task.num_labels))
    space = small_space(modules, args.quick)
    budget = make_budget(modules, cfg.space)
    off = {label: a.trainable_params(modules) for label, a in space.items()
           if not budget.low <= a.trainable_params(modules) <= budget.high}
    if off:
        raise SystemExit(f"exhaustive: {off} fall outside the budget band [{budget.low}, {budget.high}]")
    scores, trials, calibration_hours = train_all(cfg, task, modules, budget, space, args.resume)
    models = model_table(space, scores, trials, modules, args.seeds)
    shipped = (cfg.screen.rank_by, cfg.screen.direction)
    probe_s = C.probe_seconds(dataclasses.asdict(scores))  # the screen computes every listed proxy at once
    table = arms(models, args.survivors, probe_s / 3600, shipped, calibration_hours)
    summary = task_summary(task)
    task_line = (f"Task: {summary['train_examples']} train / {summary['eval_examples']} eval examples, "
                 f"{len(summary['labels'])} classes, max_length {cfg.model.max_length}")
    out = C.out_dir(args)
    C.write_csv(out / "exhaustive.csv", table)
    C.write_csv(out / "exhaustive_models.csv", models)
    plot(models, shipped, out / "exhaustive.png")
    C.write_text(out / "exhaustive.md", markdown(table, models, ctx, args, task_line, probe_s))
    print((out / "exhaustive.md").read_text())


if __name__ == "__main__":
    main()
