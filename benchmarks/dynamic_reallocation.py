"""Static vs dynamic re-allocation (HeteroLoRA's dynamic variant): accuracy, parameters, memory, latency, cost.

What it measures, on Rotten Tomatoes with search_spaces/heterolora_dynamic.yaml as shipped (the budget of q,v
at r8, 73,728 LoRA params ±5%; 4,000 train / 1,000 eval, max_length 64, 1 epoch, lr 2e-3), on the packaged
MiniLM-L6: the screen's best allocation trained three ways through the product, beside uniform q,v r8:

- static: the allocation as screened;
- dynamic, damped (the shipped default: `train.dynamic_max_move` 0.25, `train.dynamic_min_gain` 0.05): every
  0.2 epoch the masked adapters' accumulated grad_norm goes to knapsack, and rank moves under the same budget
  only when the move is small enough and better enough;
- dynamic, undamped (`dynamic_max_move=1 dynamic_min_gain=0`): every proposed re-allocation is taken.

Run 1 is the product's own run (`orchestrator.pipeline.run`: probe, screen, then static + damped + uniform q,v);
run 2 trains the same dynamic jobs again with the undamped settings through `run_training` (its static model
would be the very same training again). Each row of the table: accuracy and macro-F1 (mean ± std over seeds,
Welch p against static), the LoRA parameters the model keeps at the end and those it trains (a dynamic model
carries rank max(space.ranks) on every module, masked down to its allocation), re-allocations moved / held and
the rank moved (Σ|Δr|), peak training memory (the Train worker's RSS, MiB), eval latency per batch of 64 (a
dynamic model is timed with its masked full-rank adapter), training wall time and device-hours.

Presets: --quick: 300 train / 200 eval, the probe on 2 minibatches, seed 0 (3 + 1 trainings, ~3 min);
full: the space as shipped, seeds 0 1 2 (9 + 3 trainings, ~25 min on 2 cores).
Target: none in numbers; dynamic re-allocation earns its place if it beats static at equal kept parameters.

Run (from the repository root):
    python benchmarks/dynamic_reallocation.py --quick
    python benchmarks/dynamic_reallocation.py
Writes results/benchmarks/dynamic_reallocation.{csv,md} (--quick: in results/benchmarks/quick/; --out changes
the folder); the runs stay in results/benchmarks/dynamic_reallocation_runs/<quick|full>/{damped,undamped}/.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import fields
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

SPACE = C.ROOT / "search_spaces" / "heterolora_dynamic.yaml"
UNDAMPED = ["train.dynamic_max_move=1", "train.dynamic_min_gain=0"]
STATIC, DAMPED, UNDAMPED_NAME, BASELINE = "static", "dynamic, damped (default)", "dynamic, undamped", "uniform q,v"
ORDER = [STATIC, DAMPED, UNDAMPED_NAME, BASELINE]  # the table's rows
NUMBERS = ["seed", "accuracy", "f1", "trainable_params", "trained_params", "reallocations", "held_reallocations", "moved_rank",
           "peak_memory_mb", "latency_ms_per_batch", "train_wall_s", "device_hours"]  # a static model has no re-allocations
KEPT = ["status", *NUMBERS, "final_allocation"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="300 train / 200 eval, probe on 2 minibatches, seed 0")
    parser.add_argument("--seeds", type=int, nargs="+", help="train.seeds (default 0 1 2; quick 0)")
    C.add_out_argument(parser)
    args = parser.parse_args()
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    return args


def overrides(args, runs_root: Path, name: str) -> list[str]:
    return C.run_overrides(runs_root.resolve(), args.seeds, args.quick) + [f"name={name}", "register.best=false"]


def variant(trial: dict) -> str:
    """A run-1 training's variant: the baseline, the static survivor or its damped dynamic twin."""
    if trial["kind"] == "baseline":
        return BASELINE
    return DAMPED if trial["method"] == "dynamic" else STATIC


def rows_of(trials: dict[str, dict], name_of) -> list[dict]:
    return [{"variant": name_of(t), **{k: t.get(k) for k in KEPT}} for t in trials.values()]


def train_damped(args, runs_root: Path) -> Path:
    """Run 1: the product's run of the space (screen, static, damped dynamic, uniform q,v)."""
    from orchestrator.config import load_config
    from orchestrator.pipeline import run

    cfg = load_config(SPACE, overrides(args, runs_root, "damped"))
    run(cfg)
    return Path(cfg.run_dir)


