"""Report: one pandas DataFrame of every trained model, written as Parquet, CSV, Markdown, HTML and PNGs.

Everything is a DataFrame first: `load(run_dir)` returns the report for notebooks, and the files
are views of it. Files are written to a temporary name and renamed, so a crash or a full disk never
leaves half a report behind. `rebuild(run_dir)` writes every file again from the stored results
(trials/*.json, screen.csv, module_scores.json, run.json) without training anything.

Per row (one trained model and seed), on top of the trial metrics and `proxy_<name>` scores:

- `params_pct_of_base` = 100 · trainable_params / base_params (the base model's parameter count from
  run.json `base_params`); NaN when the base size is unknown.
- `num_adapted_modules`, `total_rank` (Σ rank) and `adapters_per_type` (adapters per module type in
  model order, e.g. `query:6,value:6`), read from the allocation; a routed model's are its routed sites and Σ
  expert rank (`routed_modules`, `expert_rank_sum`), its types blank.
- `gain_vs_<baseline>` = 100 · (accuracy − mean accuracy of that baseline over its seeds), in
  accuracy points, for every baseline label; NaN on the baseline's own rows.
- `roi_baseline`: the baseline ROI is measured against (the first of run.json `train.baselines`
  that was trained, else `uniform_qv`, else the first label alphabetically).
- `roi_per_usd` = gain_vs_<roi_baseline> / cost_usd: accuracy points gained over that baseline per
  US dollar of this model's own training (this seed; screening is shared and reported apart).
- `roi_per_mparams` = gain_vs_<roi_baseline> / (trainable_params / 10⁶): accuracy points gained per
  million trainable LoRA parameters.
- `ranks_json` (and `history_json` when the trials recorded per-epoch metrics): the full
  {module name: rank} map (and the epoch history) as JSON strings. They stay in the Parquet file
  only; the CSV and the tables leave them out (`allocation` holds the same ranks in compact form).

Per model (`aggregate`): mean ± std over seeds of accuracy, F1, eval loss, cost per seed,
device-hours per seed and peak memory (std is NaN with one seed); `cost_usd`/`device_hours` are the
totals over seeds; `p_vs_<baseline>` is Welch's t-test p-value of the model's accuracies against the
baseline's (NaN unless both have ≥ 2 seeds; where neither varies over its seeds, 1 for the same accuracy and
NaN for different ones: see `welch_p`); `pareto_<x>` marks the Pareto front that maximises
accuracy and minimises x ∈ trainable_params, cost_usd (per seed), peak_memory_mb.
"""

from __future__ import annotations

import base64
import errno
import html as html_lib
import itertools
import json
import math
import os
import re
import shutil
import tempfile
import warnings
from datetime import datetime
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from orchestrator.config import LAYER_MODULE, flat_keys, module_type
from orchestrator.errors import UserError

CONTRACT_COLUMNS = ["candidate_id", "kind", "label", "allocation", "trainable_params", "head_params", "accuracy", "f1",
                    "eval_loss", "peak_memory_mb", "train_wall_s", "device_hours", "cost_usd", "seed"]
JSON_COLUMNS = ["ranks_json", "history_json"]  # Parquet only
DERIVED_COLUMNS = ["params_pct_of_base", "num_adapted_modules", "total_rank", "adapters_per_type", "roi_baseline",
                   "roi_per_usd", "roi_per_mparams"]
GAIN_PREFIX, P_PREFIX, PARETO_PREFIX = "gain_vs_", "p_vs_", "pareto_"
# Runs with `routing.enabled` (kind "routed" rows): which adapter a row is, and how it ran (routed models only
# have the last two). Latency and peak inference memory come from one measured pass over the eval split.
ROUTING_COLUMNS = ["adapter", "experts", "latency_ms_mean", "latency_ms_p95", "latency_cpu_ms_mean", "latency_cpu_ms_p95",
                   "peak_infer_mem_mb", "fraction_active", "router_entropy", "routed_modules", "router_params"]
PARETO_AXES = {"trainable_params": "trainable params", "cost_usd": "cost per seed ($)", "peak_memory_mb": "peak memory (MiB)"}
MODULE_TYPE_ORDER = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
TYPE_LABELS = {"query": "query", "key": "key", "value": "value", "attention.output.dense": "attn out",
               "intermediate.dense": "FFN up", "output.dense": "FFN down"}
PLOTS = {  # file name → caption (learning_curves.png only when the trials recorded ≥ 2 epochs)
    "accuracy_vs_params.png": "Accuracy vs trainable parameters, Pareto front and baselines",
    "accuracy_vs_cost.png": "Accuracy and training cost per model (mean ± std over seeds)",
    "allocation_heatmap.png": "Where the adapters sit: rank per layer and module type",
    "proxy_vs_accuracy.png": "Zero-cost proxy scores vs trained accuracy",
    "learning_curves.png": "Learning curves (eval accuracy and loss per epoch)",
}
SEARCHED_COLOR, BASELINE_COLOR, ROUTED_COLOR, FRONT_COLOR = "#1f77b4", "#d62728", "#9467bd", "#2ca02c"
KIND_MARKERS = {"searched": "o", "baseline": "s", "routed": "D"}  # every kind a row can have gets a point in the plots
NA = "n/a"  # a missing number in a sentence (tables leave it blank)
_SHORT_MODULE = re.compile(r"^L(\d+)\.(.+)$")


DYNAMIC = "dyn-"  # a dynamic model's id: dyn-<its static twin's id> (train.dynamic_every)
_WRITES = itertools.count()


def replace_atomically(path: Path, writer: Callable[[str], None]) -> None:
    """writer(tmp) then rename over `path`; on any error the temp file goes and the old file (or none) stays."""
    # a temp file per writer: two writers of one file (two `lora-search report` at once) each rename a whole copy
    tmp = Path(path).with_name(f".{Path(path).name}.{os.getpid()}-{next(_WRITES)}.tmp")
    try:
        writer(str(tmp))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def replace_dir_atomically(path: Path, writer: Callable[[Path], None]) -> None:
    """writer(staged directory) then swap it in for the directory `path`: a reader sees the old directory (or none)
    or the whole new one, never a half-written one; on any error the old one stays. A link or a file at `path` is
    refused (NotADirectoryError): the swap would move the link, not what it points to."""
    path = Path(os.path.abspath(path))  # "." has no name to stage beside
    if path.is_symlink() or (path.exists() and not path.is_dir()):
        raise NotADirectoryError(errno.ENOTDIR, "not a directory (a link or a file)", str(path))
    here = Path.cwd()
    if path == here or path in here.parents:  # swapped, it would leave the caller (and its shell) in a deleted folder
        raise IsADirectoryError(errno.EBUSY, "the current directory or one above it; give a new directory", str(path))
    path.parent.mkdir(parents=True, exist_ok=True)
    old = path.with_name(f".{path.name}.{os.getpid()}-{next(_WRITES)}.old")
    staged = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))  # same file system: os.replace is atomic
    try:
        writer(staged)
        staged.chmod(0o755)  # mkdtemp makes 0700; results are as readable as any other file
        if path.exists():
            os.replace(path, old)
        os.replace(staged, path)
    except BaseException:
        if old.exists() and not path.exists():
            os.replace(old, path)
        shutil.rmtree(staged, ignore_errors=True)
        raise
    shutil.rmtree(old, ignore_errors=True)


