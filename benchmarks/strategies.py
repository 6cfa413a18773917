"""Search strategies at equal budget: every allocator's best candidate, trained side by side.

What it measures, on the quickstart's task and space (search_spaces/quickstart.yaml: Rotten Tomatoes,
73,728 LoRA params ±5%, all six module types, ranks 2-16): one proxy probe (grad_norm + params, as the
space says), then each strategy proposes candidates from the same per-module scores and its best
candidate by the space's rank_by/direction is trained, all in one Ray Tune run through the product's
own `run_training` (the uniform q,v baseline beside them):

- optuna (TPE over allocation distributions, the product's default, through Ray Tune + OptunaSearch),
- top_p (HeteroLoRA static), proportional, knapsack (exact best summed score),
- random (the control): its first draw, trained as drawn (a random screen's survivors are its first draws).
  Before 2026-12-07 it was the best of 200 random draws by the proxy, i.e. random proposals + proxy selection
  (the stored table of 12-06 has that row).

Per strategy: its trained candidate's allocation, exact params, accuracy and macro-F1 (mean ± std over
seeds), its proxy score (which picked it, except for random), and the training's device-hours. The winner
of one seed is noise-level on this task (DESIGN §9.1: Rotten Tomatoes is too easy for placement to matter):
read the spread.

Run (from the repository root):
    python benchmarks/strategies.py --quick     # 300 train / 200 eval, seed 0, optuna/knapsack/random: a smoke test
    python benchmarks/strategies.py             # the space's 4,000 / 1,000, seeds 0 1 2
Writes results/benchmarks/strategies.{csv,md} (--quick: in results/benchmarks/quick/; --out changes the
folder); the run itself stays in results/benchmarks/strategies_runs/<quick|full>/.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

SPACE = C.ROOT / "search_spaces" / "quickstart.yaml"
STRATEGIES = ["optuna", "top_p", "proportional", "knapsack", "random"]
QUICK_STRATEGIES = ["optuna", "knapsack", "random"]  # the default, the exact optimum and the control: 4 trainings, not 6


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help=f"300 train / 200 eval, seed 0, {'/'.join(QUICK_STRATEGIES)} "
                        "(a smoke test)")
    parser.add_argument("--seeds", type=int, nargs="+")
    C.add_out_argument(parser)
    args = parser.parse_args()
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.strategies = QUICK_STRATEGIES if args.quick else STRATEGIES
    return args


def best_candidates(cfg, task, strategies: list[str]) -> dict[str, tuple]:
    """strategy → (allocation, its rank_by score), each from the same probe scores and budget."""
    from orchestrator.allocation import Allocation, searchable_units
    from orchestrator.allocators import make_budget, space_modules
    from orchestrator.models import adaptable_modules, load_model
    from orchestrator.pipeline import module_scores
    from orchestrator.screen import ScreenContext

    base = load_model(cfg.model.name, task.num_labels)
    modules = searchable_units(base, adaptable_modules(base), cfg.space.shortcuts)
    scores = module_scores(cfg, task, modules)
    sign = 1.0 if cfg.screen.direction == "maximize" else -1.0
    context = ScreenContext(space_modules(modules, cfg.space), cfg.space.ranks, make_budget(modules, cfg.space), scores,
                            cfg.screen.candidates_per_trial, cfg.screen.rank_by, sign, cfg.screen.seed)
    chosen = {}
    for strategy in strategies:
        top, screened = screened_best(cfg, context, strategy)
        chosen[strategy] = (Allocation.from_compact(top.allocation, modules), float(top[f"proxy_{cfg.screen.rank_by}"]),
                            screened)
    return chosen, modules, make_budget(modules, cfg.space)


def screened_best(cfg, context, strategy: str) -> tuple[pd.Series, int]:
    """The screen row `strategy` trains, and how many candidates it screened (the control's survivor is its first
    draw: a random screen picks by no score)."""
    from orchestrator.screen import run_screen

    screen = cfg.screen
    cfg.screen = dataclasses.replace(screen, allocator=strategy)
    try:
        table = run_screen(cfg, context)
    finally:
        cfg.screen = screen
    return table[table.survivor].iloc[0], len(table)


def main() -> None:
    args = parse_args()
    ctx, runs_root = C.begin("strategies", args.quick)
    import ray

    from orchestrator.allocators import baseline_allocations
    from orchestrator.config import load_config
    from orchestrator.data import load_task
    from orchestrator.pipeline import init_ray, prepare_run_dir, write_run_json
    from orchestrator.train import TrainJob, run_training

    C.fresh_runs_root(runs_root)  # this preset's own earlier run: --quick leaves the full run's alone
    seeds = ",".join(map(str, args.seeds))
    overrides = [f"results_dir={runs_root}", "name=strategies", f"train.seeds=[{seeds}]", "train.max_concurrent=2",
                 "train.use_gpu=false", "screen.survivors=1", "register.best=false"]
    if args.quick:
        overrides += ["data.train_size=300", "data.eval_size=200"]  # 1 epoch of 300 learns nothing: a smoke test
    cfg = load_config(SPACE, overrides)
    task = load_task(cfg.data)
    prepare_run_dir(cfg, resume=False)
    write_run_json(cfg, command=C.invoked_command(__file__))
    started = time.time()
    init_ray(None)
    try:
        chosen, modules, budget = best_candidates(cfg, task, args.strategies)
        jobs = [TrainJob(a.candidate_id, "searched", name, a.as_dict(), seed)
                for name, (a, _, _) in chosen.items() for seed in args.seeds]
        qv = baseline_allocations(modules, budget, ["uniform_qv"])["uniform_qv"]
        jobs += [TrainJob(qv.candidate_id, "baseline", "uniform_qv", qv.as_dict(), seed) for seed in args.seeds]
        trials = run_training(cfg, task, list({j.job_id: j for j in jobs}.values()))
    finally:
        ray.shutdown()
    wall = time.time() - started
    table = summarise(chosen, qv, trials, modules, cfg)
    write(table, args, ctx, wall, task, cfg)


def summarise(chosen: dict, qv, trials: dict, modules, cfg) -> pd.DataFrame:
    rows = []
    entries = [(name, a, score, n) for name, (a, score, n) in chosen.items()] + [("uniform_qv (baseline)", qv, np.nan, 0)]
    for name, allocation, score, screened in entries:
        done = [t for t in trials.values() if t["candidate_id"] == allocation.candidate_id and t.get("status") == "completed"]
        accuracy = [t["accuracy"] for t in done]
        rows.append({"strategy": name, "candidates_screened": screened, "allocation": allocation.compact(modules),
                     "trainable_params": allocation.trainable_params(modules),
                     f"proxy_{cfg.screen.rank_by}": score, "seeds": len(done),
                     "accuracy_mean": float(np.mean(accuracy)) if done else np.nan,
                     "accuracy_std": float(np.std(accuracy, ddof=1)) if len(done) > 1 else np.nan,
                     "f1_mean": float(np.mean([t["f1"] for t in done])) if done else np.nan,
                     "device_hours": float(np.sum([t["device_hours"] for t in done])) if done else np.nan})
    return pd.DataFrame(rows)


def write(table: pd.DataFrame, args, ctx: dict, wall: float, task, cfg) -> None:
    out = C.out_dir(args)
    C.write_csv(out / "strategies.csv", table)
    shown = table.assign(accuracy=[f"{100 * m:.1f}" + (f" ± {100 * s:.1f}" if s == s else "")
                                   for m, s in zip(table.accuracy_mean, table.accuracy_std)],
                         f1=(100 * table.f1_mean).round(2),
                         allocation=table.allocation.str.slice(0, 90))
    shown = shown[["strategy", "candidates_screened", "trainable_params", f"proxy_{cfg.screen.rank_by}", "seeds",
                   "accuracy", "f1", "device_hours", "allocation"]]
    command = C.invoked_command(__file__)  # as invoked: --seeds…
    text = [f"# Search strategies at equal budget ({cfg.data.task}, {table.trainable_params.iloc[-1]:,} LoRA params ±5%)",
            "", f"Command: `{command}` · {time.strftime('%Y-%m-%d %H:%M')}", "", C.context_line(ctx) + ".", "",
            C.NOISE_NOTE, "",
            f"Task: {len(task.train.texts)} train / {len(task.eval.texts)} eval examples, majority-class rate "
            f"{task.majority_rate():.3f}; seeds {args.seeds}; one probe ({', '.join(cfg.screen.proxies)}), each strategy's "
            f"best candidate by {cfg.screen.rank_by} ({cfg.screen.direction}) trained; {wall / 60:.1f} min in all."
            + (f" --quick: {', '.join(args.strategies)} only (of {', '.join(STRATEGIES)})." if args.quick else ""), "",
            C.md_table(shown), "",
            "Accuracy and F1 in % (mean ± std over seeds). Every strategy scores from the same per-module probe table; "
            "`optuna` screens num_trials × candidates_per_trial draws through Ray Tune, the score-driven allocators "
            "propose that many candidates directly, `random` trains its first draw, neither scored nor picked (the control).", ""]
    C.write_text(out / "strategies.md", "\n".join(text))
    print("\n".join(text), flush=True)


if __name__ == "__main__":
    main()
