"""Report: one pandas DataFrame of every trained model, written as Parquet, CSV, Markdown and PNGs.

Everything is a DataFrame first: `load(run_dir)` returns the report for notebooks, and the files
are views of it. Files are written to a temporary name and renamed, so a crash or a full disk never
leaves half a report behind.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd

from orchestrator.errors import UserError

CONTRACT_COLUMNS = ["candidate_id", "kind", "label", "allocation", "trainable_params", "head_params", "accuracy", "f1",
                    "eval_loss", "peak_memory_mb", "train_wall_s", "device_hours", "cost_usd", "seed"]


def write_atomic(path: Path, writer: Callable[[str], None]) -> None:
    """writer(tmp) then rename over `path`; on any error the old file (or none) stays."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        writer(str(tmp))
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise UserError(f"report: could not write '{path}' ({err.strerror or err}); free disk space or fix permissions, "
                        "then run `lora-search report` again") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def build(trials: list[dict], proxy_scores: dict[str, dict[str, float]], compact: dict[str, str],
          majority_rate: float) -> pd.DataFrame:
    """One row per (model, seed): metrics from the trial files, proxy scores from the screen."""
    frame = pd.DataFrame(trials)
    frame["allocation"] = frame.candidate_id.map(compact)
    proxies = pd.DataFrame.from_dict(proxy_scores, orient="index").add_prefix("proxy_")
    frame = frame.join(proxies, on="candidate_id")
    frame["beats_majority"] = frame.accuracy > majority_rate
    extra = [c for c in frame.columns if c not in CONTRACT_COLUMNS and c not in ("ranks", "history")]
    return frame[CONTRACT_COLUMNS + extra].sort_values(["kind", "accuracy"], ascending=[False, False]).reset_index(drop=True)


def aggregate(report: pd.DataFrame) -> pd.DataFrame:
    """Mean ± std over seeds per model."""
    grouped = report.groupby(["candidate_id", "kind", "label", "allocation", "trainable_params"], sort=False)
    table = grouped.agg(accuracy=("accuracy", "mean"), accuracy_std=("accuracy", "std"), f1=("f1", "mean"),
                        seeds=("seed", "nunique"), cost_usd=("cost_usd", "sum"), device_hours=("device_hours", "sum"))
    return table.reset_index().sort_values("accuracy", ascending=False).reset_index(drop=True)


def summary_lines(report: pd.DataFrame, majority_rate: float) -> list[str]:
    table = aggregate(report)
    searched, baselines = table[table.kind == "searched"], table[table.kind == "baseline"]
    lines = [f"Majority-class accuracy (the floor): {majority_rate:.4f}"]
    if not searched.empty:
        best = searched.iloc[0]
        lines.append(f"Best searched: {best.candidate_id} accuracy {best.accuracy:.4f} with {best.trainable_params:,} "
                     f"LoRA params ({best.allocation})")
        for _, base in baselines.iterrows():
            lines.append(f"Gain over {base.label} ({base.accuracy:.4f}, {base.trainable_params:,} params): "
                         f"{100 * (best.accuracy - base.accuracy):+.2f} points")
    lines.append(f"Training cost: {report.device_hours.sum():.4f} device-hours, ${report.cost_usd.sum():.4f}")
    losers = report[~report.beats_majority]
    if not losers.empty:
        lines.append(f"WARNING: {len(losers)} model(s) do not beat the majority class: {', '.join(losers.candidate_id)}")
    return lines


def markdown(report: pd.DataFrame, majority_rate: float) -> str:
    shown = ["candidate_id", "kind", "label", "seed", "trainable_params", "accuracy", "f1", "eval_loss",
             "peak_memory_mb", "train_wall_s", "cost_usd"]
    shown += [c for c in report.columns if c.startswith("proxy_")]
    lines = ["# lora-search report", "", *[f"- {line}" for line in summary_lines(report, majority_rate)], "",
             report[shown].to_markdown(index=False, floatfmt=".4g"), "", "## Allocations", ""]
    lines += [f"- `{row.candidate_id}` ({row.kind}): `{row.allocation}`" for row in
              report.drop_duplicates("candidate_id").itertuples()]
    lines += ["", "![accuracy vs trainable params](accuracy_vs_params.png)", ""]
    return "\n".join(lines)


def plot_accuracy_vs_params(report: pd.DataFrame, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    for kind, marker, color in (("searched", "o", "tab:blue"), ("baseline", "s", "tab:red")):
        part = report[report.kind == kind]
        ax.scatter(part.trainable_params, 100 * part.accuracy, marker=marker, color=color, label=kind, alpha=0.8)
    ax.set_xlabel("trainable LoRA parameters")
    ax.set_ylabel("eval accuracy (%)")
    ax.set_title("Accuracy vs trainable parameters (one point per model and seed)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    write_atomic(path, lambda p: fig.savefig(p, format="png"))
    plt.close(fig)


def write(report: pd.DataFrame, run_dir: Path, majority_rate: float) -> None:
    run_dir = Path(run_dir)
    write_atomic(run_dir / "report.parquet", lambda p: report.to_parquet(p, index=False))
    write_atomic(run_dir / "report.csv", lambda p: report.to_csv(p, index=False))
    plot_accuracy_vs_params(report, run_dir / "accuracy_vs_params.png")
    write_atomic(run_dir / "report.md", lambda p: Path(p).write_text(markdown(report, majority_rate), encoding="utf-8"))


def load(run_dir: str | Path) -> pd.DataFrame:
    """The report of a finished run as a DataFrame (for notebooks)."""
    path = Path(run_dir) / "report.parquet"
    if not path.is_file():
        raise UserError(f"report: '{path}' not found; run `lora-search run` first or check the run directory")
    return pd.read_parquet(path)


def read_run_json(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / "run.json").read_text())


def print_summary(report: pd.DataFrame, majority_rate: float, console=None) -> None:
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    table = Table(title="lora-search: trained models (mean over seeds)")
    for column in ("model", "kind", "params", "accuracy", "± std", "F1", "cost $"):
        table.add_column(column, justify="left" if column in ("model", "kind") else "right")
    for row in aggregate(report).itertuples():
        std = "" if np.isnan(row.accuracy_std) else f"{100 * row.accuracy_std:.2f}"
        table.add_row(f"{row.candidate_id} {row.label}", row.kind, f"{row.trainable_params:,}", f"{100 * row.accuracy:.2f}",
                      std, f"{100 * row.f1:.2f}", f"{row.cost_usd:.4f}")
    console.print(table)
    for line in summary_lines(report, majority_rate):
        console.print(line)