def write_atomic(path: Path, writer: Callable[[str], None]) -> None:
    """replace_atomically, with a full disk or a missing permission said in one line (every command writes its
    files through here, so the fix names none: a run goes on with --resume, the others run again)."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as err:  # a file where the directory should be, or no permission; nothing written yet
        raise UserError(f"write: could not write '{path}': its directory '{path.parent}' cannot be made "
                        f"({err.strerror or err}); give an output directory that is not a file and that you can write") from None
    try:
        replace_atomically(path, writer)
    except OSError as err:
        raise UserError(f"write: could not write '{path}' ({err.strerror or err}); free disk space or fix permissions, "
                        "then run the command again (`lora-search run` with --resume)") from None


# ---------------------------------------------------------------- allocations


def module_cell(name: str) -> tuple[int, str] | None:
    """(layer, module type) of a full module name or a compact `L3.query` name; None if it is neither."""
    match = LAYER_MODULE.search(name)
    if match:
        return int(match.group(1)), module_type(match.group(2))
    match = _SHORT_MODULE.match(name)
    return (int(match.group(1)), match.group(2)) if match else None


def allocation_cells(ranks_json: str | None = None, allocation: str | None = None) -> dict[tuple[int, str], int]:
    """{(layer, module type): rank > 0} from the full-name JSON map, else from the compact allocation string."""
    cells: dict[tuple[int, str], int] = {}
    if isinstance(ranks_json, str) and ranks_json:
        items = json.loads(ranks_json).items()
    elif isinstance(allocation, str):
        items = [item.strip().rpartition(":")[::2] for item in allocation.split(",") if item.strip()]
    else:
        return cells
    for name, rank in items:
        cell = module_cell(name)
        if cell is not None and int(rank) > 0:
            cells[cell] = int(rank)
    return cells


def ordered_types(types) -> list[str]:
    """Module types in model order (query … output.dense), unknown ones after, alphabetically."""
    types = set(types)
    return [t for t in MODULE_TYPE_ORDER if t in types] + sorted(types - set(MODULE_TYPE_ORDER))


def compact_allocation(ranks: dict[str, int], module_order: list[str] | None = None) -> str:
    """`L0.query:8,L3.output.dense:4` in model order, then the shortcuts by layer and kind (as `Allocation.compact`),
    without loading the model.

    `module_order` is the model's module names in order (module_scores.json `unit` keys); names missing
    from it follow, by layer and module type.
    """
    from orchestrator.shortcuts import ShortcutSpec, format_compact, is_shortcut_item

    position = {name: i for i, name in enumerate(module_order or [])}
    type_rank = {t: i for i, t in enumerate(MODULE_TYPE_ORDER)}

    def key(name: str):
        layer, kind = module_cell(name) or (10**6, name)
        return (name not in position, position.get(name, 0), layer, type_rank.get(kind, len(type_rank)), kind)

    items = []
    for name in sorted((n for n, r in ranks.items() if r > 0 and not is_shortcut_item(n)), key=key):
        layer, kind = module_cell(name) or (None, name)
        items.append(f"L{layer}.{kind}:{ranks[name]}" if layer is not None else f"{name}:{ranks[name]}")
    shortcuts = [ShortcutSpec.parse(f"{n}:{r}") for n, r in ranks.items() if r > 0 and is_shortcut_item(n)]
    return ",".join(items + ([format_compact(shortcuts)] if shortcuts else []))


def _allocation_summary(row) -> tuple[int, int, str]:
    """(adapted modules, Σ rank, adapters per type). A routed model's come from its trial: budget_expert_ranks drops
    sites and shrinks ranks, so its plain allocation overstates both; its trial does not name the sites it kept,
    so their types stay blank."""
    if getattr(row, "kind", None) == "routed":
        sites, rank = getattr(row, "routed_modules", np.nan), getattr(row, "expert_rank_sum", np.nan)
        return (np.nan, np.nan, "") if pd.isna(sites) or pd.isna(rank) else (int(sites), int(rank), "")
    return allocation_summary(getattr(row, "allocation", None), getattr(row, "ranks_json", None))


def allocation_summary(allocation: str | None, ranks_json: str | None = None) -> tuple[int, int, str]:
    """(adapted modules, Σ rank, adapters per type: `query:3,value:6`) of a compact allocation or a full-name map."""
    cells = allocation_cells(ranks_json, allocation)
    counts = pd.Series([t for _, t in cells]).value_counts() if cells else pd.Series(dtype=int)
    per_type = ",".join(f"{t}:{counts[t]}" for t in ordered_types(counts.index))
    return len(cells), sum(cells.values()), per_type


# ---------------------------------------------------------------- the row table


def _slug(label: str) -> str:
    return re.sub(r"\W+", "_", str(label)).strip("_") or "baseline"


def gain_column(baseline: str) -> str:
    return GAIN_PREFIX + _slug(baseline)


def p_column(baseline: str) -> str:
    return P_PREFIX + _slug(baseline)


def baseline_labels(report: pd.DataFrame, preferred: list[str] | None = None) -> list[str]:
    """Baseline labels, the ROI reference first (see the module docstring), the others alphabetically."""
    labels = sorted(set(report.loc[report.kind == "baseline", "label"].dropna()))
    if not labels:
        return []
    existing = report["roi_baseline"].dropna().unique().tolist() if "roi_baseline" in report else []
    order = list(preferred or []) + existing + ["uniform_qv"] + labels
    primary = next(label for label in order if label in labels)
    return [primary] + [label for label in labels if label != primary]


def add_derived(report: pd.DataFrame, base_params: int | None = None, baselines: list[str] | None = None) -> pd.DataFrame:
    """The report with the derived columns (re)computed from the raw ones; see the module docstring.

    `base_params` None keeps an existing `params_pct_of_base`; `baselines` is the preference order of the
    ROI reference (run.json `train.baselines`).
    """
    frame = report.copy()
    if base_params:
        frame["params_pct_of_base"] = 100.0 * frame.trainable_params / float(base_params)
    elif "params_pct_of_base" not in frame:
        frame["params_pct_of_base"] = np.nan
    summary = [_allocation_summary(row) for row in frame.itertuples(index=False)]
    frame["num_adapted_modules"] = [s[0] for s in summary]
    frame["total_rank"] = [s[1] for s in summary]
    frame["adapters_per_type"] = pd.Series([s[2] for s in summary], index=frame.index, dtype="str")
    frame = frame.drop(columns=[c for c in frame.columns if c.startswith(GAIN_PREFIX)])
    labels = baseline_labels(frame, baselines)
    for label in labels:
        own = (frame.kind == "baseline") & (frame.label == label)
        reference = frame.loc[own, "accuracy"].mean()
        own_rows = frame.candidate_id.isin(frame.candidate_id[own])
        frame[gain_column(label)] = (100.0 * (frame.accuracy - reference)).where(~own_rows)
    if labels:
        gain = frame[gain_column(labels[0])]
        frame["roi_baseline"] = pd.Series(labels[0], index=frame.index, dtype="str")
        frame["roi_per_usd"] = gain / frame.cost_usd.where(frame.cost_usd > 0)
        frame["roi_per_mparams"] = gain / (frame.trainable_params.where(frame.trainable_params > 0) / 1e6)
    else:
        frame["roi_baseline"] = pd.Series(None, index=frame.index, dtype="str")
        frame["roi_per_usd"] = np.nan
        frame["roi_per_mparams"] = np.nan
    gains = [gain_column(label) for label in labels]
    rest = [c for c in frame.columns if c not in DERIVED_COLUMNS + gains + JSON_COLUMNS]
    return frame[rest + DERIVED_COLUMNS[:4] + gains + DERIVED_COLUMNS[4:] + [c for c in JSON_COLUMNS if c in frame]]


def build(trials: list[dict], proxy_scores: dict[str, dict[str, float]], compact: dict[str, str],
          majority_rate: float, *, base_params: int | None = None, baselines: list[str] | None = None,
          failed_charges: list[dict] = ()) -> pd.DataFrame:
    """One row per (model, seed): metrics from the trial files, proxy scores from the screen, derived ROI columns.

    `base_params` (run.json `base_params`) gives `params_pct_of_base`; `baselines` (the config's
    `train.baselines`) picks the ROI reference. `write` fills both from run.json when they are left out.
    Failed runs (rows without accuracy, from train.keep_failure) are left out of the table and named in
    `summary_lines` (through `DataFrame.attrs["failed"]`); `failed_charges` (the run's `failed_charges`: every failed
    training's, those retried since included) count in the run's cost (through `attrs["failed_charge"]`, see
    `failed_charge`); early-stopped runs stay, with their status.
    """
    frame = pd.DataFrame(trials)
    for column in CONTRACT_COLUMNS:
        if column not in frame:
            frame[column] = np.nan
    failed = frame[frame.accuracy.isna()]  # train.keep_failure rows: no metrics, left out and named in the summary
    frame = frame[frame.accuracy.notna()].copy()
    for column in ("trainable_params", "head_params", "seed"):
        if frame[column].notna().all() and frame[column].dtype.kind == "f":
            frame[column] = frame[column].astype("int64")
    if "ranks" in frame:
        frame["ranks_json"] = pd.Series([json.dumps(r, sort_keys=True) if isinstance(r, dict) else None
                                         for r in frame.ranks], index=frame.index, dtype="str")
    if "history" in frame:
        frame["history_json"] = pd.Series([h if isinstance(h, str) else json.dumps(h) if isinstance(h, list) else None
                                           for h in frame.history], index=frame.index, dtype="str")
    frame["allocation"] = frame.candidate_id.map(compact)
    if proxy_scores:
        proxies = pd.DataFrame.from_dict(proxy_scores, orient="index").add_prefix("proxy_")
        frame = frame.join(proxies, on="candidate_id")
    frame["beats_majority"] = frame.accuracy > majority_rate
    if (frame.kind == "routed").any():
        frame["adapter"] = [adapter_name(m, g) for m, g in zip(frame.method, frame.get("gating", frame.method))]
    extra = [c for c in frame.columns if c not in CONTRACT_COLUMNS and c not in ("ranks", "history")]
    order = selection_order(frame)
    frame = frame[CONTRACT_COLUMNS + extra].sort_values(["kind", *order], ascending=False, kind="stable")
    frame = add_derived(frame.reset_index(drop=True), base_params, baselines)
    if not failed.empty:
        errors = failed.get("error", pd.Series("", index=failed.index)).fillna("")
        frame.attrs["failed"] = [f"{cid}-s{int(seed)}" + (f" ({error})" if error else "") for cid, seed, error in
                                 zip(failed.candidate_id, failed.seed.fillna(-1), errors)]
    charged = {charge.get("job_id") for charge in failed_charges}
    # a failed trial file from before failures were charged has no charge: named in the summary, not charged
    untimed = [cid for cid, seed in zip(failed.candidate_id, failed.seed.fillna(-1))
               if f"{cid}-s{int(seed)}" not in charged]
    if failed_charges or untimed:
        frame.attrs["failed_charge"] = {"runs": len(failed_charges) + len(untimed), "untimed": len(untimed),
                                        **{key: float(sum(c[column] for c in failed_charges)) for key, column in
                                           (("seconds", "train_wall_s"), ("device_hours", "device_hours"),
                                            ("cost_usd", "cost_usd"))}}
    return frame


FAILED_CHARGES = "failed"  # trials/failed/<job>.<attempt>.json: each failed training's charge (train.keep_failure)


def failed_charges(run_dir: str | Path) -> list[dict]:
    """Every failed training's charge in a run, those retried since included (deleting a failed trial file to retry
    the model leaves its charge)."""
    ledger = Path(run_dir) / "trials" / FAILED_CHARGES
    return [read_stored(p, "job_id", types=TRIAL_TYPES) for p in sorted(ledger.glob("*.json"))]


def failed_charge(report: pd.DataFrame) -> dict:
    """The failed trainings' runs, untimed runs, seconds, device-hours and dollars (zeros without any): they left
    no row, but the epochs they finished held devices, so the run's cost counts them."""
    return report.attrs.get("failed_charge") or {"runs": 0, "untimed": 0, "seconds": 0.0, "device_hours": 0.0,
                                                 "cost_usd": 0.0}


# ---------------------------------------------------------------- statistics


def pareto_front(df: pd.DataFrame, x: str, y: str = "accuracy") -> pd.Series:
    """Boolean mask of the rows no other row dominates (x ≤ and y ≥, one of them strictly): maximise y, minimise x.

    Identical points are all on the front; rows with NaN in x or y are never on it.
    """
    xs, ys = df[x].to_numpy(dtype=float), df[y].to_numpy(dtype=float)
    valid = ~(np.isnan(xs) | np.isnan(ys))
    mask = np.zeros(len(df), dtype=bool)
    for i in np.flatnonzero(valid):
        others = valid & (xs <= xs[i]) & (ys >= ys[i]) & ((xs < xs[i]) | (ys > ys[i]))
        mask[i] = not others.any()
    return pd.Series(mask, index=df.index, name=f"{PARETO_PREFIX}{x}")


