"""Proxy remedies: do LoRA-specific fixes make a zero-cost proxy rank allocations? (issue #4)

What it measures. The 12 allocations of results/examples/newsgroups-validate/ were trained once
(`lora-search validate-proxies search_spaces/newsgroups_tight_budget.yaml --n 10 --off-budget 2`:
20 Newsgroups, 2,000 train examples, max_length 96, MiniLM-L6, 1 epoch, seed 0; 10 allocations at
9,216 ± 5% LoRA params, one at half and one at double). A remedy changes only the proxy *scores*, so
this script re-runs the product's probe (`orchestrator.proxies.score_modules`, 1 thread, the run's
data split and probe settings) under each variant, re-scores the same 12 allocations and reports the
signed Spearman ρ and Kendall τ against the stored accuracies, at the fixed budget (10 models) and
across budgets (12), for every proxy × variant:

- probe variants: proxy_batches 8 (as shipped) / 32 / 64; warm-up of the shared probe adapter for
  K = 10 / 25 / 50 AdamW steps at the training recipe's lr (train.lr) on training batches other than
  the scored ones (`score_modules(warmup_steps=K)`); combinations; probe seeds 0/1/2;
- normalisations of the per-module scores before the rank-weighted sum (`orchestrator.proxies.normalise`):
  none, per_param (÷ params_per_rank), rank (global normalised rank), type_z (z-score within a module type).

`vote` is computed from its members' cached scores (`rank_average`, what VoteProxy does) and costs the
sum of theirs. Uncertainty: p-value of each ρ, a bootstrap 95% CI (2,000 resamples of the 10 models) for
the fixed budget, and a permutation test of the *best* ρ over every proxy × normalisation × variant
evaluated (the selection effect of picking the maximum of many correlations on 10 points).
Cost: warm-up + proxy seconds of each probe run (wall and CPU), the probe + the Tune screen of 500
candidates (from results/benchmarks/screening_cost.csv) against one training epoch of these models.

Run (from the repository root; every probe run is cached, so a rerun only writes the report):
    python benchmarks/proxy_remedies.py --quick        # baseline + warm-up 25, seed 0, every proxy
    python benchmarks/proxy_remedies.py --skip grasp   # every variant of FULL (hours on a loaded 2-core box)
    python benchmarks/proxy_remedies.py --only b8_w0_s1 b32_w0_s0 --skip grasp --cache proxy_remedies_scores_b.json
The cache was filled by --quick, then `--only` runs in parallel processes (b8_w50_s0 b8_w10_s0 and
b8_w0_s1 b8_w0_s2 b32_w0_s0 with `--skip grasp`, grasp being the dearest proxy and among the worst;
b8_w10_s1, b8_w10_s2 with `--skip grasp nwot`), then b32_w25_s0 and b64_w0_s0 (every proxy) by the full mode
of run_all (`python benchmarks/run_all.py --only proxy_remedies …`, 2026-12-03, idle machine: 17 min, the
rest read from the cache), which wrote the measured report.
Writes results/benchmarks/proxy_remedies.{csv,md} (--quick: in results/benchmarks/quick/; --out changes the
folder); per-module scores of every probe run are cached in results/benchmarks/proxy_remedies_scores*.json
(--fresh recomputes them).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from scipy import stats  # noqa: E402

from benchmarks._common import (RESULTS, add_out_argument, context_line, invoked_command, machine_context,  # noqa: E402
                                md_table, out_dir, write_csv, write_text)

VALIDATION = ROOT / "results" / "examples" / "newsgroups-validate"
CONFIG = ROOT / "search_spaces" / "newsgroups_tight_budget.yaml"
CANDIDATES = 500  # what the shipped space screens (20 trials × 25)


@dataclass(frozen=True)
class Variant:
    batches: int
    warmup: int
    seed: int

    @property
    def key(self) -> str:
        return f"b{self.batches}_w{self.warmup}_s{self.seed}"

    @property
    def label(self) -> str:
        return f"batches={self.batches}, warm-up={self.warmup}"


FULL = ([Variant(8, 0, s) for s in (0, 1, 2)] + [Variant(8, k, 0) for k in (10, 25, 50)]
        + [Variant(8, 10, s) for s in (1, 2)] + [Variant(32, 0, 0), Variant(32, 25, 0), Variant(64, 0, 0)])
QUICK = [Variant(8, 0, 0), Variant(8, 25, 0)]


def setup():
    """The validation run's config, task, module list and trained allocations (checked against its run.json)."""
    from orchestrator.allocation import Allocation, searchable_units
    from orchestrator.config import load_config
    from orchestrator.data import load_task
    from orchestrator.models import adaptable_modules, load_model

    cfg = load_config(CONFIG)
    run_json = ROOT / "results" / "newsgroups-validate" / "run.json"  # the run directory, when it is still there
    if run_json.is_file():
        stored = json.loads(run_json.read_text())["config"]
        for section, keys in (("data", ("task", "train_size", "split_seed")), ("model", ("name", "max_length")),
                              ("screen", ("proxy_batches", "batch_size", "probe_rank", "seed")), ("train", ("lr",))):
            for key in keys:
                assert stored[section][key] == getattr(getattr(cfg, section), key), f"{section}.{key} differs from the run"
    task = load_task(cfg.data)
    base = load_model(cfg.model.name, task.num_labels)
    modules = searchable_units(base, adaptable_modules(base), cfg.space.shortcuts)
    table = pd.read_csv(VALIDATION / "proxy_validation_models.csv")
    table["parsed"] = [Allocation.from_compact(text, modules) for text in table.allocation]
    return cfg, task, modules, table


