"""How well do the proxies rank allocations? Train a spread of allocations and measure it.

`lora-search validate-proxies CONFIG` draws N allocations at the budget (±tolerance) spanning the
search space, plus a few at half and double the budget, trains them all on Ray Train, and writes
`proxy_validation.{csv,md,png}`: signed Spearman ρ and Kendall τ of every proxy against trained
accuracy (at the fixed budget and across budgets), top-k hit rate, and each proxy's cost per
candidate next to the cost of training one. `params` and a seeded random score are the floors.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from orchestrator import report
from orchestrator.allocation import Allocation, searchable_units
from orchestrator.allocators import Budget, make_budget, sample_allocations, signed_non_finite_last, space_modules
from orchestrator.config import RunConfig
from orchestrator.errors import UserError
from orchestrator.proxies import PROXIES, ModuleScores, get_proxy
from orchestrator.train import TrainJob, check_trainings_fit

OFF_BUDGET_SCALES = (0.5, 2.0)
MIN_AT_BUDGET = 3  # the fewest allocations a rank correlation says anything about


def draw_spread(modules, ranks: list[int], budget: Budget, count: int, seed: int) -> list[Allocation]:
    """`count` distinct allocations, each from a fresh random distribution, so they span the space."""
    rng = np.random.default_rng(seed)
    types = sorted({m.type for m in modules})
    found: dict[str, Allocation] = {}
    for _ in range(count * 20):
        if len(found) == count:
            break
        params = {f"w_{t}": rng.uniform() for t in types} | {"depth_bias": rng.uniform(-1, 1), "max_rank": rng.choice(ranks)}
        for allocation in sample_allocations(params, modules, ranks, budget, 1, rng):
            found.setdefault(allocation.candidate_id, allocation)
    return list(found.values())


def validation_jobs(cfg: RunConfig, modules, n: int, n_off_budget: int) -> dict[str, tuple[str, Allocation]]:
    """candidate id → (budget label, allocation): n at the budget, n_off_budget split over other budgets."""
    searchable = space_modules(modules, cfg.space)
    budget = make_budget(modules, cfg.space)
    chosen = {a.candidate_id: ("budget", a) for a in draw_spread(searchable, cfg.space.ranks, budget, n, cfg.screen.seed)}
    for i, scale in enumerate(OFF_BUDGET_SCALES):
        other = Budget(int(budget.target * scale), budget.tolerance)
        share = n_off_budget // len(OFF_BUDGET_SCALES) + (i < n_off_budget % len(OFF_BUDGET_SCALES))
        for a in draw_spread(searchable, cfg.space.ranks, other, share, cfg.screen.seed + i + 1):
            chosen.setdefault(a.candidate_id, (f"budget×{scale:g}", a))
    return chosen


def agreement(table: pd.DataFrame, proxies: list[str], top_k: int, sign: float = 1.0) -> pd.DataFrame:
    """Signed rank agreement of each proxy score with accuracy, per scope (fixed budget, all budgets), and the share
    of the k most accurate models among the k a screen in the config's direction keeps (sign −1: the lowest scores,
    as `direction: minimize` keeps them). k is at most the models in the scope."""
    rows = []
    for scope, part in (("fixed_budget", table[table.budget == "budget"]), ("all_budgets", table)):
        k = min(top_k, len(part))
        true_top = set(part.nlargest(k, "accuracy").candidate_id)
        for proxy in proxies:
            screened = ranked_as_screened(part[f"proxy_{proxy}"], sign)
            score = sign * screened  # the proxy's own orientation (ρ stays signed), non-finite at the screen's worst end
            rho = stats.spearmanr(score, part.accuracy).statistic if score.nunique() > 1 else float("nan")
            tau = stats.kendalltau(score, part.accuracy).statistic if score.nunique() > 1 else float("nan")
            kept = part.candidate_id[screened.nlargest(k).index]
            rows.append({"scope": scope, "proxy": proxy, "spearman_rho": rho, "kendall_tau": tau, "top_k": k,
                         "top_k_hit_rate": len(true_top & set(kept)) / k if k else float("nan"), "models": len(part)})
    return pd.DataFrame(rows)


def ranked_as_screened(score: pd.Series, sign: float) -> pd.Series:
    """sign × score, a NaN or infinite score below every finite one, as the allocators rank them: one such candidate
    no longer makes ρ and τ NaN."""
    return pd.Series(signed_non_finite_last(score, sign), index=score.index)


def validation_table(trials: dict[str, dict], chosen: dict, scores: ModuleScores, modules, seed: int) -> pd.DataFrame:
    rows = []
    for cid, (label, allocation) in chosen.items():
        trained = [t for t in trials.values() if t["candidate_id"] == cid and t.get("status") == "completed"]
        if not trained:
            continue
        rows.append({"candidate_id": cid, "budget": label, "allocation": allocation.compact(modules),
                     "trainable_params": allocation.trainable_params(modules),
                     "accuracy": float(np.mean([t["accuracy"] for t in trained])),
                     "train_wall_s": float(np.mean([t["train_wall_s"] for t in trained])),
                     **{f"proxy_{name}": value for name, value in scores.scores(allocation).items()}})
    table = pd.DataFrame(rows)
    # the floor every proxy must beat, from a stream of its own (draw_spread's would tie it to the allocations)
    table["proxy_random"] = np.random.default_rng([seed, 1]).random(len(table))
    return table


def cost_table(scores: ModuleScores, table: pd.DataFrame, candidates_screened: int) -> pd.DataFrame:
    """Probe seconds (the shared warm-up included, for proxies that need the model) amortised over the
    candidates a screen scores, vs seconds to train one candidate."""
    train_s = float(table.train_wall_s.mean())
    probe_s = {name: seconds + (scores.warmup_seconds if get_proxy(name).needs_model else 0.0)
               for name, seconds in scores.seconds.items()}
    return pd.DataFrame([{"proxy": name, "probe_seconds": seconds,
                          "seconds_per_candidate": seconds / candidates_screened,
                          "train_seconds_per_candidate": train_s,
                          "ratio_train_to_proxy": train_s / max(seconds / candidates_screened, 1e-9)}
                         for name, seconds in probe_s.items()])


def plot_grid(table: pd.DataFrame, proxies: list[str], path: Path) -> None:
    cols = 4
    rows = -(-len(proxies) // cols)
    fig, axes = report.figure(4 * cols, 3.2 * rows, ncols=cols, nrows=rows)
    for ax, proxy in zip(axes.flat, proxies):
        for label, part in table.groupby("budget"):
            ax.scatter(part[f"proxy_{proxy}"], 100 * part.accuracy, s=18, label=label, alpha=0.8)
        rho = stats.spearmanr(table[f"proxy_{proxy}"], table.accuracy).statistic if table[f"proxy_{proxy}"].nunique() > 1 else float("nan")
        ax.set_title(f"{proxy}  (ρ all = {rho:+.2f})", fontsize=10)
        ax.set_xlabel("proxy score")
        ax.set_ylabel("accuracy (%)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(proxies):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("Proxy score vs trained accuracy (one point per allocation)")
    report.save_png(fig, path)


def check_counts(n: int, n_off_budget: int) -> None:
    """Refuse counts that cannot be validated, before anything is written or started."""
    if n < MIN_AT_BUDGET:
        raise UserError(f"--n: {n} allocations at the budget are too few to rank (ρ and τ of fewer than 3 are "
                        f"undefined or ±1); give --n {MIN_AT_BUDGET} or more")
    if n_off_budget < 0:
        raise UserError(f"--off-budget: {n_off_budget} is negative; give 0 (none) or more")


def check_drawn(at_budget: int, n: int) -> None:
    """The space may hold fewer distinct allocations in the band than --n asks for: refuse too few to rank (before
    Ray starts), and say when fewer than asked will train."""
    if at_budget < MIN_AT_BUDGET:
        raise UserError(f"--n: the space holds only {at_budget} distinct allocations inside the budget band (--n {n} "
                        f"asked), too few to rank; widen space.budget.tolerance or add space.ranks or module types")
    if at_budget < n:
        print(f"validate-proxies: the space holds {at_budget} distinct allocations inside the budget band; training "
              f"those, not {n}", flush=True)


def run_validation(cfg: RunConfig, n: int, n_off_budget: int, resume: bool, address: str | None) -> pd.DataFrame:
    from orchestrator import pipeline
    from orchestrator.data import load_task
    from orchestrator.models import adaptable_modules, check_max_length, load_model
    from orchestrator.train import run_training

    check_counts(n, n_off_budget)
    cfg.screen.proxies = sorted(PROXIES)  # validate every registered proxy, whatever the config screens with
    # every allocation trains to the end: ASHA would stop the weak ones, picked on the very accuracy being correlated
    cfg.train = dataclasses.replace(cfg.train, early_stopping=False)
    pipeline.check_run_dir(cfg, resume)  # a taken name is refused before the data loads; nothing is written yet
    task = load_task(cfg.data)
    base = load_model(cfg.model.name, task.num_labels)
    check_max_length(base, cfg.model.max_length)
    modules = searchable_units(base, adaptable_modules(base), cfg.space.shortcuts)
    chosen = validation_jobs(cfg, modules, n, n_off_budget)
    check_drawn(sum(label == "budget" for label, _ in chosen.values()), n)
    pipeline.set_runtime_env()
    check_trainings_fit(cfg.train, embedded=pipeline.init_ray(address))
    pipeline.prepare_run_dir(cfg, resume)
    pipeline.write_run_json(cfg, command="validate-proxies", allocations=len(chosen))
    scores = pipeline.module_scores(cfg, task, modules)
    jobs = [TrainJob(cid, "searched", label, a.as_dict(), seed) for cid, (label, a) in chosen.items() for seed in cfg.train.seeds]
    # with train.lr_grid each allocation trains at its own picked rate, as `run` trains it: a proxy's sign can differ
    # between an untuned and a tuned rate
    trials = run_training(cfg, task, pipeline.tuned_learning_rates(cfg, task, jobs))
    ours = {job.job_id for job in jobs}  # a --resume with fewer seeds leaves the dropped seeds' trial files
    table = validation_table({k: t for k, t in trials.items() if k in ours}, chosen, scores, modules, cfg.screen.seed)
    if table.empty:  # nothing to rank; failed trials stay recorded, so --resume alone would not retry them
        raise UserError(f"validate-proxies: no allocation finished training (their errors are in "
                        f"'{cfg.run_dir / 'trials'}'); fix the cause, remove that directory and run again with --resume")
    proxies = sorted(PROXIES) + ["random"]
    summary = agreement(table, proxies, top_k=max(1, n // 5), sign=1.0 if cfg.screen.direction == "maximize" else -1.0)
    costs = cost_table(scores, table, cfg.screen.num_trials * cfg.screen.candidates_per_trial)
    write_outputs(cfg.run_dir, table, summary, costs, proxies)
    return summary


def write_outputs(run_dir: Path, table: pd.DataFrame, summary: pd.DataFrame, costs: pd.DataFrame, proxies: list[str]) -> None:
    report.write_atomic(run_dir / "proxy_validation.csv", lambda p: summary.to_csv(p, index=False))
    report.write_atomic(run_dir / "proxy_validation_models.csv", lambda p: table.to_csv(p, index=False))
    plot_grid(table, proxies, run_dir / "proxy_validation.png")
    text = ["# Proxy validation", "",
            f"{len(table)} trained allocations ({(table.budget == 'budget').sum()} at the budget). Signed ρ: a negative "
            "value means the proxy ranks allocations backwards (screen with `direction: minimize`).", "",
            summary.to_markdown(index=False, floatfmt=".3f"), "", "## Cost per candidate", "",
            costs.to_markdown(index=False, floatfmt=".4g"), "", "![proxy vs accuracy](proxy_validation.png)", ""]
    report.write_atomic(run_dir / "proxy_validation.md", lambda p: Path(p).write_text("\n".join(text), encoding="utf-8"))