def welch_p(a, b) -> float:
    """Two-sided Welch t-test p-value; NaN unless both samples have ≥ 2 values.

    Two samples without any spread (every seed the same accuracy, as a small eval set can give) have no variance to
    test against: the same constant gives 1 (no difference at all), two different constants NaN, where scipy's
    infinite t would claim p = 0 from two seeds."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    a, b = a[~np.isnan(a)], b[~np.isnan(b)]
    if len(a) < 2 or len(b) < 2:
        return float("nan")
    if np.ptp(a) == 0 and np.ptp(b) == 0:
        return 1.0 if a[0] == b[0] else float("nan")
    from scipy.stats import ttest_ind

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(ttest_ind(a, b, equal_var=False).pvalue)


def p_text(p: float, seeds: int, base_seeds: int) -> str:
    """Welch p as a sentence says it: the value, or why there is none (too few seeds, or no spread over them)."""
    if not math.isnan(p):
        return f"Welch p = {p:.3g}"
    if min(seeds, base_seeds) < 2:
        return "Welch p needs ≥ 2 seeds of both"
    return "Welch p undefined: no spread over seeds"  # both constant, different: see welch_p


_SPREAD = {"f1": "f1", "eval_loss": "eval_loss", "cost_usd": "cost_usd_mean", "device_hours": "device_hours_mean",
           "peak_memory_mb": "peak_memory_mb", "val_accuracy": "val_accuracy",
           "val_f1": "val_f1"}  # column → its mean in `aggregate` (std: <name>_std)


def selection_column(frame: pd.DataFrame) -> str:
    """What ranks models: `val_accuracy` in a run with data.validation_size (the eval split then only measures),
    else `accuracy`. Per seed or aggregated alike."""
    return "val_accuracy" if "val_accuracy" in frame and frame.val_accuracy.notna().any() else "accuracy"


def selection_order(frame: pd.DataFrame) -> list[str]:
    """Sort keys, best first: the selection column, and on validation its F1 to break ties (a tie left to the
    stable order would fall back to the eval split's)."""
    column = selection_column(frame)
    return [column, "val_f1"] if column == "val_accuracy" and "val_f1" in frame else [column]


def ranked(frame: pd.DataFrame, by: str = "candidate_id") -> pd.Index:
    """The `by` values of the frame's models, best first by the mean over seeds of selection_order, as `aggregate`
    ranks them (the registry's default pick and --warm-start use it on report rows)."""
    order = selection_order(frame)
    return frame.groupby(by, sort=False)[order].mean().sort_values(order, ascending=False, kind="stable").index


def aggregate(report: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds per model, gains, Welch p-values, ROI and Pareto membership.

    Sorted by `selection_order` (best first), so row 0 of the searched rows is the run's best searched model.
    `accuracy`, `f1`, `eval_loss`, `peak_memory_mb`, `val_accuracy` are means with a `_std` column beside them;
    `cost_usd` and `device_hours` are totals over seeds, `cost_usd_mean`/`_std` and
    `device_hours_mean`/`_std` per seed. `roi_per_usd` = gain_vs_<roi_baseline> / cost_usd_mean and
    `roi_per_mparams` = gain_vs_<roi_baseline> / (trainable_params / 10⁶), with mean gains. `trainable_params` is
    the mean over seeds, rounded: a dynamic model keeps a different count per seed.
    """
    keys = ["candidate_id", "kind", "label", "allocation"]
    grouped = report.groupby(keys, sort=False, dropna=False)
    table = grouped.agg(trainable_params=("trainable_params", "mean"), accuracy=("accuracy", "mean"),
                        accuracy_std=("accuracy", "std"), f1=("f1", "mean"), seeds=("seed", "nunique"),
                        cost_usd=("cost_usd", "sum"), device_hours=("device_hours", "sum"))
    table["trainable_params"] = table.trainable_params.round().astype("int64")
    extra = {}
    for column, mean in _SPREAD.items():
        if column in report:
            if mean != "f1":
                extra[mean] = (column, "mean")
            extra[mean.removesuffix("_mean") + "_std"] = (column, "std")
    for column in report.columns:
        if column in ("params_pct_of_base", "num_adapted_modules", "total_rank", "adapters_per_type", "roi_baseline", "lr") \
                or column.startswith("proxy_"):
            extra[column] = (column, "first")
        elif column.startswith(GAIN_PREFIX):
            extra[column] = (column, "mean")
    if extra:
        table = table.join(grouped.agg(**extra))
    table = table.reset_index()
    labels = baseline_labels(report)
    for label in labels:
        base_ids = set(report.loc[(report.kind == "baseline") & (report.label == label), "candidate_id"])
        reference = report.loc[report.candidate_id.isin(base_ids), "accuracy"]
        table[p_column(label)] = [float("nan") if cid in base_ids else
                                  welch_p(report.loc[report.candidate_id == cid, "accuracy"], reference)
                                  for cid in table.candidate_id]
    if "roi_baseline" in table and labels and gain_column(labels[0]) in table:
        gain = table[gain_column(labels[0])]
        cost = table.get("cost_usd_mean", table.cost_usd / table.seeds)
        table["roi_per_usd"] = gain / cost.where(cost > 0)
        table["roi_per_mparams"] = gain / (table.trainable_params.where(table.trainable_params > 0) / 1e6)
    pareto_x = {"trainable_params": "trainable_params", "cost_usd": "cost_usd_mean", "peak_memory_mb": "peak_memory_mb"}
    for name, column in pareto_x.items():
        if column in table:
            table[PARETO_PREFIX + name] = pareto_front(table, column).to_numpy()
    return table.sort_values(selection_order(table), ascending=False, kind="stable").reset_index(drop=True)


def proxy_correlations(report: pd.DataFrame) -> pd.DataFrame:
    """Spearman ρ (and its p-value) of each proxy vs mean accuracy over the trained models.

    Routed models are left out: each has its plain allocation's scores, so counting it would count that allocation
    again. NaN when fewer than 3 distinct models were trained or a proxy is constant over them.
    """
    proxies = [c for c in report.columns if c.startswith("proxy_")]
    models = report[report.kind != "routed"].groupby("candidate_id", sort=False).agg(
        accuracy=("accuracy", "mean"), **{p: (p, "first") for p in proxies})
    rows = []
    for proxy in proxies:
        part = models[[proxy, "accuracy"]].dropna()
        rho = p_value = float("nan")
        if len(part) >= 3 and part[proxy].nunique() > 1 and part.accuracy.nunique() > 1:
            from scipy.stats import spearmanr

            result = spearmanr(part[proxy], part.accuracy)
            rho, p_value = float(result.statistic), float(result.pvalue)
        rows.append({"proxy": proxy.removeprefix("proxy_"), "spearman_rho": rho, "p_value": p_value, "models": len(part)})
    return pd.DataFrame(rows, columns=["proxy", "spearman_rho", "p_value", "models"])


def _parse_time(text) -> float | None:
    try:
        return datetime.strptime(str(text), "%Y-%m-%dT%H:%M:%S%z").timestamp() if text else None  # offset kept
    except ValueError:
        return None


# run.json key of a stage of short trainings before the training stage → (prefix of its cost_breakdown keys, its row in
# cost_table, how the summary line counts its trainings)
PRE_TRAINING_STAGES = {"calibration": ("calibrate", "calibrate (short trainings)", "calibration: {} short trainings"),
                       "lr_sweep": ("lr_sweep", "tune lr (each model × lr, first seed)", "lr sweep: {} trainings")}


def cost_breakdown(report: pd.DataFrame, run_info: dict | None = None, module_scores: dict | None = None,
                   screen: pd.DataFrame | None = None) -> dict:
    """Screening vs training: seconds, device-hours and dollars of each stage, and compute-to-best.

    Screening cost is the proxy probe (module_scores.json `seconds`, plus its `warmup_seconds` with
    screen.probe_warmup_steps > 0: the shared probe adapter trains before the proxies score; one Ray task on 1 CPU,
    priced at the CPU device-hour price); the Tune screen trials only sum per-module scores (milliseconds) and are not
    counted. A calibrated screen (run.json `calibration`) and a learning-rate sweep (run.json `lr_sweep`) add their
    trainings as stages of their own. `compute_to_best_s` = probe seconds + calibration seconds + the best searched
    model's lr-sweep seconds + its training wall seconds (its first seed): the compute to obtain it had it been the
    only model trained (NaN without a searched model). `total_cost_usd` and `total_device_hours` add up every stage,
    the failed trainings' (`failed_*`, see `failed_charge`) included; `train_*` are the report's rows alone.
    """
    run_info = run_info or {}
    price = run_info.get("config", {}).get("cost", {}).get("price_per_device_hour", {}).get("cpu", float("nan"))
    probe = {k: float(v) for k, v in ((module_scores or {}).get("seconds") or {}).items()}
    warmup_s = float((module_scores or {}).get("warmup_seconds") or 0.0)  # once, shared by every proxy
    probe_s = sum(probe.values()) + warmup_s if probe else float("nan")
    screen_dh = probe_s / 3600.0
    # min_count=1: when no trial recorded a cost, training cost is unknown (NaN), not $0
    train_cost, train_dh = float(report.cost_usd.sum(min_count=1)), float(report.device_hours.sum(min_count=1))
    screen_cost = screen_dh * float(price)
    before = {}
    for key, (prefix, _, _) in PRE_TRAINING_STAGES.items():
        stage = run_info.get(key) or {}
        before |= {f"{prefix}_runs": int(stage.get("trainings", 0)), f"{prefix}_seconds": float(stage.get("seconds", 0.0)),
                   f"{prefix}_device_hours": float(stage.get("device_hours", 0.0)),
                   f"{prefix}_cost_usd": float(stage.get("cost_usd", 0.0))}

    def every_stage(unit: str, screen: float, train: float) -> float:  # a screen without a probe or price adds 0
        before_training = sum(before[f"{prefix}_{unit}"] for prefix, _, _ in PRE_TRAINING_STAGES.values())
        return (0.0 if math.isnan(screen) else screen) + before_training + train

    failed = failed_charge(report)
    total = every_stage("cost_usd", screen_cost, train_cost + failed["cost_usd"])
    total_dh = every_stage("device_hours", screen_dh, train_dh + failed["device_hours"])
    table = aggregate(report)
    searched = table[table.kind == "searched"]
    best_wall, best_sweep_s = float("nan"), 0.0
    if not searched.empty:
        best_id = searched.iloc[0].candidate_id
        best_wall = float(report[report.candidate_id == best_id].sort_values("seed").train_wall_s.iloc[0])
        best_sweep_s = float(((run_info.get("lr_sweep") or {}).get("seconds_by_candidate") or {}).get(best_id, 0.0))
    return {
        "candidates_screened": int(len(screen)) if screen is not None else None,
        "survivors": int(screen.survivor.sum()) if screen is not None and "survivor" in screen else None,
        "probe_seconds": probe, "probe_warmup_seconds": warmup_s, "screen_seconds": probe_s,
        "screen_device_hours": screen_dh, "screen_cost_usd": screen_cost,
        **before,
        "models_trained": int(report.candidate_id.nunique()), "training_runs": int(len(report)),
        "train_seconds": float(report.train_wall_s.sum()), "train_device_hours": train_dh, "train_cost_usd": train_cost,
        **{f"failed_{key}": value for key, value in failed.items()},
        "total_cost_usd": total, "total_device_hours": total_dh,
        "screen_share_of_cost": screen_cost / total if total > 0 else float("nan"),
        "compute_to_best_s": (0.0 if math.isnan(probe_s) else probe_s) + before["calibrate_seconds"] + best_sweep_s + best_wall,
        **dict(zip(("run_wall_s", "run_sessions", "run_sessions_untimed"), run_wall_seconds(run_info))),
    }


def run_sessions(run_info: dict) -> list[dict]:
    """run.json's sessions (each start of the run and its finish); an older run.json: its one start and finish."""
    return run_info.get("sessions") or [run_info]


def run_wall_seconds(run_info: dict) -> tuple[float, int, int]:
    """(wall seconds summed over the run's timed sessions, sessions, sessions not timed): a resumed run has several
    sessions, and one its driver died in has a start but no finish. NaN when none was timed."""
    sessions = run_sessions(run_info)
    spans = [(_parse_time(s.get("started_at")), _parse_time(s.get("finished_at"))) for s in sessions]
    timed = [end - start for start, end in spans if start is not None and end is not None and end >= start]
    return (float(sum(timed)) if timed else float("nan")), len(spans), len(spans) - len(timed)


def cost_table(costs: dict) -> pd.DataFrame:
    rows = [{"stage": "screen (proxy probe)", "items": costs["candidates_screened"], "seconds": costs["screen_seconds"],
             "device_hours": costs["screen_device_hours"], "cost_usd": costs["screen_cost_usd"]}]
    for prefix, stage, _ in PRE_TRAINING_STAGES.values():
        if costs.get(f"{prefix}_runs"):
            rows.append({"stage": stage, "items": costs[f"{prefix}_runs"], "seconds": costs[f"{prefix}_seconds"],
                         "device_hours": costs[f"{prefix}_device_hours"], "cost_usd": costs[f"{prefix}_cost_usd"]})
    rows += [{"stage": "train", "items": costs["training_runs"], "seconds": costs["train_seconds"],
             "device_hours": costs["train_device_hours"], "cost_usd": costs["train_cost_usd"]}]
    if costs.get("failed_runs"):  # no model, no report row, but device time spent
        rows.append({"stage": "train: failed runs", "items": costs["failed_runs"], "seconds": costs["failed_seconds"],
                     "device_hours": costs["failed_device_hours"], "cost_usd": costs["failed_cost_usd"]})
    table = pd.DataFrame(rows)
    table["share_of_cost"] = table.cost_usd / costs["total_cost_usd"] if costs["total_cost_usd"] > 0 else np.nan
    return table


# ---------------------------------------------------------------- run context (what write reads beside the table)


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _stored_error(path: Path, problem: str) -> UserError:
    # run.json is the one stored file a resumed run cannot write again: it records what the run was
    fix = ("restore it from a backup (a run cannot be resumed without it)" if path.name == "run.json" else
           "delete it and run `lora-search run ... --resume`, which computes it again")
    return UserError(f"report: '{path}' {problem}; {fix}")


_KINDS = {"number": (int, float), "mapping": dict}  # read_stored's `types`: what a stored value must be
RUN_TYPES = {"task.majority_rate": "number", "base_params": "number"}
MODULE_SCORES_TYPES = {"unit": "mapping", "seconds": "mapping", "warmup_seconds": "number"}
TRIAL_TYPES = {"ranks": "mapping", **dict.fromkeys(
    ["seed", "accuracy", "f1", "eval_loss", "trainable_params", "peak_memory_mb", "train_wall_s", "device_hours",
     "cost_usd"], "number")}


def _stored_value(data, key: str):
    for part in key.split("."):
        data = data.get(part) if isinstance(data, (dict, pd.DataFrame)) else None
    return data


def read_stored(path: Path, *keys: str, types: dict[str, str] | None = None) -> dict | pd.DataFrame:
    """A JSON object (a table for .csv) the run stored, holding `keys` (dotted for nested ones: task.majority_rate).

    A UserError names the file and the fix when it cannot be read, lacks a key, or holds a value of another kind than
    `types` says ({key: "number" or "mapping"}; a key absent or null passes there): a hand-edited `"0.5"` would
    otherwise fail deep in pandas with a traceback."""
    path = Path(path)
    try:
        data = pd.read_csv(path) if path.suffix == ".csv" else json.loads(path.read_text())
    except (OSError, ValueError) as err:  # JSONDecodeError, UnicodeDecodeError, pandas' EmptyDataError: ValueErrors
        raise _stored_error(path, f"cannot be read ({err})") from None
    for key in keys:
        if _stored_value(data, key) is None:
            raise _stored_error(path, f"has no '{key}'")
    for key, kind in (types or {}).items():
        value = _stored_value(data, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, _KINDS[kind])):
            shown = json.dumps(value)
            shown = shown if len(shown) <= 40 else shown[:37] + "..."
            raise _stored_error(path, f"has '{key}' = {shown}, not a {kind}")
    return data


def run_context(run_dir: Path | None, report: pd.DataFrame) -> dict:
    """run.json, module_scores.json and screen.csv of `run_dir` (each optional) and the cost breakdown."""
    run_info = _read_json(Path(run_dir) / "run.json") if run_dir else None
    scores = _read_json(Path(run_dir) / "module_scores.json") if run_dir else None
    screen = None
    if run_dir and (Path(run_dir) / "screen.csv").is_file():
        screen = read_stored(Path(run_dir) / "screen.csv")
    config = (run_info or {}).get("config", {})
    return {"run": run_info or {}, "name": config.get("name") or (Path(run_dir).name if run_dir else None),
            "task": (run_info or {}).get("task", {}), "model": config.get("model", {}).get("name"),
            "baselines": config.get("train", {}).get("baselines"), "base_params": (run_info or {}).get("base_params"),
            "module_types": config.get("space", {}).get("module_types"),
            "costs": cost_breakdown(report, run_info, scores, screen)}


# ---------------------------------------------------------------- text: summary, Markdown, HTML


def _pm(mean, std, scale=1.0, fmt=".2f", missing="", shape="{}") -> str:
    """`mean ± std`, scaled and formatted, put in `shape` (e.g. "${}"); `missing` when the mean is NaN or None."""
    if mean is None or pd.isna(mean):
        return missing
    text = format(scale * mean, fmt)
    return shape.format(text if std is None or pd.isna(std) else f"{text} ± {format(scale * std, fmt)}")


def _say(value, fmt: str, shape: str = "{}", scale: float = 1.0) -> str:
    """A number in a sentence: NA for NaN (a zero price or an unrecorded cost), never `nan`."""
    return _pm(value, None, scale, fmt, NA, shape)


def summary_lines(report: pd.DataFrame, majority_rate: float) -> list[str]:
    table = aggregate(report)
    searched, baselines = table[table.kind == "searched"], table[table.kind == "baseline"]
    lines = [f"Majority-class accuracy (the floor): {majority_rate:.4f}"]
    if report.attrs.get("unfinished"):
        lines.insert(0, f"WARNING: the run is unfinished: this report holds the {len(report)} training run(s) done so "
                        "far; `lora-search run <config> --resume` trains the rest")
    if not searched.empty:
        best = searched.iloc[0]
        chosen = "" if selection_column(table) == "accuracy" else f" (chosen on validation accuracy {best.val_accuracy:.4f})"
        lines.append(f"Best searched: {best.candidate_id} accuracy {best.accuracy:.4f} with {best.trainable_params:,} "
                     f"LoRA params ({best.allocation}){chosen}")
        for _, base in baselines.iterrows():
            lines.append(f"Gain over {base.label} ({base.accuracy:.4f}, {base.trainable_params:,} params): "
                         f"{100 * (best.accuracy - base.accuracy):+.2f} points")
    failed = failed_charge(report)
    lines.append(f"Training cost: {_say(report.device_hours.sum(min_count=1) + failed['device_hours'], '.4f')} "
                 f"device-hours, {_say(report.cost_usd.sum(min_count=1) + failed['cost_usd'], '.4f', '${}')}"  # n/a, not $0
                 + _failed_cost_note(failed))
    setups = report["kernels"].dropna().unique().tolist() if "kernels" in report else []  # older trials lack it
    if len(setups) == 1:
        lines.append(f"Trained on: {setups[0]}")
    elif setups:  # README "Reproducibility": a seed repeats bit for bit only on the same setup
        lines.append(f"Trained on {len(setups)} kernel setups (a seed's last bits may differ between them): "
                     f"{'; '.join(setups)}")
    losers = report.loc[~report.beats_majority.astype(bool), "candidate_id"].unique().tolist()
    if losers:
        lines.append(f"WARNING: {len(losers)} model(s) do not beat the majority class: {', '.join(losers)}")
    failed = report.attrs.get("failed") or []
    if failed:
        lines.append(f"WARNING: {len(failed)} training run(s) failed and are left out: {'; '.join(failed)}")
    return lines


def _failed_cost_note(failed: dict) -> str:
    """What the training cost holds of the failed runs, and which of them it cannot charge."""
    timed = failed["runs"] - failed["untimed"]
    note = (f", {timed} failed run(s) included ({failed['device_hours']:.4f} device-hours, "
            f"{_say(failed['cost_usd'], '.4f', '${}')})") if timed else ""
    if failed["untimed"]:
        note += (f"; {failed['untimed']} failed run(s) recorded no device time (trial files from before failed "
                 "trainings were charged) and are not charged")
    return note


def roi_lines(report: pd.DataFrame, context: dict | None = None) -> list[str]:
    """ROI, significance, proxy ρ, Pareto fronts and screening vs training cost, one line each."""
    report = report if "roi_baseline" in report else add_derived(report)
    table = aggregate(report)
    labels = baseline_labels(report)
    lines = []
    searched = table[table.kind == "searched"]
    if labels and not searched.empty:
        best, primary = searched.iloc[0], labels[0]
        base_seeds = int(report.loc[(report.kind == "baseline") & (report.label == primary), "accuracy"].count())
        p = p_text(best.get(p_column(primary), float("nan")), int(best.seeds), base_seeds)
        lines.append(f"ROI of the best searched vs {primary}: {_say(best[gain_column(primary)], '+.2f')} points, "
                     f"{_say(best.roi_per_usd, '+.4g')} points per $ of training, "
                     f"{_say(best.roi_per_mparams, '+.4g')} points per M params ({p})")
    rho = proxy_correlations(report)
    if not rho.empty:
        parts = [f"{r.proxy} {r.spearman_rho:+.2f}" if not math.isnan(r.spearman_rho) else f"{r.proxy} n/a"
                 for r in rho.itertuples()]
        lines.append(f"Spearman ρ of proxy vs accuracy over {int(rho.models.max())} models: {', '.join(parts)}")
    fronts = []
    for x, title in PARETO_AXES.items():
        column = PARETO_PREFIX + x
        if column in table:
            fronts.append(f"{title.split(' (')[0]}: {', '.join(table.loc[table[column], 'label'])}")
    if fronts:
        lines.append("Pareto front (max accuracy, min x): " + "; ".join(fronts))
    costs = (context or {}).get("costs")
    if costs and not math.isnan(costs["screen_seconds"]):
        warmup_s, to_best_s = costs.get("probe_warmup_seconds"), costs["compute_to_best_s"]
        warmup = f", its {warmup_s:.1f} s warm-up included" if warmup_s else ""
        to_best = "" if math.isnan(to_best_s) else f"; compute to best searched {to_best_s:.0f} s"  # no searched model
        lines.append(f"Screening: {costs['candidates_screened'] or 0} candidates from a "
                     f"{costs['screen_seconds']:.1f} s probe{warmup} ({_say(costs['screen_cost_usd'], '.5f', '${}')}, "
                     f"{_say(costs['screen_share_of_cost'], '.1f', '{}%', 100)} of cost); "
                     + "".join(f"{counted.format(costs[f'{prefix}_runs'])}, {costs[f'{prefix}_seconds']:.0f} s "
                               f"({_say(costs[f'{prefix}_cost_usd'], '.4f', '${}')}); "
                               for prefix, _, counted in PRE_TRAINING_STAGES.values() if costs.get(f"{prefix}_runs"))
                     + f"training: {costs['training_runs']} runs, "
                     f"{costs['train_seconds']:.0f} s ({_say(costs['train_cost_usd'], '.4f', '${}')})"
                     + (f", {costs['failed_runs']} failed, {costs['failed_seconds']:.0f} s "
                        f"({_say(costs['failed_cost_usd'], '.4f', '${}')})" if costs.get("failed_runs") else "")
                     + to_best)
    return lines


def own_learning_rates(table: pd.DataFrame) -> bool:
    """Whether the models trained at different learning rates (train.lr_grid picked each model's own)."""
    return table.get("lr", pd.Series(dtype=float)).nunique() > 1


def models_table(report: pd.DataFrame) -> pd.DataFrame:
    """The aggregated table formatted for reading (strings with mean ± std)."""
    table = aggregate(report if "roi_baseline" in report else add_derived(report))
    labels = baseline_labels(report)
    out = pd.DataFrame({
        "model": table.label + " · " + table.candidate_id, "kind": table.kind, "seeds": table.seeds,
        "params": table.trainable_params.map(lambda v: f"{v:,}")})
    if table.get("params_pct_of_base", pd.Series(dtype=float)).notna().any():
        out["% of base"] = table.params_pct_of_base.map(lambda v: f"{v:.3f}")
    out["adapters"] = table.get("adapters_per_type", "")
    if own_learning_rates(table):
        out["lr"] = table.lr.map(lambda v: f"{v:g}")
    out["accuracy %"] = [_pm(m, s, 100) for m, s in zip(table.accuracy, table.accuracy_std)]
    if selection_column(table) == "val_accuracy":
        out["validation %"] = [_pm(m, s, 100) for m, s in zip(table.val_accuracy, table.val_accuracy_std)]
    out["F1 %"] = [_pm(m, s, 100) for m, s in zip(table.f1, table.get("f1_std", [None] * len(table)))]
    if "eval_loss" in table:
        out["eval loss"] = [_pm(m, s, 1, ".4f") for m, s in zip(table.eval_loss, table.eval_loss_std)]
    if "cost_usd_mean" in table:
        out["cost $ / seed"] = [_pm(m, s, 1, ".5f") for m, s in zip(table.cost_usd_mean, table.cost_usd_std)]
        out["device-h / seed"] = [_pm(m, s, 1, ".4f") for m, s in zip(table.device_hours_mean, table.device_hours_std)]
    if "peak_memory_mb" in table:
        out["peak MiB"] = [_pm(m, s, 1, ".0f") for m, s in zip(table.peak_memory_mb, table.peak_memory_mb_std)]
    for label in labels:
        out[f"gain vs {label} (pts)"] = table[gain_column(label)].map(lambda v: "" if math.isnan(v) else f"{v:+.2f}")
        out[f"p vs {label}"] = table[p_column(label)].map(lambda v: "" if math.isnan(v) else f"{v:.3g}")
    if labels:
        out["ROI pts/$"] = table.roi_per_usd.map(lambda v: "" if math.isnan(v) else f"{v:+.4g}")
        out["ROI pts/M params"] = table.roi_per_mparams.map(lambda v: "" if math.isnan(v) else f"{v:+.4g}")
    marks = {"trainable_params": "P", "cost_usd": "C", "peak_memory_mb": "M"}
    if any(PARETO_PREFIX + x in table for x in marks):
        out["Pareto"] = ["".join(m for x, m in marks.items() if row.get(PARETO_PREFIX + x, False))
                         for _, row in table.iterrows()]
    return out


def adapter_name(method, gating) -> str:
    """plain (PEFT LoRA), sparse top-k or dense (routed experts), else the method (adalora, dynamic)."""
    if method == "routed":
        return "sparse top-k" if gating == "topk" else "dense"
    return "plain" if method == "lora" or pd.isna(method) else str(method)


def routing_table(report: pd.DataFrame) -> pd.DataFrame:
    """Per allocation that was also routed: plain LoRA, sparse top-k and dense experts side by side (seed means)."""
    routed = report[report.kind == "routed"]
    rows = report[report.allocation.isin(routed.allocation) & report.kind.isin(["searched", "routed"])
                  & report.adapter.isin(["plain", "sparse top-k", "dense"])]
    numbers = ["trainable_params", "accuracy", "f1", "train_wall_s"] + ROUTING_COLUMNS[2:]
    rows = rows.assign(**{c: np.nan for c in numbers if c not in rows})  # e.g. trials of an older version
    grouped = rows.groupby(["allocation", "candidate_id", "label", "adapter"], sort=False)
    table = grouped[numbers].mean().join(grouped.agg(accuracy_std=("accuracy", "std"), seeds=("seed", "nunique"),
                                                     experts=("experts", "first"))).reset_index()
    plain = table[table.adapter == "plain"].groupby("allocation").trainable_params.first()
    table["order"] = table.adapter.map({"plain": 0, "sparse top-k": 1, "dense": 2})
    table = table.sort_values(["allocation", "order", "experts"], kind="stable")
    fmt = lambda column, spec: table[column].map(lambda v: "" if pd.isna(v) else format(v, spec))  # noqa: E731
    pair = lambda a, b: (fmt(a, ".1f") + " / " + fmt(b, ".1f")).str.strip(" /")  # noqa: E731
    return pd.DataFrame({
        "model": table.label + " · " + table.candidate_id, "adapter": table.adapter,
        "E": table.experts.map(lambda v: "" if pd.isna(v) or v == 0 else str(int(v))), "seeds": table.seeds,
        "params": fmt("trainable_params", ",.0f"),
        "vs plain": (table.trainable_params / table.allocation.map(plain)).map(lambda v: "" if pd.isna(v) else f"{v:.3f}"),
        "accuracy %": [_pm(m, s, 100) for m, s in zip(table.accuracy, table.accuracy_std)],
        "F1 %": (100 * table.f1).map(lambda v: f"{v:.2f}"), "train s": fmt("train_wall_s", ".1f"),
        "sites": fmt("routed_modules", ".0f"), "router params": fmt("router_params", ",.0f"),
        "latency ms mean / p95": pair("latency_ms_mean", "latency_ms_p95"),
        "CPU ms mean / p95": pair("latency_cpu_ms_mean", "latency_cpu_ms_p95"),
        "peak infer MiB": fmt("peak_infer_mem_mb", ".1f"), "experts active": fmt("fraction_active", ".3f"),
        "router entropy": fmt("router_entropy", ".3f")})


def rows_table(report: pd.DataFrame) -> pd.DataFrame:
    routed = (report.kind == "routed").any()  # other runs' trials carry experts=0: an all-zero column
    shown = ["candidate_id", "kind", "label", "seed", "trainable_params", "params_pct_of_base", "adapters_per_type", "lr",
             "accuracy", "f1", "eval_loss", "peak_memory_mb", "train_wall_s", "cost_usd"]
    shown += ROUTING_COLUMNS if routed else []
    shown += [c for c in report.columns if c.startswith(GAIN_PREFIX)] + ["roi_per_usd", "roi_per_mparams"]
    shown += [c for c in report.columns if c.startswith("proxy_")]
    return report[[c for c in shown if c in report.columns]]


def _sections(report: pd.DataFrame, majority_rate: float, context: dict | None, plots: list[str]) -> list[tuple]:
    """The report as ordered (kind, payload) blocks, rendered by `markdown` and `html`."""
    context = context or {}
    report = report if "roi_baseline" in report else add_derived(report)
    title = "lora-search report" + (f": {context['name']}" if context.get("name") else "")
    blocks: list[tuple] = [("h1", title)]
    task = context.get("task") or {}
    if task:
        validation = f" / {task['validation_examples']} validation" if task.get("validation_examples") else ""
        blocks.append(("p", f"Task `{task.get('task')}` ({task.get('train_examples')} train{validation} / "
                            f"{task.get('eval_examples')} eval examples), model `{context.get('model')}`, "
                            f"seeds {sorted(report.seed.unique().tolist())}."))
    blocks.append(("list", summary_lines(report, majority_rate) + roi_lines(report, context)))
    blocks += [("h2", "Models (mean ± std over seeds)"), ("table", models_table(report)),
               ("p", "Gains are in accuracy points. ROI pts/$ = gain over the ROI baseline ÷ training cost per seed; "
                     "ROI pts/M params = gain ÷ million trainable LoRA params; p = Welch t-test over seeds (blank with "
                     "< 2 seeds of either, and where neither model's accuracy varies over its seeds but the two differ: "
                     "no spread, no test; 1 where both are the same constant). "
                     "Pareto: on the front of max accuracy vs min P(arams), C(ost), M(emory).")]
    if "adapter" in report and (report.kind == "routed").any():
        blocks += [("h2", "Sparse vs dense vs plain LoRA"), ("table", routing_table(report)),
                   ("p", "Each searched survivor trained three ways at its adapted modules: plain LoRA, routed LoRA "
                         "experts with the top-k per input active (sparse), and the same experts all active with softmax "
                         "weights (dense). Experts + routers stay at or under the plain model's parameter count (vs plain). "
                         "Sites: routed modules (where E rank-1 experts and a router do not fit, the lowest-rank modules "
                         "stay unadapted). Latency: forward time per eval batch, wall clock and this process's CPU time "
                         "(steadier on a shared machine); train s is wall clock. Peak infer MB: peak memory of the eval "
                         "pass above its start; experts active: fraction of a module's experts used per input; "
                         "router entropy in nats (log E is uniform).")]
    rho = proxy_correlations(report)
    if not rho.empty:
        blocks += [("h2", "Proxies vs accuracy"), ("table", rho),
                   ("p", "Signed Spearman ρ over the trained models, routed ones aside (they share their allocation's "
                         "proxy scores; NaN with fewer than 3). A negative ρ means the "
                         "proxy ranks allocations backwards on this task: set `screen.direction` accordingly.")]
    costs = context.get("costs")
    if costs:
        blocks += [("h2", "Screening vs training cost"), ("table", cost_table(costs))]
        notes = [] if math.isnan(costs["compute_to_best_s"]) else [  # no searched model finished: no best
            f"Compute to the best searched model: {costs['compute_to_best_s']:.1f} s (probe, calibration and its lr "
            "sweep where the run had them, and its training)."]
        if costs.get("probe_warmup_seconds"):
            notes.append(f"The screen's {costs['screen_seconds']:.1f} s include the probe's "
                         f"{costs['probe_warmup_seconds']:.1f} s warm-up (screen.probe_warmup_steps).")
        if not math.isnan(costs["run_wall_s"]):
            resumed = f", over {costs['run_sessions']} sessions (the run was resumed)" if costs["run_sessions"] > 1 else ""
            untimed = f"; {costs['run_sessions_untimed']} stopped before finishing (not timed)" if costs["run_sessions_untimed"] else ""
            notes.append(f"Run wall time: {costs['run_wall_s']:.0f} s{resumed}{untimed}.")
        if notes:
            blocks.append(("p", " ".join(notes)))
    blocks.append(("h2", "Plots"))
    for name in plots:
        blocks.append(("img", (name, PLOTS.get(name, name))))
    blocks += [("h2", "Every trained model and seed"), ("table", rows_table(report)), ("h2", "Allocations"),
               ("list", [f"`{row.candidate_id}` ({row.kind}, {row.label}): `{row.allocation}`"
                         for row in report.drop_duplicates("candidate_id").itertuples()])]
    return blocks


def _default_plots(report: pd.DataFrame) -> list[str]:
    names = ["accuracy_vs_params.png", "accuracy_vs_cost.png", "allocation_heatmap.png"]
    if any(c.startswith("proxy_") for c in report.columns):
        names.append("proxy_vs_accuracy.png")
    if _histories(report):
        names.append("learning_curves.png")
    return names


def markdown(report: pd.DataFrame, majority_rate: float, context: dict | None = None,
             plots: list[str] | None = None) -> str:
    lines = []
    for kind, payload in _sections(report, majority_rate, context, _default_plots(report) if plots is None else plots):
        if kind == "h1":
            lines += [f"# {payload}", ""]
        elif kind == "h2":
            lines += [f"## {payload}", ""]
        elif kind == "p":
            lines += [payload, ""]
        elif kind == "list":
            lines += [f"- {item}" for item in payload] + [""]
        elif kind == "table":
            lines += [markdown_table(payload), ""]
        elif kind == "img":
            lines += [f"![{payload[1]}]({payload[0]})", ""]
    return "\n".join(lines)


def markdown_table(table: pd.DataFrame) -> str:
    """The table in Markdown, a number it cannot have (NaN: the std of one seed) blank rather than `nan`: NaN → None,
    which tabulate prints as its `missingval`."""
    return table.astype(object).where(table.notna(), None).to_markdown(index=False, floatfmt=".4g", missingval="")


_CSS = """body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1280px;margin:2em auto;padding:0 1em;color:#222}
h1{font-size:1.6em}h2{font-size:1.2em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
table{border-collapse:collapse;font-size:.82em;margin:.5em 0;display:block;overflow-x:auto}
th,td{border:1px solid #d0d0d0;padding:3px 7px;text-align:right;white-space:nowrap}th{background:#f3f3f3}
tr:nth-child(even) td{background:#fafafa}td:first-child,th:first-child{text-align:left}
figure{margin:1em 0}img{max-width:100%;border:1px solid #eee}figcaption{color:#555;font-size:.9em}
code{background:#f3f3f3;padding:0 3px}li{margin:.2em 0}"""


def _inline(text: str) -> str:
    return re.sub(r"`([^`]*)`", r"<code>\1</code>", html_lib.escape(text, quote=False))


def html(report: pd.DataFrame, majority_rate: float, context: dict | None = None, plots: list[str] | None = None,
         images: dict[str, bytes] | None = None) -> str:
    """A self-contained page: inline CSS, and each PNG of `images` (name → bytes) embedded, so the page can be mailed
    or moved alone; a plot without its bytes is linked by relative path."""
    body, title = [], "lora-search report"
    for kind, payload in _sections(report, majority_rate, context, _default_plots(report) if plots is None else plots):
        if kind == "h1":
            title = payload
            body.append(f"<h1>{html_lib.escape(payload)}</h1>")
        elif kind == "h2":
            body.append(f"<h2>{html_lib.escape(payload)}</h2>")
        elif kind == "p":
            body.append(f"<p>{_inline(payload)}</p>")
        elif kind == "list":
            body.append("<ul>" + "".join(f"<li>{_inline(item)}</li>" for item in payload) + "</ul>")
        elif kind == "table":
            body.append(payload.to_html(index=False, border=0, na_rep="", float_format=lambda v: f"{v:.4g}"))
        elif kind == "img":
            name, caption = payload
            source = (f"data:image/png;base64,{base64.b64encode(images[name]).decode()}" if images and name in images
                      else html_lib.escape(name))
            caption = html_lib.escape(caption)
            body.append(f'<figure><img src="{source}" alt="{caption}"><figcaption>{caption}</figcaption></figure>')
    return (f"<!doctype html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{html_lib.escape(title)}</title>"
            f"<style>{_CSS}</style></head>\n<body>\n" + "\n".join(body) + "\n</body></html>\n")


# ---------------------------------------------------------------- plots (matplotlib Figure objects: no pyplot state)


def figure(width: float, height: float, ncols: int = 1, nrows: int = 1, **kwargs):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=130, layout="constrained")
    return fig, fig.subplots(nrows, ncols, squeeze=False, **kwargs)