def train_undamped(args, runs_root: Path, damped_run: Path) -> Path:
    """Run 2: run 1's dynamic jobs again (same allocation, seeds and ids), undamped."""
    from orchestrator import pipeline
    from orchestrator.config import load_config
    from orchestrator.data import load_task
    from orchestrator.train import TrainJob, finished_jobs, run_training

    cfg = load_config(SPACE, overrides(args, runs_root, "undamped") + UNDAMPED)
    names = [f.name for f in fields(TrainJob)]
    jobs = [TrainJob(**{k: t[k] for k in names}) for t in finished_jobs(damped_run).values() if t["method"] == "dynamic"]
    pipeline.prepare_run_dir(cfg, resume=False)
    pipeline.write_run_json(cfg, command="benchmarks/dynamic_reallocation.py")
    run_training(cfg, load_task(cfg.data), jobs)
    return Path(cfg.run_dir)


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per variant (completed trainings only, in ORDER): means over seeds, the std of accuracy, the gain
    over static in points and its Welch p."""
    from orchestrator.report import welch_p

    done = rows[rows.status == "completed"].copy()
    done[NUMBERS] = done[NUMBERS].apply(pd.to_numeric)  # None (a static model's re-allocations) → NaN
    static = done[done.variant == STATIC].accuracy
    table = done.groupby("variant", sort=False).agg(
        seeds=("seed", "nunique"), accuracy=("accuracy", "mean"), accuracy_std=("accuracy", "std"), f1=("f1", "mean"),
        kept_params=("trainable_params", "mean"), trained_params=("trained_params", "mean"),
        reallocations=("reallocations", "mean"), held_reallocations=("held_reallocations", "mean"),
        moved_rank=("moved_rank", "mean"), peak_memory_mb=("peak_memory_mb", "mean"),
        latency_ms_per_batch=("latency_ms_per_batch", "mean"), train_wall_s=("train_wall_s", "mean"),
        device_hours=("device_hours", "sum"))
    table = table.reindex([name for name in ORDER if name in table.index]).reset_index()
    table["vs_static_pts"] = 100 * (table.accuracy - static.mean())
    table["p_vs_static"] = [np.nan if name == STATIC else welch_p(done[done.variant == name].accuracy, static)
                            for name in table.variant]
    return table


def markdown(table: pd.DataFrame, rows: pd.DataFrame, ctx: dict, cmd: str, wall_s: float) -> str:
    def pct(mean, std):
        return f"{100 * mean:.1f}" + ("" if np.isnan(std) else f" ± {100 * std:.1f}")

    def number(value, fmt=",.0f"):
        return "—" if np.isnan(value) else format(value, fmt)

    shown = pd.DataFrame({
        "variant": table.variant, "seeds": table.seeds,
        "accuracy %": [pct(m, s) for m, s in zip(table.accuracy, table.accuracy_std)],
        "vs static (Welch p)": [("—" if v == STATIC else f"{d:+.1f}" + ("" if np.isnan(p) else f" ({p:.2f})"))
                                for v, d, p in zip(table.variant, table.vs_static_pts, table.p_vs_static)],
        "macro-F1 %": [number(100 * f, ".1f") for f in table.f1],
        "kept params": [number(v) for v in table.kept_params], "trained params": [number(v) for v in table.trained_params],
        "re-allocations moved / held": [("—" if np.isnan(m) else f"{m:.1f} / {h:.1f}")
                                        for m, h in zip(table.reallocations, table.held_reallocations)],
        "rank moved Σ\\|Δr\\|": [number(v, ".1f") for v in table.moved_rank],
        "peak train memory MiB": [number(v) for v in table.peak_memory_mb],
        "eval latency ms / batch": [number(v, ".1f") for v in table.latency_ms_per_batch],
        "train wall s": [number(v, ".1f") for v in table.train_wall_s],
        "device-h (all seeds)": [number(v, ".3f") for v in table.device_hours]})
    failed = rows[rows.status != "completed"]
    lines = ["# Static vs dynamic re-allocation (HeteroLoRA dynamic)", "",
             f"Command: `{cmd}` · {time.strftime('%Y-%m-%d %H:%M')} · {wall_s / 60:.1f} min", "",
             C.context_line(ctx) + ".", "", C.NOISE_NOTE, "",
             "The screen's best allocation of `search_spaces/heterolora_dynamic.yaml` trained static, dynamic with the "
             "shipped damping and dynamic undamped, beside uniform q,v at the same budget, through the product "
             "(Ray Tune + Ray Train, 1 thread per training). Accuracy on the eval split, mean ± std over seeds.", "",
             C.md_table(shown, ".4g"), "",
             "- kept params: the LoRA parameters of the allocation the model ends on (a dynamic model's final one); "
             "trained params: what the optimizer updates (a dynamic model carries rank max(space.ranks) on every "
             "module, masked), so its memory and latency are those of the larger adapter.",
             f"- Failed or unfinished trainings: {len(failed)}" + ("" if failed.empty else
                                                                    f" ({', '.join(failed.variant + ' s' + failed.seed.astype(str))})"),
             ""]
    return "\n".join(lines)


def main() -> None:
    args = parse_args()
    ctx, runs_root = C.begin("dynamic_reallocation", args.quick)
    from orchestrator.train import finished_jobs

    C.fresh_runs_root(runs_root)
    started = time.time()
    with C.embedded_ray():
        damped = train_damped(args, runs_root)
        undamped = train_undamped(args, runs_root, damped)
    rows = pd.DataFrame(rows_of(finished_jobs(damped), variant) + rows_of(finished_jobs(undamped), lambda t: UNDAMPED_NAME))
    table = summarise(rows)
    C.write_results(C.out_dir(args), "dynamic_reallocation", rows,
                    markdown(table, rows, ctx, C.invoked_command(__file__), time.time() - started))


if __name__ == "__main__":
    main()