def probe(cfg, task, modules, variant: Variant, skip: list[str]) -> dict:
    """One probe run: per-module scores of every proxy but vote and `skip`, and their cost."""
    import torch

    from orchestrator.proxies import PROXIES, score_modules

    torch.set_num_threads(1)
    names = [p for p in sorted(PROXIES) if p != "vote" and p not in skip]
    cpu, wall = time.process_time(), time.perf_counter()
    scores = score_modules(cfg.model.name, task.num_labels, task.train, modules, names, probe_rank=cfg.screen.probe_rank,
                           num_batches=variant.batches, batch_size=cfg.screen.batch_size,
                           max_length=cfg.model.max_length, seed=variant.seed, warmup_steps=variant.warmup,
                           warmup_lr=cfg.train.lr)
    return asdict(scores) | {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def cached_probes(cfg, task, modules, variants: list[Variant], path: Path, fresh: bool, skip: list[str]) -> dict[str, dict]:
    """Probe runs from every cache file beside `path` (parallel runs write their own), new ones into `path`."""
    cache = {} if fresh else {k: v for f in sorted(path.parent.glob("proxy_remedies_scores*.json"))
                              for k, v in json.loads(f.read_text()).items()}
    mine = {} if fresh or not path.is_file() else json.loads(path.read_text())
    for variant in variants:
        if variant.key not in cache:
            print(f"probe {variant.key} ...", flush=True)
            cache[variant.key] = mine[variant.key] = probe(cfg, task, modules, variant, skip)
            write_text(path, json.dumps(mine))
            print(f"  {cache[variant.key]['wall_s']:.1f} s wall", flush=True)
    return cache


def with_vote(unit: dict, seconds: dict) -> tuple[dict, dict]:
    from orchestrator.proxies.vote import VoteProxy, rank_average

    members = VoteProxy.members
    return (unit | {"vote": rank_average({m: unit[m] for m in members})},
            seconds | {"vote": sum(seconds[m] for m in members)})


def rho_tau(score: np.ndarray, accuracy: np.ndarray) -> tuple[float, float, float]:
    if len(set(score)) < 2:
        return float("nan"), float("nan"), float("nan")
    result = stats.spearmanr(score, accuracy)
    return float(result.statistic), float(result.pvalue), float(stats.kendalltau(score, accuracy).statistic)


def bootstrap_ci(score: np.ndarray, accuracy: np.ndarray, draws: np.ndarray) -> tuple[float, float]:
    """95% percentile CI of Spearman ρ over bootstrap resamples (rows of `draws` index the models)."""
    xs, ys = stats.rankdata(score[draws], axis=1), stats.rankdata(accuracy[draws], axis=1)
    xs, ys = xs - xs.mean(1, keepdims=True), ys - ys.mean(1, keepdims=True)
    denom = np.sqrt((xs ** 2).sum(1) * (ys ** 2).sum(1))
    rhos = np.where(denom > 0, (xs * ys).sum(1) / np.where(denom > 0, denom, 1), np.nan)
    low, high = np.nanpercentile(rhos, [2.5, 97.5])
    return float(low), float(high)


def agreement_rows(variant: Variant, entry: dict, modules, table: pd.DataFrame, draws: np.ndarray) -> list[dict]:
    from orchestrator.proxies import NORMALISATIONS, get_proxy, normalise

    unit, seconds = with_vote(entry["unit"], entry["seconds"])
    fixed = (table.budget == "budget").to_numpy()
    rows = []
    for proxy, scores in sorted(unit.items()):
        for norm in NORMALISATIONS:
            unit_scores = normalise(scores, modules, norm)
            score = np.array([get_proxy(proxy).candidate_score(unit_scores, a) for a in table.parsed])
            row = {"variant": variant.label, "batches": variant.batches, "warmup": variant.warmup, "seed": variant.seed,
                   "proxy": proxy, "norm": norm}
            for scope, mask in (("fixed", fixed), ("all", np.ones_like(fixed))):
                rho, p, tau = rho_tau(score[mask], table.accuracy.to_numpy()[mask])
                row |= {f"rho_{scope}": rho, f"p_{scope}": p, f"tau_{scope}": tau}
            row["ci_low"], row["ci_high"] = bootstrap_ci(score[fixed], table.accuracy.to_numpy()[fixed], draws)
            cost = 0.0 if proxy == "params" else seconds[proxy] + entry.get("warmup_seconds", 0.0)
            rows.append(row | {"probe_s": cost, "warmup_s": entry.get("warmup_seconds", 0.0), "scores": score.tolist()})
    return rows


def random_floor(table: pd.DataFrame) -> list[dict]:
    """The seeded random score the validation run stored (its floor)."""
    fixed = (table.budget == "budget").to_numpy()
    score = table.proxy_random.to_numpy()
    rho_f, p_f, tau_f = rho_tau(score[fixed], table.accuracy.to_numpy()[fixed])
    rho_a, p_a, tau_a = rho_tau(score, table.accuracy.to_numpy())
    return [{"variant": "stored", "proxy": "random", "norm": "none", "rho_fixed": rho_f, "p_fixed": p_f, "tau_fixed": tau_f,
             "rho_all": rho_a, "p_all": p_a, "tau_all": tau_a, "probe_s": 0.0}]


def best_permutation_p(rows: pd.DataFrame, accuracy: np.ndarray, permutations: int = 5000) -> tuple[float, float]:
    """P(max ρ over all evaluated scores ≥ observed max | accuracy independent of every score)."""
    scores = np.array([s for s in rows.scores])
    ranks = stats.rankdata(scores, axis=1)
    ranks = ranks - ranks.mean(1, keepdims=True)
    ranks /= np.linalg.norm(ranks, axis=1, keepdims=True).clip(min=1e-12)
    rng = np.random.default_rng(0)
    perms = np.array([rng.permutation(accuracy) for _ in range(permutations)])
    y = stats.rankdata(perms, axis=1)
    y = (y - y.mean(1, keepdims=True)) / np.linalg.norm(y - y.mean(1, keepdims=True), axis=1, keepdims=True)
    observed_y = stats.rankdata(accuracy)
    observed_y = (observed_y - observed_y.mean()) / np.linalg.norm(observed_y - observed_y.mean())
    observed = float((ranks @ observed_y).max())
    null_max = (ranks @ y.T).max(0)
    return observed, float((null_max >= observed - 1e-12).mean())


def reproduction_check(probes: dict, modules, table: pd.DataFrame) -> str:
    """Seed-0 baseline vs the scores the validation run stored: the probe is the same code path."""
    from orchestrator.proxies import get_proxy

    entry = probes.get(Variant(8, 0, 0).key)
    if entry is None:
        return "baseline not run"
    unit, _ = with_vote(entry["unit"], entry["seconds"])
    worst = 0.0
    for proxy, scores in unit.items():
        mine = np.array([get_proxy(proxy).candidate_score(scores, a) for a in table.parsed])
        stored = table[f"proxy_{proxy}"].to_numpy()
        worst = max(worst, float(np.max(np.abs(mine - stored) / np.maximum(np.abs(stored), 1e-12))))
    return f"largest relative difference from the stored proxy scores over all proxies and models: {worst:.2e}"


def summaries(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean ± sd over probe seeds for every (variant, proxy, norm) measured with more than one seed."""
    rows = frame[frame.variant != "stored"]
    grouped = rows.groupby(["variant", "proxy", "norm"])
    out = grouped.agg(seeds=("seed", "nunique"), rho_fixed_mean=("rho_fixed", "mean"), rho_fixed_sd=("rho_fixed", "std"),
                      rho_all_mean=("rho_all", "mean"), probe_s=("probe_s", "mean")).reset_index()
    return out[out.seeds > 1]


def cost_lines(table: pd.DataFrame, probes: dict) -> pd.DataFrame:
    """Per probe run: warm-up and total seconds, and probe + Tune screen of 500 over one training epoch."""
    epoch_s, tune_s = float(table.train_wall_s.mean()), tune_screen_seconds()
    costs = pd.DataFrame([{"probe_run": key, "proxies": len(entry["unit"]), "warmup_wall_s": entry.get("warmup_seconds", 0.0),
                           "probe_wall_s": entry["wall_s"], "probe_cpu_s": entry["cpu_s"], "tune_screen_500_s": tune_s,
                           "train_epoch_s": epoch_s} for key, entry in probes.items()])
    costs["screen_500_over_epoch"] = (costs.probe_wall_s + costs.tune_screen_500_s) / costs.train_epoch_s
    return costs


def probes_variant(key: str) -> tuple[int, int]:
    b, w, _ = key.split("_")
    return int(b[1:]), int(w[1:])


def tune_screen_seconds() -> float:
    path = RESULTS / "screening_cost.csv"
    if not path.is_file():
        return float("nan")
    table = pd.read_csv(path)
    row = table[(table.kind == "tune") & (table.n_candidates == CANDIDATES)]
    return float(row.seconds.iloc[0]) if len(row) else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="baseline and warm-up 25 only, seed 0")
    parser.add_argument("--fresh", action="store_true", help="recompute cached probe runs")
    parser.add_argument("--extra", nargs="*", default=[], help="more probe runs as b<batches>_w<warmup>_s<seed>")
    parser.add_argument("--only", nargs="*", default=None, help="run just these probe runs (b<batches>_w<warmup>_s<seed>)")
    parser.add_argument("--skip", nargs="*", default=[], help="proxies left out of new probe runs (e.g. grasp: the dearest)")
    parser.add_argument("--cache", default="proxy_remedies_scores.json",
                        help="cache file for new probe runs, in results/benchmarks (shared by --quick and full runs)")
    add_out_argument(parser)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    context = machine_context()
    parse = lambda keys: [Variant(*probes_variant(k), int(k.split("_s")[1])) for k in keys]  # noqa: E731
    variants = parse(args.only) if args.only is not None else (QUICK if args.quick else FULL) + parse(args.extra)
    cfg, task, modules, table = setup()
    probes = cached_probes(cfg, task, modules, variants, RESULTS / args.cache, args.fresh, args.skip)
    draws = np.random.default_rng(0).integers(0, int((table.budget == "budget").sum()), size=(2000, int((table.budget == "budget").sum())))
    rows = [r for v in variants for r in agreement_rows(v, probes[v.key], modules, table, draws)]
    frame = pd.DataFrame(rows + random_floor(table))
    write_report(out_dir(args), frame, table, {k: probes[k] for k in dict.fromkeys(v.key for v in variants)}, modules, context)


def write_report(out: Path, frame: pd.DataFrame, table: pd.DataFrame, probes: dict, modules, context: dict) -> None:
    fixed_acc = table.accuracy.to_numpy()[(table.budget == "budget").to_numpy()]
    evaluated = frame[frame.variant != "stored"]
    seed0 = evaluated[(evaluated.seed == 0) & (evaluated.proxy != "params")]
    fixed_idx = np.flatnonzero((table.budget == "budget").to_numpy())
    best = seed0.loc[seed0.rho_fixed.idxmax()]
    observed, p_best = best_permutation_p(seed0.assign(scores=[np.array(s)[fixed_idx] for s in seed0.scores]), fixed_acc)
    write_csv(out / "proxy_remedies.csv", frame.drop(columns=["scores"]))
    params = frame[(frame.proxy == "params") & (frame.variant != "stored")].iloc[0]
    random = frame[frame.variant == "stored"].iloc[0]
    view = seed0[["variant", "proxy", "norm", "rho_fixed", "p_fixed", "ci_low", "ci_high", "tau_fixed", "rho_all", "probe_s"]]
    top = view.sort_values("rho_fixed", ascending=False).head(15)
    baseline = view[(view.variant == "batches=8, warm-up=0") & (view.norm == "none")]
    pivot = seed0.pivot_table(index=["proxy", "norm"], columns="variant", values="rho_fixed").reset_index()
    seeds = summaries(evaluated)
    text = [
        "# Proxy remedies on 20 Newsgroups (issue #4)", "",
        f"Command: `{invoked_command(__file__)}` (probe runs from the cache files, see the "
        f"module docstring for how each was made) · {time.strftime('%Y-%m-%d %H:%M')}", "",
        context_line(context) + ".", "",
        f"Re-scores the {len(table)} allocations trained by `validate-proxies` ({len(fixed_acc)} at 9,216 ± 5% params, 1 training "
        "seed each) under each probe variant; accuracies are the stored ones. Signed ρ: positive = the proxy ranks the "
        "way accuracy does. Reproduction of the stored run: " + reproduction_check(probes, modules, table) + ".", "",
        f"Floors at the fixed budget: `params` ρ = {params.rho_fixed:+.3f} (p = {params.p_fixed:.3f}), stored random "
        f"ρ = {random.rho_fixed:+.3f}. Target: ρ ≥ 0.6 and clearly above `params`.", "",
        f"Best ρ over every proxy × normalisation × variant at probe seed 0 ({len(seed0)} scores, `params` excluded): "
        f"{best.proxy} / {best.norm} / {best.variant}: ρ = {best.rho_fixed:+.3f}. Permutation test of that *maximum* "
        f"(accuracy shuffled 5,000 times, max over the same {len(seed0)} scores): p = {p_best:.3f}.", "",
        "## Baseline probe (as shipped: 8 batches, no warm-up, seed 0)", "", md_table(baseline, ".3f"), "",
        "## Top 15 by ρ at the fixed budget (seed 0)", "", md_table(top, ".3f"), "",
        "## ρ at the fixed budget, every proxy × normalisation × probe variant (seed 0)", "", md_table(pivot, "+.2f"), "",
        "## Probe seeds (mean ± sd of ρ over seeds 0, 1, 2)", "",
        md_table(seeds.sort_values("rho_fixed_mean", ascending=False).head(20), ".3f") if len(seeds) else "(no multi-seed runs)", "",
        "## Cost", "",
        "Probe seconds (warm-up + every proxy, 1 thread) + the Tune screen of 500 candidates (screening_cost.csv) against one "
        "training epoch of these models (mean train_wall_s of the 12 stored runs, measured on a loaded machine).", "",
        md_table(cost_lines(table, probes), ".3g"), ""]
    write_text(out / "proxy_remedies.md", "\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