def save_png(fig, path: Path) -> None:
    write_atomic(path, lambda p: fig.savefig(p, format="png"))


def _color(kind: str) -> str:
    return {"baseline": BASELINE_COLOR, "routed": ROUTED_COLOR}.get(kind, SEARCHED_COLOR)


def _nz(values) -> np.ndarray:
    return np.nan_to_num(np.asarray(values, dtype=float), nan=0.0)


def _error_bars(ax, position, value, err, horizontal: bool) -> None:
    """± std whiskers only where std > 0 (a model with one seed gets none, not a zero-width cap)."""
    position, value, err = (np.asarray(v, dtype=float) for v in (position, value, err))
    keep = err > 0
    if keep.any():
        x, y = (value[keep], position[keep]) if horizontal else (position[keep], value[keep])
        ax.errorbar(x, y, **{"xerr" if horizontal else "yerr": err[keep]}, fmt="none", ecolor="black", capsize=3, lw=1.2)


LABEL_ABOVE, LABEL_BELOW, LABEL_BESIDE = 7, -13, -3  # vertical offsets of a point's label, in typographic points


def label_heights(xs: np.ndarray, ys: np.ndarray, near: float = 0.1) -> list[int]:
    """Vertical label offset per point: LABEL_ABOVE, LABEL_BELOW or LABEL_BESIDE.

    Points within `near` of the x range of each other are labelled by height (the highest above, the lowest
    below, any between beside), so no label sits next to the other point; a lone point alternates with its
    left neighbour in x order."""
    span = (np.nanmax(xs) - np.nanmin(xs)) or 1.0
    heights = [0] * len(xs)
    for i, k in enumerate(np.argsort(xs, kind="stable")):
        close = sorted((j for j in range(len(xs)) if abs(xs[j] - xs[k]) <= near * span), key=lambda j: ys[j])
        if len(close) < 2:
            heights[k] = LABEL_ABOVE if i % 2 == 0 else LABEL_BELOW
        else:
            heights[k] = LABEL_ABOVE if k == close[-1] else LABEL_BELOW if k == close[0] else LABEL_BESIDE
    return heights


