"""Screening cost: proxy-screening N candidate allocations vs one training epoch of one candidate.

What it measures (packaged MiniLM-L6, Rotten Tomatoes, the quickstart search space: all six module
types, ranks 2/4/8/16, budget = uniform q,v at r=8 ≈ 74k LoRA params, ±5%):

1. the probe, once: `orchestrator.proxies.score_modules` with proxies grad_norm + params + fisher on
   8 batches of 16 at max_length 64, probe rank 4, 1 thread, on the train split of
   `orchestrator.data.load_task(DataConfig())` (what `lora-search run` does in one Ray task);
2. scoring N = 100, 500, 2000 candidates (--quick: 100, 500, 1000) from those per-module scores,
   (a) through the product path: `orchestrator.screen.run_screen` (Ray Tune + OptunaSearch, study in
       SQLite) with screen.num_trials × candidates_per_trial = N (25 candidates per trial as in the
       shipped spaces: 4, 20, 80 Tune trials; --quick: 100 per trial, so 1, 5, 10 trials, and the
       cost at 25 per trial is projected from the measured per-trial cost), in a temporary results
       directory, after `orchestrator.pipeline.init_ray(None)` and one unreported warm-up screen
       (one trial); the driver's RSS (psutil) is read before and after each N;
   (b) pure arithmetic in the driver: `get_allocator("random").propose(...)` + `ModuleScores.scores`
       per candidate (fastest of 5);
3. one training epoch of one candidate: uniform q,v r=8, batch 32, max_length 64, 1 thread, with the
   plain PEFT loop of benchmarks/_common.py (the Ray Train worker's loop without Ray) on the
   quickstart data (4,000 examples). --quick trains on 500 examples and multiplies the epoch time
   by 8 (the table says so).

Targets: screening 500 candidates (probe + Tune screen) costs less than one epoch (ratio < 1); the
cost grows near-linearly in N (R² of a line through seconds vs N); driver RSS stays flat in N.

Run (from the repository root):
    python benchmarks/screening_cost.py --quick     # epoch on 500 examples ×8, 100 per trial; ~3 min
    python benchmarks/screening_cost.py             # epoch on 4,000 examples
    python benchmarks/screening_cost.py --sizes 100 500 2000 5000 --candidates-per-trial 50
Writes results/benchmarks/screening_cost.{csv,md,png} (--quick: in results/benchmarks/quick/; --out changes
the folder).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

PROXIES = ["grad_norm", "params", "fisher"]
TARGET_RATIO = 1.0


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="epoch on 500 examples, scaled ×8; N up to 1,000")
    parser.add_argument("--sizes", type=int, nargs="+", help="candidate counts N (default 100 500 2000; quick 100 500 1000)")
    parser.add_argument("--candidates-per-trial", type=int,
                        help="candidates per Tune trial (default 25 as the shipped spaces; quick 100: fewer trials)")
    parser.add_argument("--epoch-train-size", type=int, help="examples of the measured epoch (default 4,000; quick 500)")
    parser.add_argument("--eval-size", type=int, help="eval examples after the epoch (default 1,000; quick 200)")
    parser.add_argument("--repeats", type=int, default=5,
                        help="repeats of the arithmetic path; the fastest counts (the least disturbed by other tenants)")
    C.add_out_argument(parser)
    args = parser.parse_args()
    args.sizes = args.sizes or ([100, 500, 1000] if args.quick else [100, 500, 2000])
    args.epoch_train_size = args.epoch_train_size or (500 if args.quick else 4000)
    args.eval_size = args.eval_size or (200 if args.quick else 1000)
    args.candidates_per_trial = args.candidates_per_trial or (100 if args.quick else 25)
    return args


def screen_config(results_dir: str, name: str, num_trials: int, per_trial: int):
    from orchestrator.config import load_config

    return load_config(C.ROOT / "search_spaces" / "quickstart.yaml",
                       [f"name={name}", f"results_dir={results_dir}", f"screen.proxies=[{','.join(PROXIES)}]",
                        "screen.rank_by=grad_norm", "screen.direction=minimize", f"screen.num_trials={num_trials}",
                        f"screen.candidates_per_trial={per_trial}"])


def main() -> None:
    args = parse_args()
    ctx = C.start()
    import torch

    from orchestrator.allocation import searchable_units, uniform
    from orchestrator.allocators import get_allocator, make_budget, space_modules
    from orchestrator.config import DataConfig
    from orchestrator.data import load_task
    from orchestrator.models import adaptable_modules, load_model
    from orchestrator.proxies import score_modules

    torch.set_num_threads(1)
    rows: list[dict] = []

    # ---- the probe, once (what the product runs in one 1-CPU Ray task)
    task = load_task(DataConfig())
    base = load_model("minilm-l6", task.num_labels)
    units = searchable_units(base, adaptable_modules(base), [])
    cfg0 = screen_config("/tmp", "probe", 1, 1)
    searchable = space_modules(units, cfg0.space)
    budget = make_budget(units, cfg0.space)
    s = cfg0.screen
    t0, c0 = time.perf_counter(), time.process_time()
    scores = score_modules("minilm-l6", task.num_labels, task.train, units, PROXIES, probe_rank=s.probe_rank,
                           num_batches=s.proxy_batches, batch_size=s.batch_size, max_length=cfg0.model.max_length, seed=s.seed)
    probe_s, probe_cpu_s = time.perf_counter() - t0, time.process_time() - c0
    print(f"probe: {probe_s:.1f} s ({', '.join(f'{k} {v:.1f} s' for k, v in scores.seconds.items())})", flush=True)
    rows.append({"kind": "probe", "seconds": probe_s, "cpu_seconds": probe_cpu_s, "load_avg": C.load_now(),
                 "note": "score_modules incl. model load; " + ", ".join(f"{k} {v:.2f} s" for k, v in scores.seconds.items())})

    # ---- (b) pure arithmetic: random allocator + Σ rank × unit score
    allocator = get_allocator("random")
    for n in args.sizes:
        times, score_times, distinct = [], [], 0
        for rep in range(args.repeats):
            t0 = time.perf_counter()
            allocations = allocator.propose(scores.unit["grad_norm"], searchable, cfg0.space.ranks, budget, n,
                                            np.random.default_rng(rep), -1.0)
            t1 = time.perf_counter()
            _ = [scores.scores(a) for a in allocations]
            t2 = time.perf_counter()
            times.append(t2 - t0)
            score_times.append(t2 - t1)
            distinct = len(allocations)
        sec = min(times)
        rows.append({"kind": "arithmetic", "n_candidates": n, "distinct_candidates": distinct, "seconds": sec,
                     "seconds_with_probe": sec + probe_s, "ms_per_candidate": 1000 * sec / max(distinct, 1),
                     "load_avg": C.load_now(),
                     "note": f"fastest of {args.repeats} (median {1000 * statistics.median(times):.1f} ms); "
                             f"scoring alone {1000 * min(score_times):.1f} ms"})
        print(f"arithmetic N={n}: {sec * 1000:.1f} ms ({distinct} distinct)", flush=True)

    # ---- one training epoch of one candidate (plain PEFT loop, 1 thread)
    epoch_task = load_task(DataConfig(train_size=args.epoch_train_size, eval_size=args.eval_size))
    scale = 4000 / len(epoch_task.train)
    plain = C.plain_train(epoch_task, uniform(units, ("query", "value"), 8), epochs=1, threads=1)
    epoch_s = plain.epoch_train_s[0] * scale
    acc = plain.metrics[0].get("accuracy", float("nan"))
    note = (f"{len(epoch_task.train)} examples, {plain.steps_per_epoch} steps, measured {plain.epoch_train_s[0]:.1f} s "
            f"wall ({plain.epoch_train_cpu_s[0]:.1f} s process CPU)"
            + (f", scaled ×{scale:g} to 4,000 examples" if scale != 1 else "")
            + f"; setup {plain.setup_s:.1f} s, eval {plain.epoch_eval_s[0]:.1f} s on {len(epoch_task.eval)} "
            f"(accuracy {acc:.3f}, majority {epoch_task.majority_rate():.3f})")
    rows.append({"kind": "epoch", "seconds": epoch_s, "cpu_seconds": plain.epoch_train_cpu_s[0] * scale,
                 "load_avg": C.load_now(), "note": note})
    print("epoch:", note, flush=True)

    # ---- (a) the product path: Ray Tune + OptunaSearch
    import ray

    from orchestrator.pipeline import init_ray
    from orchestrator.screen import ScreenContext, run_screen

    rss_start = C.rss_mb()
    t0 = time.perf_counter()
    init_ray(None)
    ray_start_s = time.perf_counter() - t0
    rows.append({"kind": "ray_start", "seconds": ray_start_s, "load_avg": C.load_now(),
                 "note": "init_ray(None): embedded local Ray (paid once per run, shared with training)"})
    per_trial = args.candidates_per_trial
    try:
        with tempfile.TemporaryDirectory(prefix="screening-cost-") as tmp:
            plan = [("tune_warmup", per_trial)] + [("tune", n) for n in args.sizes]
            for i, (kind, n) in enumerate(plan):
                trials = max(1, n // per_trial)
                cfg = screen_config(tmp, f"screen-{i}-{n}", trials, per_trial)
                cfg.run_dir.mkdir(parents=True)
                context = ScreenContext(searchable, cfg.space.ranks, budget, scores, per_trial, cfg.screen.rank_by,
                                        -1.0, cfg.screen.seed)
                before = C.rss_mb()
                t0 = time.perf_counter()
                table = run_screen(cfg, context)
                sec = time.perf_counter() - t0
                after = C.rss_mb()
                arith = next((r["seconds"] for r in rows if r["kind"] == "arithmetic" and r.get("n_candidates") == n), 0.0)
                rows.append({"kind": kind, "n_candidates": trials * per_trial, "num_trials": trials,
                             "candidates_per_trial": per_trial, "distinct_candidates": len(table), "seconds": sec,
                             "seconds_with_probe": sec + probe_s, "ms_per_candidate": 1000 * sec / max(len(table), 1),
                             "per_trial_s": sec / trials, "rss_before_mb": before, "rss_after_mb": after,
                             "rss_growth_mb": after - before, "load_avg": C.load_now(),
                             "note": "not in the curve: first Tune run of the driver" if kind == "tune_warmup" else
                             f"arithmetic share {arith:.3f} s"})
                print(f"{kind} N={trials * per_trial}: {sec:.1f} s, {len(table)} distinct, RSS {before:.0f} → {after:.0f} MB",
                      flush=True)
    finally:
        ray.shutdown()
    rows.append({"kind": "driver_rss", "rss_before_mb": rss_start, "rss_after_mb": C.rss_mb(),
                 "rss_growth_mb": C.rss_mb() - rss_start, "note": "driver RSS before init_ray → after ray.shutdown"})

    frame = pd.DataFrame(rows)
    frame["ratio_vs_epoch"] = ratio_vs_epoch(frame, epoch_s)
    out = C.out_dir(args)
    C.write_csv(out / "screening_cost.csv", frame)
    plot(frame, epoch_s, probe_s, out / "screening_cost.png", scale)
    C.write_text(out / "screening_cost.md", markdown(frame, ctx, args, epoch_s, probe_s, ray_start_s, scale, scores))
    print((out / "screening_cost.md").read_text())


def ratio_vs_epoch(frame: pd.DataFrame, epoch_s: float) -> pd.Series:
    """Probe + screen over one epoch; NaN on rows that screen nothing (and on all, should none have screened)."""
    return frame.get("seconds_with_probe", pd.Series(np.nan, index=frame.index)) / epoch_s


def curve(frame: pd.DataFrame, kind: str) -> pd.DataFrame:
    return frame[frame.kind == kind].sort_values("n_candidates")


def markdown(frame, ctx, args, epoch_s, probe_s, ray_start_s, scale, scores) -> str:
    from orchestrator.screen import CONCURRENT_TRIALS

    tune, arith = curve(frame, "tune"), curve(frame, "arithmetic")
    at500 = tune[tune.n_candidates == 500]
    lines = ["# Screening cost: N candidates vs one training epoch", "",
             f"Command: `{C.invoked_command(__file__)}` · {time.strftime('%Y-%m-%d %H:%M')}",  # as invoked: --sizes…
             "", C.context_line(ctx) + ".", "", C.NOISE_NOTE, ""]
    if scale != 1:
        lines += [f"**--quick:** the epoch was measured on {args.epoch_train_size:,} examples and its time multiplied by "
                  f"{scale:g} to stand for the quickstart's 4,000-example epoch.", ""]
    lines += ["## Headline", ""]
    if not at500.empty:
        r = at500.iloc[0]
        ratio = r.seconds_with_probe / epoch_s
        lines.append(f"- **Screen 500 candidates (probe {probe_s:.1f} s + Tune/Optuna screen {r.seconds:.1f} s = "
                     f"{r.seconds_with_probe:.1f} s) / one epoch ({epoch_s:.1f} s) = {ratio:.2f}** — target < {TARGET_RATIO:g}: "
                     f"{'MET' if ratio < TARGET_RATIO else 'MISSED'}"
                     f" ({'by a factor ' + format(TARGET_RATIO / ratio, '.1f') if ratio < TARGET_RATIO else 'over by ' + format(ratio - TARGET_RATIO, '.2f')}).")
    arith500 = arith[arith.n_candidates == 500]
    if not arith500.empty:
        a = arith500.iloc[0]
        lines.append(f"- Pure arithmetic path, 500 candidates: probe + {1000 * a.seconds:.0f} ms = "
                     f"{a.seconds_with_probe:.1f} s, ratio {a.seconds_with_probe / epoch_s:.2f}: the Tune screen's own cost "
                     f"is orchestration, not arithmetic.")
    for name, part in (("Tune path", tune), ("arithmetic path", arith)):
        if len(part) >= 2:
            slope, intercept, r2 = C.linear_fit(part.n_candidates, part.seconds)
            shape = "near-linear" if r2 >= 0.95 else (
                "no clear line: sub-second timings, where the other tenants' load dominates" if part.seconds.max() < 2
                else "not linear")
            lines.append(f"- Cost curve, {name}: seconds ≈ {intercept:.3g} + {1000 * slope:.3g} ms × N (R² = {r2:.3f}; "
                         f"{shape}; N = {', '.join(str(int(n)) for n in part.n_candidates)}).")
    if len(tune) >= 2:
        slope, intercept, r2 = C.linear_fit(tune.num_trials, tune.seconds)
        lines.append(f"- Tune per-trial cost: {slope:.2f} s per trial of {args.candidates_per_trial} candidates "
                     f"(line through seconds vs trials, intercept {intercept:.1f} s = Tuner start/stop), "
                     f"{CONCURRENT_TRIALS} trials at a time, told to the sampler together.")
        growth = tune.rss_after_mb.iloc[-1] - tune.rss_before_mb.iloc[0]
        if args.candidates_per_trial != 25 and not at500.empty:
            projected = intercept + slope * (500 / 25) + probe_s
            lines.append(f"- Projected at the shipped 25 candidates per trial (20 trials for N = 500): {intercept:.1f} + "
                         f"20 × {slope:.2f} + probe {probe_s:.1f} = {projected:.1f} s, ratio {projected / epoch_s:.2f} "
                         f"to one epoch ({'still < 1' if projected < epoch_s else 'would miss the target'}).")
        lines.append(f"- Driver RSS across N: {tune.rss_before_mb.iloc[0]:.0f} MB before N = {int(tune.n_candidates.iloc[0])} → "
                     f"{tune.rss_after_mb.iloc[-1]:.0f} MB after N = {int(tune.n_candidates.iloc[-1])} "
                     f"({growth:+.0f} MB; per run: {', '.join(f'{g:+.0f}' for g in tune.rss_growth_mb)} MB).")
    lines.append(f"- Ray start (`init_ray(None)`): {ray_start_s:.1f} s, paid once per run and shared with training.")
    lines += ["", "## All measurements", ""]
    shown = frame[["kind", "n_candidates", "num_trials", "distinct_candidates", "seconds", "cpu_seconds", "seconds_with_probe",
                   "ratio_vs_epoch", "ms_per_candidate", "per_trial_s", "rss_before_mb", "rss_after_mb", "rss_growth_mb",
                   "load_avg", "note"]]
    lines += [C.md_table(shown, blank_missing=True), "",
              "`cpu_seconds` = the driver process's CPU time (what load distorts least; 1 torch thread); `seconds_with_probe` = probe + screening; `ratio_vs_epoch` = seconds_with_probe / one epoch; the probe is "
              f"{', '.join(f'{k} {v:.2f} s' for k, v in scores.seconds.items())} plus model load.", "",
              "![cost curve](screening_cost.png)", ""]
    return "\n".join(lines)


def plot(frame, epoch_s, probe_s, path: Path, scale: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for kind, label, marker in (("tune", "probe + Tune/Optuna screen (product path)", "o"),
                                ("arithmetic", "probe + arithmetic (random allocator)", "s")):
        part = curve(frame, kind)
        ax.plot(part.n_candidates, part.seconds_with_probe, marker=marker, label=label)
    part = curve(frame, "tune")
    ax.plot(part.n_candidates, part.seconds, marker="^", linestyle=":", label="Tune screen alone")
    ax.axhline(epoch_s, color="crimson", linestyle="--",
               label=f"one epoch, one candidate ({epoch_s:.0f} s{', ×' + format(scale, 'g') + ' scaled' if scale != 1 else ''})")
    ax.axhline(probe_s, color="grey", linestyle=":", label=f"probe once ({probe_s:.1f} s)")
    ax.set_xlabel("candidates screened (N)")
    ax.set_ylabel("wall seconds")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_title("Screening cost vs one training epoch (MiniLM-L6, 2 shared CPU cores)", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