def _annotate(ax, table: pd.DataFrame, x: str, y: pd.Series) -> None:
    """Label each model at its point (see label_heights); labels turn left near the right edge."""
    xs = table[x].to_numpy(dtype=float)
    lo, hi = np.nanmin(xs), np.nanmax(xs)
    heights = label_heights(xs, y.to_numpy(dtype=float))
    for k in range(len(table)):
        row = table.iloc[k]
        right = hi > lo and (xs[k] - lo) / (hi - lo) > 0.7
        gap = 13 if heights[k] == LABEL_BESIDE else 9  # beside: clear of the marker and the Pareto ring
        offset = (-gap if right else gap, heights[k])
        ax.annotate(row.label, (xs[k], y.iloc[k]), textcoords="offset points", xytext=offset,
                    ha="right" if right else "left", fontsize=8.5, color=_color(row.kind),
                    fontweight="bold" if row.kind == "baseline" else "normal")


def plot_accuracy_vs_params(report: pd.DataFrame, path: Path) -> None:
    """Pareto scatter: per-seed points (faint), model means ± std, baselines as labelled squares, the front drawn."""
    from matplotlib.ticker import FuncFormatter

    table = aggregate(report)
    fig, axes = figure(7.2, 4.6)
    ax = axes[0, 0]
    for kind, marker in KIND_MARKERS.items():
        seeds, part = report[report.kind == kind], table[table.kind == kind]
        if part.empty:  # e.g. a random-search run without baselines: no legend entry for what is not drawn
            continue
        ax.scatter(seeds.trainable_params, 100 * seeds.accuracy, marker=marker, color=_color(kind), alpha=0.25, s=18)
        ax.errorbar(part.trainable_params, 100 * part.accuracy, yerr=100 * _nz(part.accuracy_std), fmt=marker,
                    color=_color(kind), ms=8 if kind == "baseline" else 7, capsize=3, label=f"{kind} (mean ± std)")
    front = table[pareto_front(table, "trainable_params")].sort_values("trainable_params")
    if len(front):
        xs, ys = front.trainable_params.to_numpy(float), 100 * front.accuracy.to_numpy()
        ax.step(np.r_[xs, xs[-1]], np.r_[ys, ys[-1]], where="post", color=FRONT_COLOR, ls="--", lw=1.4, zorder=0,
                label="Pareto front (max accuracy, min params)")
        ax.scatter(xs, ys, s=190, facecolors="none", edgecolors=FRONT_COLOR, lw=1.5, zorder=3, label="on the front")
    _annotate(ax, table, "trainable_params", 100 * table.accuracy)
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v / 1e3:,.1f}k"))
    ax.margins(x=0.12, y=0.18)
    ax.set_xlabel("trainable LoRA parameters")
    ax.set_ylabel("eval accuracy (%)")
    ax.set_title("Accuracy vs trainable parameters")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    save_png(fig, path)


def plot_accuracy_vs_cost(report: pd.DataFrame, path: Path, majority_rate: float | None = None) -> None:
    """Two bar panels per model: accuracy (axis from the majority-class floor) and training cost per seed, ± std."""
    from matplotlib.ticker import FuncFormatter, MaxNLocator

    table = aggregate(report).iloc[::-1].reset_index(drop=True)  # best on top
    n = len(table)
    fig, axes = figure(9.0, 1.2 + 0.5 * n, ncols=2, sharey=True)
    left, right = axes[0]
    y = np.arange(n)
    colors = [_color(k) for k in table.kind]
    acc, acc_std = 100 * table.accuracy.to_numpy(), 100 * _nz(table.accuracy_std)
    floor = min(100 * majority_rate if majority_rate is not None else np.inf, np.nanmin(acc - acc_std)) - 2
    floor = max(0.0, math.floor(floor))
    left.barh(y, acc - floor, left=floor, color=colors, alpha=0.85, height=0.6)
    _error_bars(left, y, acc, acc_std, horizontal=True)
    for yi, value, std in zip(y, acc, acc_std):
        left.text(value + std + 0.2, yi, f"{value:.2f}", va="center", fontsize=8)
    if majority_rate is not None:
        left.axvline(100 * majority_rate, color="0.4", ls=":", lw=1)
        left.text(100 * majority_rate, n - 0.45, " majority class", fontsize=7.5, color="0.35", va="bottom")
    left.set_xlim(floor, np.nanmax(acc + acc_std) + 0.12 * (np.nanmax(acc + acc_std) - floor) + 0.5)
    left.set_xlabel("eval accuracy (%)" + (", axis from the majority-class rate" if majority_rate is not None else ""))
    cost = table.get("cost_usd_mean", table.cost_usd / table.seeds).to_numpy(float)
    cost_std = _nz(table.get("cost_usd_std", pd.Series(np.nan, index=table.index)))
    right.barh(y, cost, color=colors, alpha=0.85, height=0.6)
    _error_bars(right, y, cost, cost_std, horizontal=True)
    for yi, value, std in zip(y, cost, cost_std):
        right.text(value + std, yi, f" ${value:.3g}", va="center", fontsize=8)
    right.set_xlim(0, np.nanmax(cost + cost_std) * 1.35 if np.nanmax(cost) > 0 else 1)
    right.xaxis.set_major_locator(MaxNLocator(4))
    right.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"${v:.2g}" if v else "0"))
    right.set_xlabel("training cost per seed (USD)")
    left.set_yticks(y, [f"{r.label}\n{r.candidate_id}" for r in table.itertuples()], fontsize=8)
    for tick, kind in zip(left.get_yticklabels(), table.kind):
        tick.set_color(_color(kind))
    for ax in (left, right):
        ax.grid(axis="x", alpha=0.3)
    low, high = int(table.seeds.min()), int(table.seeds.max())
    seeds = f"{high} seed{'s' * (high > 1)} per model" if low == high else f"{low}–{high} seeds per model"
    fig.suptitle(f"Accuracy and training cost per model (mean ± std over seeds; {seeds})", fontsize=10.5)
    save_png(fig, path)


def _heatmap_models(report: pd.DataFrame) -> list:
    table = aggregate(report)
    chosen = list(table[table.kind == "searched"].head(1).itertuples()) + list(table[table.kind == "baseline"].itertuples())
    return chosen


def plot_allocation_heatmap(report: pd.DataFrame, path: Path, module_types: list[str] | None = None) -> None:
    """Layers × module types, colour = rank, for the best searched candidate and each baseline."""
    import matplotlib
    from matplotlib.colors import BoundaryNorm

    first = report.drop_duplicates("candidate_id").set_index("candidate_id")
    cells_of = {cid: allocation_cells(row.get("ranks_json"), row.get("allocation")) for cid, row in first.iterrows()}
    models = _heatmap_models(report)
    every = [cell for cells in cells_of.values() for cell in cells]
    types = ordered_types(set(module_types or []) | {t for _, t in every})
    layers = list(range(min((l for l, _ in every), default=0), max((l for l, _ in every), default=0) + 1))
    ranks = sorted({r for cells in cells_of.values() for r in cells.values()}) or [1]
    bounds = [ranks[0] - 0.5] + [(a + b) / 2 for a, b in zip(ranks, ranks[1:])] + [ranks[-1] + 0.5]
    cmap = matplotlib.colormaps["viridis"].resampled(max(len(ranks), 2)).with_extremes(bad="#eeeeee")
    norm = BoundaryNorm(bounds, cmap.N)
    fig, axes = figure(0.2 + 2.75 * max(len(models), 1), 1.9 + 0.42 * len(layers), ncols=max(len(models), 1))
    image = None
    for ax, row in zip(axes[0], models):
        cells = cells_of.get(row.candidate_id, {})
        grid = np.full((len(layers), len(types)), np.nan)
        for (layer, kind), rank in cells.items():
            grid[layers.index(layer), types.index(kind)] = rank
        image = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, norm=norm, aspect="auto")
        for (i, j), value in np.ndenumerate(grid):
            if not np.isnan(value):
                ax.text(j, i, f"{int(value)}", ha="center", va="center", fontsize=8,
                        color="white" if ranks.index(int(value)) < len(ranks) / 2 else "black")
        ax.set_xticks(range(len(types)), [TYPE_LABELS.get(t, t) for t in types], rotation=40, ha="right", fontsize=8)
        ax.set_yticks(range(len(layers)), [f"L{l}" for l in layers], fontsize=8)
        ax.set_xticks(np.arange(-0.5, len(types)), minor=True)
        ax.set_yticks(np.arange(-0.5, len(layers)), minor=True)
        ax.grid(which="minor", color="white", lw=1.5)
        ax.tick_params(which="minor", length=0)
        role = "best searched" if row.kind == "searched" else "baseline"
        ax.set_title(f"{role}: {row.label}\n{row.trainable_params:,} params · acc {100 * row.accuracy:.1f}%",
                     fontsize=9, color=_color(row.kind))
    if image is not None:
        bar = fig.colorbar(image, ax=list(axes[0]), ticks=ranks, shrink=0.9, pad=0.02, spacing="uniform")
        bar.set_label("LoRA rank (grey: no adapter)", fontsize=8)
    fig.suptitle("Allocation: rank per layer and module type", fontsize=10.5)
    save_png(fig, path)


def _histories(report: pd.DataFrame) -> dict[tuple[str, int], pd.DataFrame]:
    """(candidate, seed) → per-epoch metrics, only when some model recorded ≥ 2 epochs."""
    if "history_json" not in report:
        return {}
    found = {}
    for row in report.itertuples():
        if isinstance(row.history_json, str) and row.history_json:
            history = pd.DataFrame(json.loads(row.history_json))
            if not history.empty:
                if "epoch" not in history:
                    history["epoch"] = np.arange(1, len(history) + 1)
                found[(row.candidate_id, row.seed)] = history
    return found if any(len(h) >= 2 for h in found.values()) else {}


def plot_learning_curves(report: pd.DataFrame, path: Path) -> None:
    """Eval accuracy and loss per epoch, one line per model and seed (train loss and validation accuracy dashed)."""
    histories = _histories(report)
    fig, axes = figure(10.0, 4.0, ncols=2)
    left, right = axes[0]
    first = report.drop_duplicates("candidate_id").set_index("candidate_id")
    import matplotlib

    palette = matplotlib.colormaps["tab10"]
    order = {cid: i for i, cid in enumerate(first.index)}
    labelled = set()
    for (cid, seed), history in histories.items():
        color = palette(order[cid] % 10)
        name = f"{first.loc[cid, 'label']} · {cid}"
        label = None if cid in labelled else name
        labelled.add(cid)
        if "accuracy" in history:
            left.plot(history.epoch, 100 * history.accuracy, marker="o", color=color, label=label, alpha=0.9)
        if "val_accuracy" in history:
            left.plot(history.epoch, 100 * history.val_accuracy, ls="--", color=color, alpha=0.6)
        if "eval_loss" in history:
            right.plot(history.epoch, history.eval_loss, marker="o", color=color, alpha=0.9)
        if "train_loss" in history:
            right.plot(history.epoch, history.train_loss, ls="--", color=color, alpha=0.6)
    validated = any("val_accuracy" in history for history in histories.values())
    left.set(xlabel="epoch", ylabel="accuracy (%)", title="Accuracy (solid: eval, dashed: validation)" if validated
             else "Eval accuracy")
    right.set(xlabel="epoch", ylabel="loss", title="Loss (solid: eval, dashed: train)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
    left.legend(fontsize=7.5)
    save_png(fig, path)


def plot_proxy_vs_accuracy(report: pd.DataFrame, path: Path, rank_by: str | None = None,
                           direction: str | None = None) -> None:
    """One panel per proxy: its score vs mean accuracy ± std per trained model, Spearman ρ in the title.

    The proxy the screen ranked by (`rank_by`, with its `direction`) is marked in its panel's x label.
    """
    table = aggregate(report)
    proxies = [c for c in table.columns if c.startswith("proxy_")]
    rho = proxy_correlations(report).set_index("proxy")
    cols = min(3, max(1, len(proxies)))
    rows = max(1, math.ceil(len(proxies) / cols))
    fig, axes = figure(4.4 * cols + 0.3, 3.7 * rows, ncols=cols, nrows=rows)
    flat = list(axes.flat)
    for ax, proxy in zip(flat, proxies):
        name = proxy.removeprefix("proxy_")
        for kind, marker in KIND_MARKERS.items():
            part = table[table.kind == kind]
            if part.empty:  # no legend entry for a kind the run does not have
                continue
            ax.errorbar(part[proxy], 100 * part.accuracy, yerr=100 * _nz(part.accuracy_std), fmt=marker,
                        color=_color(kind), capsize=3, ms=7, label=kind)
        _annotate(ax, table, proxy, 100 * table.accuracy)
        r = rho.loc[name, "spearman_rho"] if name in rho.index else float("nan")
        title = (f"{name}: Spearman ρ = {r:+.2f} ({int(rho.loc[name, 'models'])} models)" if not math.isnan(r)
                 else f"{name}: ρ needs ≥ 3 models")
        if name == rank_by and direction:
            title += f"\nthe screen ranked by it ({direction})"
        ax.set_title(title, fontsize=9.5)
        ax.set_xlabel(f"proxy score ({name})")
        ax.set_ylabel("eval accuracy (%)")
        ax.ticklabel_format(axis="x", style="sci", scilimits=(-3, 5))
        ax.margins(x=0.15, y=0.2)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7.5)
    for ax in flat[len(proxies):]:
        ax.set_visible(False)
    fig.suptitle("Zero-cost proxy vs trained accuracy (one point per model, mean ± std over seeds)", fontsize=10.5)
    save_png(fig, path)


def write_plots(report: pd.DataFrame, run_dir: Path, majority_rate: float | None = None,
                module_types: list[str] | None = None, screen: dict | None = None) -> list[str]:
    """Every plot this report supports; returns the file names written (stale optional ones are removed)."""
    run_dir = Path(run_dir)
    names = _default_plots(report)
    plot_accuracy_vs_params(report, run_dir / "accuracy_vs_params.png")
    plot_accuracy_vs_cost(report, run_dir / "accuracy_vs_cost.png", majority_rate)
    plot_allocation_heatmap(report, run_dir / "allocation_heatmap.png", module_types)
    screen = screen or {}
    optional = {"proxy_vs_accuracy.png":
                lambda p: plot_proxy_vs_accuracy(report, p, screen.get("rank_by"), screen.get("direction")),
                "learning_curves.png": lambda p: plot_learning_curves(report, p)}
    for name, plot in optional.items():
        if name in names:
            plot(run_dir / name)
        else:
            (run_dir / name).unlink(missing_ok=True)  # a stale one from an earlier report
    return names


# ---------------------------------------------------------------- files


def write(report: pd.DataFrame, run_dir: Path, majority_rate: float) -> pd.DataFrame:
    """report.{parquet,csv,md,html} and the PNGs; run.json, module_scores.json, screen.csv are read when present.

    The derived columns are recomputed with run.json's `base_params` and `train.baselines`, so the
    caller may pass `build`'s table with or without them. Returns the table as written to Parquet.
    """
    run_dir = Path(run_dir)
    context = run_context(run_dir, report)
    report = add_derived(report, context["base_params"], context["baselines"])
    write_atomic(run_dir / "report.parquet", lambda p: report.to_parquet(p, index=False))
    flat = report.drop(columns=[c for c in JSON_COLUMNS if c in report])
    write_atomic(run_dir / "report.csv", lambda p: flat.to_csv(p, index=False))
    plots = write_plots(report, run_dir, majority_rate, context["module_types"], context["run"].get("config", {}).get("screen"))
    write_atomic(run_dir / "report.md", lambda p: Path(p).write_text(markdown(report, majority_rate, context, plots),
                                                                     encoding="utf-8"))
    images = {name: (run_dir / name).read_bytes() for name in plots if (run_dir / name).is_file()}
    write_atomic(run_dir / "report.html", lambda p: Path(p).write_text(html(report, majority_rate, context, plots, images),
                                                                       encoding="utf-8"))
    return report


def load(run_dir: str | Path, field: str = "report") -> pd.DataFrame:
    """The report of a finished run as a DataFrame (for notebooks); errors name `field`, where the path came from."""
    path = Path(run_dir) / "report.parquet"
    if not path.is_file():
        started = (Path(run_dir) / "run.json").is_file()  # a run only screened, or interrupted: `train` finishes it
        raise UserError(f"{field}: '{path}' not found; give the directory of a finished `lora-search run`"
                        + (f", or train this one first: lora-search train {run_dir}" if started else ""))
    try:
        return pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow's ArrowInvalid is a ValueError
        raise UserError(f"{field}: '{path}' cannot be read ({err}); "
                        f"rebuild it with `lora-search report {run_dir}`") from None


def read_run_json(run_dir: Path, *keys: str) -> dict:
    return read_stored(Path(run_dir) / "run.json", *keys, types=RUN_TYPES)


def read_module_scores(path: Path):
    """module_scores.json as ModuleScores; none (no proxy columns) when the run has not written it."""
    from orchestrator.proxies import ModuleScores

    if not path.is_file():
        return ModuleScores(unit={})
    try:
        return ModuleScores(**read_stored(path, "unit", types=MODULE_SCORES_TYPES))
    except TypeError as err:  # a key ModuleScores does not have
        raise _stored_error(path, f"does not hold module scores ({err})") from None


def rebuild(run_dir: str | Path) -> pd.DataFrame:
    """Write every report file again from the stored results, without training; returns the table.

    Reads trials/*.json (the seeds of run.json `seeds.train`), module_scores.json (a candidate's proxy
    scores, as the screen computes them), screen.csv and run.json,
    and calls `build` and `write` with the inputs `pipeline.run` gives them.
    """
    run_dir = Path(run_dir)
    if not (run_dir / "run.json").is_file():
        raise UserError(f"report: '{run_dir}' has no run.json; give a run directory such as results/quickstart")
    run_info = read_run_json(run_dir, "task.majority_rate")
    trials = [read_stored(p, "candidate_id", types=TRIAL_TYPES) for p in sorted((run_dir / "trials").glob("*.json"))]
    seeds = (run_info.get("seeds") or {}).get("train")
    if seeds is not None:
        trials = [t for t in trials if t.get("seed") in seeds]
    baselines = run_info.get("config", {}).get("train", {}).get("baselines")
    if baselines is not None:  # a resume may drop a baseline: its earlier trials stay on disk, not in the report
        trials = [t for t in trials if t.get("kind") != "baseline" or t.get("label") in baselines]
    if not any(t.get("accuracy") is not None for t in trials):
        raise UserError(f"report: '{run_dir / 'trials'}' holds no finished model; train them with "
                        f"`lora-search train {run_dir}`")
    from orchestrator.allocation import Allocation

    scores = read_module_scores(run_dir / "module_scores.json")
    order = list(next(iter(scores.unit.values()), {}))
    ranks = {t["candidate_id"]: t.get("ranks") or {} for t in trials}
    proxy_scores = {cid: scores.scores(Allocation.from_ranks(rank)) for cid, rank in ranks.items()} if scores.unit else {}
    compact = {cid: compact_allocation(rank, order) for cid, rank in ranks.items()}
    if (run_dir / "screen.csv").is_file():
        screen = read_stored(run_dir / "screen.csv", "candidate_id", "allocation")
        compact.update({cid: a for cid, a in zip(screen.candidate_id, screen.allocation) if cid in compact and not ranks[cid]})
    majority = run_info["task"]["majority_rate"]
    table = build(trials, proxy_scores, compact, majority, base_params=run_info.get("base_params"), baselines=baselines,
                  failed_charges=failed_charges(run_dir))
    trained = [s for s in run_sessions(run_info) if not s.get("screen_only")]  # a `screen --resume` trains nothing
    table.attrs["unfinished"] = not trained or "finished_at" not in trained[-1]  # its models so far; the rest unnamed
    return write(table, run_dir, majority)


# ---------------------------------------------------------------- terminal


def terminal_table(title: str, columns: list[str], rows: list[list[str]], folding: dict[str, int], left: set[str]):
    """A rich table that fits an 80-column terminal without cutting a number: the `folding` columns (header → least
    width) wrap their text, and every other column is exactly as wide as its longest cell, because rich crops a
    no_wrap column to fit and only honours its min_width."""
    from rich import box
    from rich.table import Table

    table = Table(title=title, box=box.SIMPLE_HEAD, padding=0, show_edge=False)
    for k, column in enumerate(columns):
        if column in folding:
            table.add_column(column, overflow="fold", min_width=folding[column])
        else:
            width = max([len(line) for line in column.split("\n")] + [len(cells[k]) for cells in rows])
            table.add_column(column, justify="left" if column in left else "right", no_wrap=True, min_width=width)
    for cells in rows:
        table.add_row(*cells)
    return table


def print_summary(report: pd.DataFrame, majority_rate: float, console=None, *, run_dir: str | Path | None = None) -> None:
    """One screen: the models (mean over seeds) with gain, p-value and ROI, then the summary lines."""
    from rich.console import Console

    console = console or Console()
    report = report if "roi_baseline" in report else add_derived(report)
    labels = baseline_labels(report)
    primary = labels[0] if labels else None
    title = "lora-search: trained models (mean over seeds" + (f"; Δ, p, pts/$ vs {primary})" if primary else ")")
    validated = selection_column(report) == "val_accuracy"
    own_lr = own_learning_rates(report)
    columns = ["model", "kind", "params", "acc %", "± std"] + ["val %"] * validated + ["F1 %", "cost $\n/ seed"]
    columns += ["Δ pts", "p", "pts/$"] if primary else []
    rows = []
    for row in aggregate(report).itertuples():
        std = "" if np.isnan(row.accuracy_std) else f"{100 * row.accuracy_std:.2f}"
        model = f"{row.candidate_id} {row.label}" + (f" lr={row.lr:g}" if own_lr else "")  # folded: no width added
        cells = [model, row.kind, f"{row.trainable_params:,}", f"{100 * row.accuracy:.2f}", std] + (
                 [f"{100 * row.val_accuracy:.2f}"] if validated else []) + [
                 f"{100 * row.f1:.2f}", _pm(row.cost_usd_mean, None, fmt=".4f")]  # per seed, as pts/$ is
        if primary:
            gain, p = getattr(row, gain_column(primary)), getattr(row, p_column(primary))
            cells += ["" if math.isnan(gain) else f"{gain:+.2f}", "" if math.isnan(p) else f"{p:.3g}",
                      "" if math.isnan(row.roi_per_usd) else f"{row.roi_per_usd:+.4g}"]
        rows.append(cells)
    table = terminal_table(title, columns, rows, folding={"model": 11}, left={"kind"})
    console.print(table)
    for line in summary_lines(report, majority_rate):
        console.print(line)
    context = run_context(run_dir, report) if run_dir else None
    for line in roi_lines(report, context):
        console.print(line)


# ---------------------------------------------------------------- several runs side by side


def default_compare_dir(run_dirs: list[str | Path]) -> Path:
    """results/compare-<name>-<name>…, beside the first run."""
    names = [Path(d).resolve().name for d in run_dirs]
    return Path(run_dirs[0]).parent / ("compare-" + "-".join(names))


# Config keys that say where a run's files go or whether it registers, not what it computed.
_NOT_SETTINGS = ("name", "results_dir", "storage_path", "screen.storage", "register.")


def differing_settings(configs: list[dict]) -> list[str]:
    """Per run, the settings on which the runs disagree, as `key=value; …` (what a compare is comparing)."""
    text = lambda value: json.dumps(value) if isinstance(value, list) else str(value)
    flats = [{key: text(value) for key, value in flat_keys(config).items()} for config in configs]
    keys = [key for key in dict.fromkeys(k for flat in flats for k in flat)
            if not key.startswith(_NOT_SETTINGS) and len({flat.get(key) for flat in flats}) > 1]
    return ["; ".join(f"{key}={flat.get(key, '(unset)')}" for key in keys) for flat in flats]


def compare_table(run_dirs: list[str | Path]) -> pd.DataFrame:
    """One row per run: task, best searched model, the baselines, gain over the ROI baseline, cost, and the
    settings in which the runs differ."""
    rows, seen, configs = [], {}, []
    for run_dir in map(Path, run_dirs):
        report = load(run_dir, "compare RUN_DIRS")  # the argument the user gave, not the `report` command
        context = run_context(run_dir, report)
        configs.append(context["run"].get("config", {}))
        report = add_derived(report, context["base_params"], context["baselines"])
        table, labels = aggregate(report), baseline_labels(report, context["baselines"])
        name = context["name"] or run_dir.name
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:
            name = f"{name}#{seen[name]}"
        searched = table[table.kind == "searched"]
        best = searched.iloc[0] if not searched.empty else None
        primary = table[(table.kind == "baseline") & (table.label == labels[0])].iloc[0] if labels else None
        costs = context["costs"]
        rows.append({
            "run": name, "task": context["task"].get("task"), "model": context["model"], "seeds": int(report.seed.nunique()),
            "models": int(table.shape[0]),
            "best_searched": f"{best.label} · {best.candidate_id}" if best is not None else None,
            "best_accuracy": best.accuracy if best is not None else np.nan,
            "best_accuracy_std": best.accuracy_std if best is not None else np.nan,
            "best_params": int(best.trainable_params) if best is not None else None,
            "baseline": labels[0] if labels else None,
            "baseline_accuracy": primary.accuracy if primary is not None else np.nan,
            "baseline_accuracy_std": primary.accuracy_std if primary is not None else np.nan,
            "baselines": "; ".join(f"{r.label} {100 * r.accuracy:.2f}%" for r in table[table.kind == "baseline"].itertuples()),
            "gain_points": best[gain_column(labels[0])] if best is not None and labels else np.nan,
            "p_value": best[p_column(labels[0])] if best is not None and labels else np.nan,
            "roi_per_usd": best.roi_per_usd if best is not None and labels else np.nan,
            "train_cost_usd": costs["train_cost_usd"], "screen_cost_usd": costs["screen_cost_usd"],
            "total_cost_usd": costs["total_cost_usd"], "train_device_hours": costs["train_device_hours"],
            "total_device_hours": costs["total_device_hours"],
            "run_dir": str(run_dir),
        })
    return pd.DataFrame(rows).assign(settings=differing_settings(configs))


def plot_compare(table: pd.DataFrame, path: Path) -> None:
    """Left: best searched vs ROI baseline accuracy per run (± std). Right: gain vs total cost per run."""
    fig, axes = figure(10.5, 4.3, ncols=2)
    left, right = axes[0]
    x = np.arange(len(table))
    width = 0.38
    best, base = 100 * table.best_accuracy.to_numpy(float), 100 * table.baseline_accuracy.to_numpy(float)
    left.bar(x - width / 2, best, width, color=SEARCHED_COLOR, label="best searched")
    left.bar(x + width / 2, base, width, color=BASELINE_COLOR, label="ROI baseline")
    _error_bars(left, x - width / 2, best, 100 * _nz(table.best_accuracy_std), horizontal=False)
    _error_bars(left, x + width / 2, base, 100 * _nz(table.baseline_accuracy_std), horizontal=False)
    values = np.concatenate([best[~np.isnan(best)], base[~np.isnan(base)]])
    if len(values):
        left.set_ylim(max(0, values.min() - 5), min(100, values.max() + 3))
    for xi, b, a, label in zip(x, best, base, table.baseline):
        if not np.isnan(a):
            left.text(xi + width / 2, a + 0.3, str(label), ha="center", va="bottom", fontsize=7.5, color=BASELINE_COLOR)
    left.set_xticks(x, [f"{r}\n({t})" for r, t in zip(table.run, table.task)], fontsize=8)
    left.set_ylabel("eval accuracy (%)")
    left.set_title("Best searched vs baseline per run", fontsize=10)
    left.legend(fontsize=8, loc="lower right")
    left.grid(axis="y", alpha=0.3)
    right.axhline(0, color="0.4", lw=1)
    right.scatter(table.total_cost_usd, table.gain_points, s=60, color=SEARCHED_COLOR, zorder=3)
    for i, row in enumerate(table.itertuples()):
        right.annotate(row.run, (row.total_cost_usd, row.gain_points), textcoords="offset points",
                       xytext=(7, 7 if i % 2 == 0 else -13), fontsize=8.5)
    right.set_xlabel("total run cost, every stage (USD)")
    right.set_ylabel("gain of best searched over baseline (points)")
    right.set_title("What the search bought, per run", fontsize=10)
    right.margins(x=0.25, y=0.35)
    right.grid(alpha=0.3)
    fig.suptitle("lora-search runs compared", fontsize=11)
    save_png(fig, path)


def compare(run_dirs: list[str | Path], out_dir: str | Path | None = None) -> pd.DataFrame:
    """compare.{csv,md} and compare.png of several runs in `out_dir` (default `default_compare_dir`)."""
    if len(run_dirs) < 1:
        raise UserError("compare: give at least one run directory, e.g. results/quickstart results/qs3")
    out_dir = Path(out_dir) if out_dir else default_compare_dir(run_dirs)
    table = compare_table(run_dirs)
    write_atomic(out_dir / "compare.csv", lambda p: table.to_csv(p, index=False))
    plot_compare(table, out_dir / "compare.png")
    shown = table.drop(columns=["run_dir"])
    shown = markdown_table(shown)
    text = "\n".join(["# lora-search: runs compared", "", shown, "",
                      "Gain = best searched − the run's ROI baseline, in accuracy points; p = Welch t-test over seeds.", "",
                      "![runs compared](compare.png)", ""])
    write_atomic(out_dir / "compare.md", lambda p: Path(p).write_text(text, encoding="utf-8"))
    return table


def print_compare(table: pd.DataFrame, console=None) -> None:
    """Runs side by side (see terminal_table); a task every run shares goes into the title, and candidate ids and
    the baseline's std stay in compare.md."""
    from rich.console import Console

    console = console or Console()
    tasks = table.task.astype(str).unique()
    text = lambda value: value if isinstance(value, str) else ""
    rows = [[str(row.run)] + [str(row.task)] * (len(tasks) > 1) + [
             text(row.best_searched).split(" · ")[0], _pm(row.best_accuracy, None, 100),
             _pm(row.best_accuracy_std, None, 100), text(row.baseline), _pm(row.baseline_accuracy, None, 100),
             _pm(row.gain_points, None, fmt="+.2f"), _pm(row.p_value, None, fmt=".3g"),
             _pm(row.total_cost_usd, None, fmt=".4f")]
            for row in table.itertuples()]
    columns = ["run"] + ["task"] * (len(tasks) > 1) + ["best", "acc %", "± std", "baseline", "base\nacc %", "gain\npts",
                                                        "p", "cost $"]
    out = terminal_table("lora-search: runs compared" + (f" on {tasks[0]}" if len(tasks) == 1 else ""), columns, rows,
                         folding={"run": 8, "task": 8}, left={"best", "baseline"})
    console.print(out)
    if table.settings.astype(bool).any():
        console.print("Settings that differ:")
        for row in table.itertuples():
            console.print(f"  {row.run}: {row.settings}", markup=False, highlight=False)
