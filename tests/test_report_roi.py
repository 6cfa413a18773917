"""ROI report: golden values on a synthetic results table, the plots and pages, rebuild and compare.

No model and no Ray: every input is a hand-made trial row, run.json, screen.csv and module_scores.json.
"""

from __future__ import annotations

import base64
import json
import math

import numpy as np
import pandas as pd
import pytest

from orchestrator import report
from orchestrator.errors import UserError

TYPES = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
FULL = {"query": "attention.self.query", "key": "attention.self.key", "value": "attention.self.value"}
MODULES = [f"bert.encoder.layer.{layer}.{FULL.get(t, t)}" for layer in range(2) for t in TYPES]  # model order
BASE_PARAMS = 1_000_000
MAJORITY = 0.5


def name(layer: int, kind: str) -> str:
    return f"bert.encoder.layer.{layer}.{FULL.get(kind, kind)}"


# candidate → (kind, label, params, ranks, {seed: (accuracy, cost_usd, peak_memory_mb)})
MODELS = {
    "aaaa": ("searched", "screen#1", 50_000, {name(0, "query"): 8, name(1, "key"): 4},
             {0: (0.80, 0.010, 1000.0), 1: (0.82, 0.010, 1100.0)}),
    "bbbb": ("searched", "screen#2", 100_000, {name(0, "intermediate.dense"): 2}, {0: (0.79, 0.004, 900.0)}),
    "cccc": ("searched", "screen#3", 120_000, {name(1, "output.dense"): 16, name(0, "value"): 2},
             {0: (0.85, 0.020, 1200.0)}),
    "qqqq": ("baseline", "uniform_qv", 73_728, {name(layer, t): 8 for layer in range(2) for t in ("query", "value")},
             {0: (0.78, 0.008, 1000.0), 1: (0.78, 0.012, 1000.0)}),
}
COMPACT = {"aaaa": "L0.query:8,L1.key:4", "bbbb": "L0.intermediate.dense:2", "cccc": "L0.value:2,L1.output.dense:16",
           "qqqq": "L0.query:8,L0.value:8,L1.query:8,L1.value:8"}
# per-unit module scores: exact binary fractions, so any summation order gives the same float
UNIT = {"grad_norm": {m: 0.25 * (i + 1) for i, m in enumerate(MODULES)}, "params": {m: 64.0 for m in MODULES}}


def trials(history: bool = False) -> list[dict]:
    rows = []
    for cid, (kind, label, params, ranks, seeds) in MODELS.items():
        for seed, (accuracy, cost, memory) in seeds.items():
            row = {"candidate_id": cid, "kind": kind, "label": label, "ranks": ranks, "seed": seed, "status": "completed",
                   "adapter_dir": f"adapters/{cid}", "device_hours": cost / 0.0446, "cost_usd": cost, "accuracy": accuracy,
                   "f1": accuracy - 0.01, "eval_loss": 1.0 - accuracy, "latency_ms_per_batch": 5.0, "epoch": 2,
                   "train_loss": 0.9 - accuracy, "train_wall_s": 3600 * cost / 0.0446, "peak_memory_mb": memory,
                   "trainable_params": params, "head_params": 770, "device": "cpu"}
            if history:
                row["history"] = [{"epoch": 1, "accuracy": accuracy - 0.05, "eval_loss": 1.1 - accuracy, "train_loss": 1.0},
                                  {"epoch": 2, "accuracy": accuracy, "eval_loss": 1.0 - accuracy, "train_loss": 0.9 - accuracy}]
            rows.append(row)
    return rows


def proxy_scores() -> dict[str, dict[str, float]]:
    return {cid: {p: sum(r * UNIT[p][m] for m, r in ranks.items()) for p in UNIT} for cid, (_, _, _, ranks, _) in MODELS.items()}


@pytest.fixture
def no_plots(monkeypatch):
    """Skip drawing the run's PNGs where a test is about the tables (drawing is tested once, below)."""
    monkeypatch.setattr(report, "write_plots", lambda frame, run_dir, *args, **kwargs: report._default_plots(frame))


@pytest.fixture
def table() -> pd.DataFrame:
    return report.build(trials(), proxy_scores(), COMPACT, MAJORITY, base_params=BASE_PARAMS)


def row(frame: pd.DataFrame, cid: str, seed: int | None = None) -> pd.Series:
    part = frame[frame.candidate_id == cid]
    return (part if seed is None else part[part.seed == seed]).iloc[0]


# ---------------------------------------------------------------- golden values


def test_pareto_front_golden():
    frame = pd.DataFrame({"x": [1, 2, 2, 3, np.nan, 1], "accuracy": [1, 3, 3, 2, 5, 0.5]}, index=list("abcdef"))
    mask = report.pareto_front(frame, "x")
    assert mask.dtype == bool and list(mask.index) == list("abcdef")
    assert mask.tolist() == [True, True, True, False, False, False]  # ties both stay; NaN never on the front
    assert report.pareto_front(frame, "accuracy", y="x").tolist() == [False, False, False, True, False, True]


def test_labels_of_points_close_in_x_go_by_height_so_none_sits_beside_the_other_point():
    # the 20NG report's grad_norm panel: screen#1 (47.5%) and screen#2 (49.1%) at nearly the same score; x order
    # alone put screen#1's label above its point, next to screen#2's, and screen#2's below, next to screen#1's
    xs, ys = np.array([0.150, 0.155, 0.170, 1.47, 2.60]), np.array([47.5, 49.1, 53.5, 41.8, 44.8])
    assert report.label_heights(xs, ys) == [-13, -3, 7, -13, 7]  # below, beside, above; lone ones alternate in x order
    assert report.label_heights(np.array([0.0, 5.0, 10.0]), np.array([3.0, 1.0, 2.0])) == [7, -13, 7]
    assert report.label_heights(np.array([1.0, 1.0]), np.array([2.0, 1.0])) == [7, -13]  # no x range at all


def test_row_columns_gain_and_roi(table):
    a0, a1, b, c, q = row(table, "aaaa", 0), row(table, "aaaa", 1), row(table, "bbbb"), row(table, "cccc"), row(table, "qqqq")
    assert list(table.columns[:len(report.CONTRACT_COLUMNS)]) == report.CONTRACT_COLUMNS
    assert a0.gain_vs_uniform_qv == pytest.approx(2.0) and a1.gain_vs_uniform_qv == pytest.approx(4.0)
    assert b.gain_vs_uniform_qv == pytest.approx(1.0) and c.gain_vs_uniform_qv == pytest.approx(7.0)
    assert math.isnan(q.gain_vs_uniform_qv) and q.roi_baseline == "uniform_qv"
    assert a0.roi_per_usd == pytest.approx(200.0) and a1.roi_per_usd == pytest.approx(400.0)
    assert b.roi_per_usd == pytest.approx(250.0) and c.roi_per_usd == pytest.approx(350.0)
    assert a0.roi_per_mparams == pytest.approx(40.0) and b.roi_per_mparams == pytest.approx(10.0)
    assert c.roi_per_mparams == pytest.approx(7.0 / 0.12)
    assert a0.params_pct_of_base == pytest.approx(5.0) and q.params_pct_of_base == pytest.approx(7.3728)
    assert (a0.num_adapted_modules, a0.total_rank, a0.adapters_per_type) == (2, 12, "query:1,key:1")
    assert (q.num_adapted_modules, q.total_rank, q.adapters_per_type) == (4, 32, "query:2,value:2")
    assert c.adapters_per_type == "value:1,output.dense:1"
    assert json.loads(q.ranks_json) == MODELS["qqqq"][3]
    assert "ranks" not in table and "history" not in table


def test_base_params_unknown_gives_nan_and_no_baseline_gives_nan_roi():
    plain = report.build(trials(), proxy_scores(), COMPACT, MAJORITY)
    assert plain.params_pct_of_base.isna().all()
    searched_only = report.build([t for t in trials() if t["kind"] == "searched"], proxy_scores(), COMPACT, MAJORITY)
    assert searched_only.roi_per_usd.isna().all() and not any(c.startswith("gain_vs_") for c in searched_only)


def test_aggregate_mean_std_welch_and_pareto(table):
    agg = report.aggregate(table).set_index("candidate_id")
    assert agg.index.tolist() == ["cccc", "aaaa", "bbbb", "qqqq"]  # by mean accuracy
    a = agg.loc["aaaa"]
    assert a.accuracy == pytest.approx(0.81) and a.accuracy_std == pytest.approx(math.sqrt(2) * 0.01)
    assert a.seeds == 2 and a.cost_usd == pytest.approx(0.02) and a.cost_usd_mean == pytest.approx(0.01)
    assert a.cost_usd_std == pytest.approx(0.0) and a.peak_memory_mb == pytest.approx(1050.0)
    assert a.peak_memory_mb_std == pytest.approx(50 * math.sqrt(2))
    assert a.eval_loss == pytest.approx(0.19) and a.f1_std == pytest.approx(math.sqrt(2) * 0.01)
    assert agg.loc["qqqq"].cost_usd_std == pytest.approx(0.002 * math.sqrt(2))
    assert a.gain_vs_uniform_qv == pytest.approx(3.0) and a.roi_per_usd == pytest.approx(300.0)
    assert a.roi_per_mparams == pytest.approx(60.0)
    # Welch: t = 0.03 / 0.01 = 3 with 1 degree of freedom (the baseline has zero variance) → p = 1 − 2·atan(3)/π
    assert a.p_vs_uniform_qv == pytest.approx(1 - 2 * math.atan(3) / math.pi, rel=1e-9)
    assert math.isnan(agg.loc["bbbb"].p_vs_uniform_qv) and math.isnan(agg.loc["cccc"].p_vs_uniform_qv)  # 1 seed
    assert math.isnan(agg.loc["bbbb"].accuracy_std) and math.isnan(agg.loc["qqqq"].p_vs_uniform_qv)
    assert set(agg.index[agg.pareto_trainable_params]) == {"aaaa", "cccc"}
    assert set(agg.index[agg.pareto_cost_usd]) == {"aaaa", "bbbb", "cccc"}  # qqqq ties aaaa on cost, lower accuracy
    assert set(agg.index[agg.pareto_peak_memory_mb]) == {"aaaa", "bbbb", "cccc"}


def test_a_dynamic_model_whose_seeds_keep_different_counts_is_one_row():
    rows = trials()
    for seed, (accuracy, kept) in enumerate([(0.83, 50112), (0.81, 49728)]):
        rows.append(dict(rows[0], candidate_id="dyn-aaaa", seed=seed, accuracy=accuracy, trainable_params=kept))
    agg = report.aggregate(report.build(rows, {}, COMPACT | {"dyn-aaaa": COMPACT["aaaa"]}, MAJORITY))
    dynamic = agg[agg.candidate_id == "dyn-aaaa"]
    assert len(dynamic) == 1 and dynamic.seeds.item() == 2 and dynamic.trainable_params.item() == 49920
    assert dynamic.accuracy_std.item() == pytest.approx(math.sqrt(2) * 0.01)


def test_welch_p_nan_with_one_seed():
    assert math.isnan(report.welch_p([0.8], [0.7, 0.72]))
    assert math.isnan(report.welch_p([0.8, 0.81], [0.7]))
    assert report.welch_p([0.8, 0.82, 0.81], [0.7, 0.72]) < 0.05


def test_spearman_per_proxy():
    scores = {"aaaa": {"up": 3.0, "down": 1.0, "flat": 5.0}, "bbbb": {"up": 2.0, "down": 3.0, "flat": 5.0},
              "cccc": {"up": 4.0, "down": 0.5, "flat": 5.0}, "qqqq": {"up": 1.0, "down": 4.0, "flat": 5.0}}
    frame = report.build(trials(), scores, COMPACT, MAJORITY)
    rho = report.proxy_correlations(frame).set_index("proxy")
    assert rho.loc["up", "spearman_rho"] == pytest.approx(1.0) and rho.loc["down", "spearman_rho"] == pytest.approx(-1.0)
    assert math.isnan(rho.loc["flat", "spearman_rho"]) and (rho.models == 4).all()
    two = report.proxy_correlations(frame[frame.candidate_id.isin(["aaaa", "qqqq"])])
    assert two.spearman_rho.isna().all()  # fewer than 3 distinct models


def test_failed_runs_are_left_out_and_named_stopped_runs_stay():
    rows = trials()
    rows[1] = dict(rows[1], status="stopped")  # ASHA stopped it early: a real result
    failed = {"candidate_id": "bbbb", "kind": "searched", "label": "screen#2", "ranks": MODELS["bbbb"][3], "seed": 1,
              "status": "failed", "error": "OutOfMemoryError: CUDA out of memory"}
    frame = report.build(rows + [failed], proxy_scores(), COMPACT, MAJORITY)
    assert len(frame) == len(rows) and frame.trainable_params.dtype.kind == "i" and frame.seed.dtype.kind == "i"
    assert "stopped" in set(frame.status)
    lines = report.summary_lines(frame, MAJORITY)
    assert lines[-1] == "WARNING: 1 training run(s) failed and are left out: bbbb-s1 (OutOfMemoryError: CUDA out of memory)"
    assert not any("nan" in line for line in lines)
    below = report.summary_lines(report.build(rows, proxy_scores(), COMPACT, 0.83), 0.83)  # aaaa: 2 seeds, named once
    assert "WARNING: 3 model(s) do not beat the majority class: aaaa, bbbb, qqqq" in below


def failed_trial(seed: int) -> dict:
    """bbbb's seed as train.keep_failure writes it (its charge, from trials/failed/, is given apart)."""
    return {"candidate_id": "bbbb", "kind": "searched", "label": "screen#2", "ranks": MODELS["bbbb"][3], "seed": seed,
            "status": "failed", "error": "RuntimeError: worker died"}


def charge(seed: int, seconds: float, device_hours: float, cost: float) -> dict:
    return {"job_id": f"bbbb-s{seed}", "train_wall_s": seconds, "device": "cpu", "device_hours": device_hours,
            "cost_usd": cost}


def test_a_failed_runs_device_time_counts_in_the_runs_cost_not_in_its_tables(tmp_path, no_plots):
    """A failed training has no accuracy but held its devices for the epochs it finished: the run's total device-hours
    and cost count it (a stage of its own in the cost table, and in the summary's training cost), while the model
    tables, the plots' rows and the per-model ROI stay without it. Before, the cost left it out."""
    run = {"config": {"cost": {"price_per_device_hour": {"cpu": 0.0446}}}}
    scores = {"seconds": {"grad_norm": 36.0}}
    plain = report.build(trials(), proxy_scores(), COMPACT, MAJORITY)
    charged = charge(1, 1800.0, 1.0, 0.0446)  # 2 vCPUs, 30 min
    frame = report.build(trials() + [failed_trial(1)], proxy_scores(), COMPACT, MAJORITY, failed_charges=[charged])
    pd.testing.assert_frame_equal(report.aggregate(frame), report.aggregate(plain))  # the tables: as without it
    before, costs = report.cost_breakdown(plain, run, scores), report.cost_breakdown(frame, run, scores)
    assert costs["total_device_hours"] == pytest.approx(before["total_device_hours"] + 1.0)
    assert costs["total_cost_usd"] == pytest.approx(before["total_cost_usd"] + 0.0446)
    assert costs["train_cost_usd"] == before["train_cost_usd"]  # the report's rows alone
    assert (costs["failed_runs"], costs["failed_untimed"], costs["failed_seconds"]) == (1, 0, 1800.0)
    stages = report.cost_table(costs).set_index("stage")
    assert stages.loc["train: failed runs", "cost_usd"] == pytest.approx(0.0446)
    assert stages.share_of_cost.sum() == pytest.approx(1.0)
    line = next(text for text in report.summary_lines(frame, MAJORITY) if text.startswith("Training cost"))
    assert line == (f"Training cost: {plain.device_hours.sum() + 1.0:.4f} device-hours, ${0.064 + 0.0446:.4f}, "
                    "1 failed run(s) included (1.0000 device-hours, $0.0446)")
    screening = next(text for text in report.roi_lines(frame, {"costs": costs}) if text.startswith("Screening"))
    assert "training: 6 runs, " in screening and ", 1 failed, 1800 s ($0.0446)" in screening
    # rebuilt from the run directory, through report.parquet: compare and `load` see it
    run_dir = make_run_dir(tmp_path / "run")
    (run_dir / "trials" / "bbbb-s1.json").write_text(json.dumps(failed_trial(1)))
    (run_dir / "trials" / report.FAILED_CHARGES).mkdir()
    (run_dir / "trials" / report.FAILED_CHARGES / "bbbb-s1.0.json").write_text(json.dumps(charged))
    report.rebuild(run_dir)
    loaded = report.load(run_dir)
    assert report.failed_charge(loaded)["device_hours"] == 1.0 and len(loaded) == 6
    table = report.compare([run_dir], tmp_path / "cmp")
    assert table.total_device_hours[0] == pytest.approx(plain.device_hours.sum() + 36.0 / 3600 + 1.0)
    # the README's retry: its trial file deleted, the model trained again (here: its seed-0 row); the charge stays
    (run_dir / "trials" / "bbbb-s1.json").unlink()
    assert report.failed_charge(report.rebuild(run_dir))["device_hours"] == 1.0


def test_a_failed_row_without_a_charge_still_loads_and_is_said_not_charged():
    """A failed trial file from before failures were charged has no charge in trials/failed/: it still loads, adds
    nothing to the cost, and the summary says what it could not charge."""
    run = {"config": {"cost": {"price_per_device_hour": {"cpu": 0.0446}}}}
    scores = {"seconds": {"grad_norm": 36.0}}
    plain = report.build(trials(), proxy_scores(), COMPACT, MAJORITY)
    older = report.build(trials() + [failed_trial(1)], proxy_scores(), COMPACT, MAJORITY)
    assert len(older) == len(plain) and older.attrs["failed"] == ["bbbb-s1 (RuntimeError: worker died)"]
    costs, before = report.cost_breakdown(older, run, scores), report.cost_breakdown(plain, run, scores)
    assert costs["total_cost_usd"] == before["total_cost_usd"] and costs["failed_untimed"] == 1
    line = next(text for text in report.summary_lines(older, MAJORITY) if text.startswith("Training cost"))
    assert line.endswith("; 1 failed run(s) recorded no device time (trial files from before failed trainings were "
                         "charged) and are not charged")
    mixed = report.build(trials() + [failed_trial(1), failed_trial(2)], proxy_scores(), COMPACT, MAJORITY,
                         failed_charges=[charge(2, 900.0, 0.5, 0.0223)])  # what is known is charged
    costs = report.cost_breakdown(mixed, run, scores)
    assert costs["total_cost_usd"] == pytest.approx(before["total_cost_usd"] + 0.0223)
    assert (costs["failed_runs"], costs["failed_untimed"]) == (2, 1)
    assert not any("nan" in text for text in report.summary_lines(mixed, MAJORITY) + report.roi_lines(mixed, {"costs": costs}))


def test_compact_allocation_follows_model_order():
    ranks = {name(1, "key"): 4, name(0, "output.dense"): 2, name(0, "query"): 8, name(1, "value"): 0}
    assert report.compact_allocation(ranks, MODULES) == "L0.query:8,L0.output.dense:2,L1.key:4"
    assert report.compact_allocation(ranks) == "L0.query:8,L0.output.dense:2,L1.key:4"  # without the order: by type


# ---------------------------------------------------------------- files


def test_write_renders_every_plot_and_page(tmp_path):
    frame = report.build(trials(history=True), proxy_scores(), COMPACT, MAJORITY, base_params=BASE_PARAMS)
    written = report.write(frame, tmp_path, MAJORITY)
    pngs = ["accuracy_vs_params.png", "accuracy_vs_cost.png", "allocation_heatmap.png", "proxy_vs_accuracy.png",
            "learning_curves.png"]
    for png in pngs:
        path = tmp_path / png
        assert path.is_file() and path.stat().st_size > 5_000, png
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page, text = (tmp_path / "report.html").read_text(), (tmp_path / "report.md").read_text()
    assert page.startswith("<!doctype html>") and "<style>" in page and "<table" in page
    for png in pngs:  # embedded in the page, so it can be mailed or moved alone
        embedded = "data:image/png;base64," + base64.b64encode((tmp_path / png).read_bytes()).decode()
        assert f'src="{embedded}"' in page and f"]({png})" in text
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(pngs)
    assert not list(tmp_path.glob(".*.tmp"))
    on_disk = pd.read_parquet(tmp_path / "report.parquet")
    assert {"ranks_json", "history_json", "roi_per_usd", "gain_vs_uniform_qv"} <= set(on_disk.columns)
    pd.testing.assert_frame_equal(on_disk, written)
    csv = pd.read_csv(tmp_path / "report.csv")
    assert "ranks_json" not in csv and "history_json" not in csv and len(csv) == len(frame)
    assert "ranks_json" not in text and " nan " not in text  # missing values print blank
    # without history the learning-curve plot is not drawn, and a stale one goes away
    report.write(report.build(trials(), proxy_scores(), COMPACT, MAJORITY), tmp_path, MAJORITY)
    assert not (tmp_path / "learning_curves.png").exists()
    assert "Learning curves" not in (tmp_path / "report.html").read_text()


def test_pareto_legend_names_only_what_is_drawn(table, tmp_path, monkeypatch):
    figures = []
    monkeypatch.setattr(report, "save_png", lambda fig, path: figures.append(fig))
    legend = lambda: [t.get_text() for t in figures[-1].axes[0].get_legend().get_texts()]
    report.plot_accuracy_vs_params(table, tmp_path / "a.png")
    assert {"searched (mean ± std)", "baseline (mean ± std)"} <= set(legend())
    report.plot_accuracy_vs_params(table[table.kind == "searched"], tmp_path / "b.png")  # a run without baselines
    assert "searched (mean ± std)" in legend() and "baseline (mean ± std)" not in legend()


def test_print_summary_fits_one_screen(table, tmp_path):
    from rich.console import Console

    console = Console(width=100, record=True)
    report.print_summary(table, MAJORITY, console)
    out = console.export_text()
    assert "uniform_qv" in out and "Spearman" in out and "Pareto front" in out and "+3.00" in out
    assert len(out.splitlines()) <= 40 and max(len(line) for line in out.splitlines()) <= 100
    narrow = Console(width=80, record=True)  # an 80-column terminal folds the model names and cuts no number
    report.print_summary(table, MAJORITY, narrow)
    models = narrow.export_text().split("Majority")[0]
    assert "…" not in models and "+3.00" in models and "+300" in models


def test_print_summary_shows_the_cost_per_seed_its_roi_divides_by(table):
    from rich.console import Console

    console = Console(width=140, record=True)
    report.print_summary(table, MAJORITY, console)
    out = console.export_text()
    line = next(text for text in out.splitlines() if "aaaa" in text)
    header = next(i for i, text in enumerate(out.splitlines()) if "cost $" in text)
    assert "/ seed" in out.splitlines()[header + 1]  # report.md's "cost $ / seed", on two lines
    assert "0.0100" in line and "0.0200" not in line and "+300" in line  # 2 seeds at $0.01: +3.00 pts ÷ $0.01


def make_run_dir(path, *, scale: float = 1.0, name: str = "synthetic", task: str = "synthetic_task", lr: float = 2e-3):
    """A finished run as pipeline.run leaves it (without adapters): trials/, run.json, screen.csv, module_scores.json."""
    (path / "trials").mkdir(parents=True)
    rows = trials()
    for t in rows:
        t = dict(t, accuracy=min(1.0, t["accuracy"] * scale))
        (path / "trials" / f"{t['candidate_id']}-s{t['seed']}.json").write_text(json.dumps(t, indent=1))
    (path / "trials" / "aaaa-s7.json").write_text(json.dumps(dict(rows[0], seed=7)))  # a seed the config dropped
    dropped = dict(next(t for t in rows if t["kind"] == "baseline"), candidate_id="adalora-qqqq", label="adalora")
    (path / "trials" / "adalora-qqqq-s0.json").write_text(json.dumps(dropped))  # a baseline a resume dropped
    failed = {"candidate_id": "bbbb", "kind": "searched", "label": "screen#2", "ranks": MODELS["bbbb"][3], "seed": 1,
              "status": "failed", "error": "RuntimeError: worker died"}
    (path / "trials" / "bbbb-s1.json").write_text(json.dumps(failed))  # as train.keep_failure writes it
    run = {"config": {"name": name, "model": {"name": "tiny"}, "space": {"module_types": TYPES},
                      "train": {"baselines": ["uniform_qv"], "seeds": [0, 1], "lr": lr},
                      "cost": {"price_per_device_hour": {"cpu": 0.0446, "gpu": 1.006}}},
           "seeds": {"train": [0, 1], "screen": 0, "split": 0},
           "task": {"task": task, "train_examples": 100, "eval_examples": 50, "majority_rate": MAJORITY},
           "base_params": BASE_PARAMS, "started_at": "2026-01-01T10:00:00+0000", "finished_at": "2026-01-01T10:30:00+0000"}
    (path / "run.json").write_text(json.dumps(run))
    (path / "module_scores.json").write_text(json.dumps({"unit": UNIT, "seconds": {"grad_norm": 36.0, "params": 0.0}}))
    screen = pd.DataFrame({"candidate_id": ["aaaa", "bbbb", "cccc", "dddd"],
                           "allocation": [COMPACT["aaaa"], COMPACT["bbbb"], COMPACT["cccc"], "L1.value:4"],
                           "trainable_params": [50_000, 100_000, 120_000, 4_000], "survivor": [True, True, True, False]})
    screen.to_csv(path / "screen.csv", index=False)
    return path


def test_rebuild_reproduces_the_pipeline_report(tmp_path, no_plots):
    run_dir = make_run_dir(tmp_path / "run")
    run = json.loads((run_dir / "run.json").read_text())
    # what pipeline.run does: build from its own jobs' trials (the configured seeds and baselines), then write
    kept = [json.loads(p.read_text()) for p in sorted((run_dir / "trials").glob("*.json"))]
    kept = [t for t in kept if t["seed"] in run["seeds"]["train"] and t["label"] != "adalora"]
    report.write(report.build(kept, proxy_scores(), COMPACT, MAJORITY), run_dir, MAJORITY)
    expected = pd.read_parquet(run_dir / "report.parquet")
    assert expected.params_pct_of_base.notna().all()  # write took base_params from run.json

    rebuilt = report.rebuild(run_dir)
    again = pd.read_parquet(run_dir / "report.parquet")
    pd.testing.assert_frame_equal(again, expected)
    pd.testing.assert_frame_equal(rebuilt, expected)
    assert 7 not in set(again.seed) and len(again) == 6  # the failed run and the dropped baseline are left out
    assert "adalora" not in set(again.label)
    assert rebuilt.attrs["failed"] == ["bbbb-s1 (RuntimeError: worker died)"]
    assert row(again, "aaaa").proxy_grad_norm == 8 * 0.25 + 4 * 2.0  # Σ rank × unit score (L0.query 0.25, L1.key 2.0)
    text = (run_dir / "report.md").read_text()
    assert "Screening vs training cost" in text and "Run wall time: 1800 s" in text
    costs = report.cost_breakdown(again, run, json.loads((run_dir / "module_scores.json").read_text()),
                                  pd.read_csv(run_dir / "screen.csv"))
    assert costs["candidates_screened"] == 4 and costs["screen_seconds"] == 36.0
    assert costs["screen_cost_usd"] == pytest.approx(0.01 * 0.0446)
    assert costs["train_cost_usd"] == pytest.approx(0.064)
    assert costs["compute_to_best_s"] == pytest.approx(36.0 + 3600 * 0.020 / 0.0446)  # best searched: cccc


def test_rebuild_of_an_unfinished_run_says_so(tmp_path, no_plots):
    run_dir = make_run_dir(tmp_path / "run")
    assert not report.rebuild(run_dir).attrs["unfinished"]  # finished (an older run.json, without sessions)
    assert "unfinished" not in (run_dir / "report.md").read_text()
    run = json.loads((run_dir / "run.json").read_text())
    run["sessions"] = [{"started_at": run["started_at"], "finished_at": run["finished_at"]},
                       {"started_at": "2026-01-02T10:00:00+0000"}]  # resumed, not finished again (yet)
    (run_dir / "run.json").write_text(json.dumps(run))
    rebuilt = report.rebuild(run_dir)
    warning = ("WARNING: the run is unfinished: this report holds the 6 training run(s) done so far; "
               "`lora-search run <config> --resume` trains the rest")
    assert rebuilt.attrs["unfinished"] and report.summary_lines(rebuilt, MAJORITY)[0] == warning
    assert warning in (run_dir / "report.md").read_text()
    # a `screen --resume` to see what is left times its session but trains nothing: the run is still unfinished
    run["sessions"].append({"started_at": "2026-01-02T11:00:00+0000", "finished_at": "2026-01-02T11:01:00+0000",
                            "screen_only": True})
    (run_dir / "run.json").write_text(json.dumps(run))
    assert report.rebuild(run_dir).attrs["unfinished"]


def test_rebuild_scores_a_calibrated_run_as_its_screen_did(tmp_path, no_plots):
    """module_scores.json of a calibrated run carries rank caps: rank above the calibrated rank earns nothing."""
    run_dir = make_run_dir(tmp_path / "run")
    caps = {name(0, "query"): 2, name(1, "key"): 2}
    stored = {"unit": {**UNIT, "calibrated": UNIT["grad_norm"]}, "rank_caps": {"calibrated": caps}}
    (run_dir / "module_scores.json").write_text(json.dumps(stored))
    rebuilt = report.rebuild(run_dir)
    assert row(rebuilt, "aaaa").proxy_calibrated == 2 * 0.25 + 2 * 2.0  # ranks 8 and 4 count as 2 and 2
    assert row(rebuilt, "aaaa").proxy_grad_norm == 8 * 0.25 + 4 * 2.0


def test_rebuild_refuses_a_directory_without_results(tmp_path):
    from orchestrator.errors import UserError

    with pytest.raises(UserError, match="run.json"):
        report.rebuild(tmp_path)
    (tmp_path / "run.json").write_text(json.dumps({"task": {"majority_rate": 0.5}}))
    with pytest.raises(UserError, match="no finished model"):
        report.rebuild(tmp_path)


BACKUP, RESUME = "restore it from a backup", "delete it and run `lora-search run ... --resume`"


@pytest.mark.parametrize("file, content, problem, fix", [
    ("run.json", '{"task": {"majority', "cannot be read (Unterminated string", BACKUP),
    ("run.json", "{}", "has no 'task.majority_rate'", BACKUP),
    ("trials/aaaa-s0.json", "", "cannot be read (Expecting value", RESUME),
    ("trials/aaaa-s0.json", json.dumps({"seed": 0, "accuracy": 0.8}), "has no 'candidate_id'", RESUME),
    ("module_scores.json", json.dumps({"unit": UNIT, "probe": 1}), "does not hold module scores", RESUME),
    ("screen.csv", "candidate_id,survivor\naaaa,True\n", "has no 'allocation'", RESUME),
    ("screen.csv", "", "cannot be read (No columns to parse", RESUME),
    # a wrong-typed value failed deep in pandas or ModuleScores with a traceback
    ("run.json", json.dumps({"task": {"majority_rate": "0.5"}}), """has 'task.majority_rate' = "0.5", not a number""",
     BACKUP),
    ("module_scores.json", json.dumps({"unit": [1, 2]}), "has 'unit' = [1, 2], not a mapping", RESUME),
    ("trials/aaaa-s0.json", json.dumps(dict(trials()[0], accuracy="0.8")), """has 'accuracy' = "0.8", not a number""",
     RESUME),
])
def test_rebuild_names_a_corrupt_stored_file_and_the_fix(tmp_path, file, content, problem, fix):
    from orchestrator.errors import UserError

    run_dir = make_run_dir(tmp_path / "run")
    (run_dir / file).write_text(content)
    with pytest.raises(UserError) as err:
        report.rebuild(run_dir)
    assert f"'{run_dir / file}' {problem}" in str(err.value) and fix in str(err.value)
    assert not list(run_dir.glob("report.*"))


def test_cli_report_of_a_corrupt_run_is_one_line(monkeypatch, capsys, tmp_path):
    from test_registry import cli

    run_dir = make_run_dir(tmp_path / "run")
    (run_dir / "run.json").write_text("")
    code, _, err = cli(monkeypatch, capsys, "report", run_dir)
    assert code == 2 and err.count("\n") == 1 and f"'{run_dir / 'run.json'}' cannot be read" in err


def test_compare_two_runs(tmp_path, no_plots):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    first = make_run_dir(tmp_path / "results" / "one", name="one")
    second = make_run_dir(tmp_path / "results" / "two", name="two", task="other_task", scale=0.9, lr=4e-3)
    for run_dir in (first, second):
        report.rebuild(run_dir)
    table = report.compare([first, second], tmp_path / "cmp")
    assert table.run.tolist() == ["one", "two"] and table.task.tolist() == ["synthetic_task", "other_task"]
    assert table.best_searched.tolist() == ["screen#3 · cccc", "screen#3 · cccc"]
    assert table.gain_points[0] == pytest.approx(7.0) and table.gain_points[1] == pytest.approx(100 * 0.9 * 0.07)
    assert table.baseline.tolist() == ["uniform_qv", "uniform_qv"]
    assert table.total_cost_usd[0] == pytest.approx(0.064 + 0.01 * 0.0446)
    for name in ("compare.csv", "compare.md", "compare.png"):
        assert (tmp_path / "cmp" / name).is_file(), name
    assert (tmp_path / "cmp" / "compare.png").stat().st_size > 5_000
    assert report.default_compare_dir([first, second]) == tmp_path / "results" / "compare-one-two"
    assert table.settings.tolist() == ["train.lr=0.002", "train.lr=0.004"]  # the run names differ too: not a setting
    assert "train.lr=0.004" in (tmp_path / "cmp" / "compare.md").read_text()

    result = CliRunner().invoke(app, ["compare", str(first), str(second)], terminal_width=120)
    assert result.exit_code == 0, result.output
    assert "runs compared" in result.output and (tmp_path / "results" / "compare-one-two" / "compare.png").is_file()
    assert "Settings that differ:\n  one: train.lr=0.002\n  two: train.lr=0.004" in result.output
    result = CliRunner().invoke(app, ["report", str(first)], terminal_width=120)
    assert result.exit_code == 0, result.output
    assert "uniform_qv" in result.output and "Screening" in result.output


def test_compare_of_a_missing_run_names_its_own_argument(tmp_path, no_plots):
    good = make_run_dir(tmp_path / "good")
    report.rebuild(good)
    with pytest.raises(UserError) as err:  # it said `report:`, the command the user did not run
        report.compare([good, tmp_path / "nonexistent"], tmp_path / "cmp")
    assert str(err.value).startswith(f"compare RUN_DIRS: '{tmp_path / 'nonexistent' / 'report.parquet'}' not found")


def test_compare_counts_device_hours_and_cost_over_every_stage(tmp_path, no_plots, monkeypatch):
    plain, calibrated = make_run_dir(tmp_path / "plain", name="plain"), make_run_dir(tmp_path / "cal", name="cal")
    run = json.loads((calibrated / "run.json").read_text())
    run["calibration"] = {"trainings": 6, "seconds": 600.0, "device_hours": 0.17, "cost_usd": 0.17 * 0.0446}
    (calibrated / "run.json").write_text(json.dumps(run))
    for run_dir in (plain, calibrated):
        report.rebuild(run_dir)
    figures = []
    monkeypatch.setattr(report, "save_png", lambda fig, path: figures.append(fig))
    table = report.compare([plain, calibrated], tmp_path / "cmp").set_index("run")
    train_dh = 3600 * 0.064 / 0.0446 / 3600  # every trial's device_hours = cost / price
    assert "device_hours" not in table  # it held training only, beside a total_cost_usd of every stage
    assert table.train_device_hours.tolist() == pytest.approx([train_dh, train_dh])
    assert table.loc["plain", "total_device_hours"] == pytest.approx(train_dh + 36.0 / 3600)  # + the probe
    assert table.loc["cal", "total_device_hours"] == pytest.approx(train_dh + 36.0 / 3600 + 0.17)
    assert table.loc["cal", "total_cost_usd"] == pytest.approx(0.064 + 0.01 * 0.0446 + 0.17 * 0.0446)
    assert figures[-1].axes[1].get_xlabel() == "total run cost, every stage (USD)"


def test_the_run_commands_results_line_names_what_is_there_and_the_storage_copy(tmp_path, no_plots, monkeypatch):
    from typer.testing import CliRunner

    from orchestrator import pipeline
    from orchestrator.cli import app

    run_dir = make_run_dir(tmp_path / "results" / "one", name="one")
    run = json.loads((run_dir / "run.json").read_text())
    (run_dir / "run.json").write_text(json.dumps(run | {"copied_to": "s3://bucket/runs/one/results"}))
    monkeypatch.setattr(pipeline, "run", lambda cfg, **kwargs: report.rebuild(cfg.run_dir))  # no study.db, no adapters
    result = CliRunner().invoke(app, ["run", "search_spaces/quickstart.yaml", f"results_dir={tmp_path / 'results'}",
                                      "name=one"], terminal_width=200)
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())  # rich wraps long lines
    assert f"Results: {run_dir}/ (report.md, report.csv, report.parquet, screen.csv) Copied to: s3://bucket/runs/one/results" in said


def compare_rows(tasks: list[str]) -> pd.DataFrame:
    """What report.compare returns, for a proxy-ranked run and a random-search run without baselines."""
    return pd.DataFrame({"run": ["newsgroups-budget37k-minimise", "newsgroups-budget37k-random"], "task": tasks,
                         "best_searched": ["screen#1 · a471bbe1df8", "screen#4 · a6626f43480"],
                         "best_accuracy": [0.48167, 0.46567], "best_accuracy_std": [0.04148, 0.02511],
                         "baseline": ["uniform_qv", None], "baseline_accuracy": [0.39933, np.nan],
                         "gain_points": [8.233, np.nan], "p_value": [0.05447, np.nan], "total_cost_usd": [0.01553, 0.02461],
                         "settings": ["screen.allocator=optuna", "screen.allocator=random"]})


def test_differing_settings_names_only_what_the_runs_disagree_on():
    base = {"name": "a", "results_dir": "results", "register": {"name": None},
            "space": {"ranks": [1, 2], "budget": {"params": 9216}}, "train": {"lr": 0.002, "seeds": [0]}}
    other = {"name": "b", "results_dir": "/tmp/r", "register": {"name": "mine"},
             "space": {"ranks": [1, 2, 4], "budget": {"params": 18432}}, "train": {"lr": 0.002}}
    assert report.differing_settings([base, other]) == [
        "space.ranks=[1, 2]; space.budget.params=9216; train.seeds=[0]",
        "space.ranks=[1, 2, 4]; space.budget.params=18432; train.seeds=(unset)"]
    assert report.differing_settings([base, dict(base, name="c")]) == ["", ""]  # only where the files go differs


@pytest.mark.parametrize("tasks", [["newsgroups20"] * 2, ["newsgroups20", "rotten_tomatoes"]])
def test_compare_table_in_80_columns_cuts_no_number(tasks):
    from rich.console import Console

    console = Console(width=80, record=True)
    report.print_compare(compare_rows(tasks), console)
    shown = console.export_text()
    assert all(len(line) <= 80 for line in shown.splitlines())
    assert "…" not in shown and "nan" not in shown and "None" not in shown  # a missing baseline is blank
    for number in ("48.17", "4.15", "39.93", "+8.23", "0.0545", "0.0155", "46.57", "2.51", "0.0246"):
        assert number in shown, number
    assert ("runs compared on newsgroups20" in shown) == (len(set(tasks)) == 1)  # a shared task goes to the title
    lines = shown.splitlines()
    names = [line.split(" ")[0] for line in lines[lines.index(next(l for l in lines if l.startswith("─"))) + 1:]]
    assert "".join(names).startswith("newsgroups-budget37k-minimise")  # a long run name folds onto the next line


def test_a_calibrated_run_counts_its_calibration_as_a_stage():
    table = report.add_derived(report.build(trials(), proxy_scores(), COMPACT, MAJORITY))
    run = {"config": {"cost": {"price_per_device_hour": {"cpu": 0.05}}},
           "calibration": {"trainings": 4, "seconds": 40.0, "device_hours": 0.011, "cost_usd": 0.0005}}
    plain = report.cost_breakdown(table, {"config": run["config"]}, {"seconds": {"grad_norm": 36.0}})
    costs = report.cost_breakdown(table, run, {"seconds": {"grad_norm": 36.0}})
    assert plain["calibrate_runs"] == 0 and costs["calibrate_runs"] == 4
    assert costs["total_cost_usd"] == pytest.approx(plain["total_cost_usd"] + 0.0005)
    assert costs["compute_to_best_s"] == pytest.approx(plain["compute_to_best_s"] + 40.0)
    stages = report.cost_table(costs).set_index("stage")
    assert stages.loc["calibrate (short trainings)", "device_hours"] == pytest.approx(0.011)
    assert stages.share_of_cost.sum() == pytest.approx(1.0)
    assert "calibrate (short trainings)" not in set(report.cost_table(plain).stage)
    line = next(text for text in report.roi_lines(table, {"costs": costs}) if text.startswith("Screening"))
    assert "calibration: 4 short trainings, 40 s" in line


def test_a_resumed_runs_wall_time_adds_up_its_sessions():
    at = "2026-01-01T{}+0000".format
    one = {"started_at": at("10:00:00"), "finished_at": at("10:30:00")}  # a run.json from before sessions were kept
    assert report.run_wall_seconds(one) == (1800.0, 1, 0)
    resumed = {"sessions": [{"started_at": at("10:00:00")},  # its driver died: no finish, not counted
                            {"started_at": at("11:00:00"), "finished_at": at("11:20:00")},
                            {"started_at": at("12:00:00"), "finished_at": at("12:00:04")}]}
    assert report.run_wall_seconds(resumed) == (1204.0, 3, 1)
    assert math.isnan(report.run_wall_seconds({"sessions": [{"started_at": at("10:00:00")}]})[0])  # none timed
    # across a daylight-saving change (or read in another time zone) the stored offsets count: 2 hours, not 1
    autumn = {"started_at": "2026-10-25T01:30:00+0200", "finished_at": "2026-10-25T02:30:00+0100"}
    assert report.run_wall_seconds(autumn) == (7200.0, 1, 0)
    table = report.add_derived(report.build(trials(), proxy_scores(), COMPACT, MAJORITY))
    costs = report.cost_breakdown(table, resumed, {"seconds": {"grad_norm": 36.0}})
    blocks = report._sections(table, MAJORITY, {"costs": costs}, [])
    notes = next(text for kind, text in blocks if kind == "p" and str(text).startswith("Compute to the best"))
    assert notes.endswith("Run wall time: 1204 s, over 3 sessions (the run was resumed); 1 stopped before finishing "
                          "(not timed).")


def test_the_screens_cost_counts_the_probes_warm_up():
    """With screen.probe_warmup_steps > 0 the probe adapter trains before the proxies score (module_scores.json
    `warmup_seconds`, once for every proxy); the screen's seconds and cost left that out."""
    table = report.build(trials(), proxy_scores(), COMPACT, MAJORITY)
    run = {"config": {"cost": {"price_per_device_hour": {"cpu": 0.0446}}}}
    cold = report.cost_breakdown(table, run, {"seconds": {"grad_norm": 2.0, "params": 1.0}})
    costs = report.cost_breakdown(table, run, {"seconds": {"grad_norm": 2.0, "params": 1.0}, "warmup_seconds": 40.0})
    assert costs["screen_seconds"] == pytest.approx(43.0) and costs["probe_warmup_seconds"] == 40.0
    assert costs["screen_cost_usd"] == pytest.approx(43.0 / 3600 * 0.0446)
    assert costs["compute_to_best_s"] == pytest.approx(cold["compute_to_best_s"] + 40.0)
    assert costs["total_device_hours"] == pytest.approx(cold["total_device_hours"] + 40.0 / 3600)
    assert costs["screen_share_of_cost"] == pytest.approx(costs["screen_cost_usd"] / costs["total_cost_usd"])
    line = next(text for text in report.roi_lines(table, {"costs": costs}) if text.startswith("Screening"))
    assert "from a 43.0 s probe, its 40.0 s warm-up included" in line
    notes = [text for kind, text in report._sections(table, MAJORITY, {"costs": costs}, []) if kind == "p"]
    assert any("The screen's 43.0 s include the probe's 40.0 s warm-up (screen.probe_warmup_steps)." in n for n in notes)


def routed_table() -> pd.DataFrame:
    """The synthetic run with routing on: cccc also trained as sparse routed experts (kind routed)."""
    rows = [dict(r, method="lora", gating="", experts=0) for r in trials()]
    routed = dict(next(r for r in rows if r["candidate_id"] == "cccc"), candidate_id="rrrr", kind="routed",
                  label="screen#3 sparse", method="routed", gating="topk", experts=4, trainable_params=110_000,
                  accuracy=0.90, routed_modules=1, expert_rank_sum=12)  # budget_expert_ranks dropped L0.value
    scores = proxy_scores() | {"rrrr": proxy_scores()["cccc"]}
    return report.build(rows + [routed], scores, COMPACT | {"rrrr": COMPACT["cccc"]}, MAJORITY)


def test_routed_models_get_a_point_of_their_own_in_both_scatter_plots(monkeypatch, tmp_path):
    table = routed_table()
    figures = []
    monkeypatch.setattr(report, "save_png", lambda fig, path: figures.append(fig))
    report.plot_accuracy_vs_params(table, tmp_path / "a.png")
    report.plot_proxy_vs_accuracy(table, tmp_path / "b.png")

    def drawn(ax) -> set:  # (x, marker, colour) of every mean marker (errorbar draws it as a line)
        return {(x, line.get_marker(), line.get_color()) for line in ax.lines
                if line.get_marker() not in (None, "None", "") for x in line.get_xdata()}

    params, *panels = [ax for fig in figures for ax in fig.axes if ax.get_visible()]
    assert len(panels) == 2  # grad_norm, params
    # it had a label and a Pareto ring, but no marker: the kind loops drew searched and baseline only
    assert 110_000 in {x for x, _, _ in drawn(params)}
    assert (110_000, "D", report.ROUTED_COLOR) in drawn(params)
    assert "routed (mean ± std)" in [t.get_text() for t in params.get_legend().get_texts()]
    for ax in panels:
        proxy = "proxy_" + ax.get_xlabel().removeprefix("proxy score (").removesuffix(")")
        assert (row(table, "rrrr")[proxy], "D", report.ROUTED_COLOR) in drawn(ax)
        assert "routed" in [t.get_text() for t in ax.get_legend().get_texts()]


def test_proxy_rho_leaves_out_routed_models_which_share_their_allocations_scores():
    table = routed_table()
    rho = report.proxy_correlations(table)
    pd.testing.assert_frame_equal(rho, report.proxy_correlations(table[table.candidate_id != "rrrr"]))
    assert (rho.models == 4).all()
    assert any(line.startswith("Spearman ρ of proxy vs accuracy over 4 models") for line in report.roi_lines(table))


def test_a_routed_rows_sites_and_rank_are_its_routed_ones_not_its_allocations():
    table = routed_table()
    assert (row(table, "cccc").num_adapted_modules, row(table, "cccc").total_rank) == (2, 18)
    routed = row(table, "rrrr")
    assert (routed.num_adapted_modules, routed.total_rank, routed.adapters_per_type) == (1, 12, "")
    assert table.num_adapted_modules.dtype.kind == table.total_rank.dtype.kind == "i"


def test_the_per_seed_table_shows_routing_columns_only_in_a_run_with_routed_models():
    plain = report.build([dict(r, method="lora", experts=0) for r in trials()], proxy_scores(), COMPACT, MAJORITY)
    assert "experts" not in report.rows_table(plain)  # every row 0: a column that says nothing
    assert report.rows_table(routed_table()).experts.tolist().count(4) == 1


def test_sentences_say_n_a_for_a_missing_number_never_nan(tmp_path, no_plots):
    free = report.build([dict(r, cost_usd=0.0) for r in trials()], proxy_scores(), COMPACT, MAJORITY)
    run = {"config": {"cost": {"price_per_device_hour": {"cpu": 0.0}}}}  # own hardware: the config accepts 0
    lines = report.roi_lines(free, {"costs": report.cost_breakdown(free, run, {"seconds": {"grad_norm": 36.0}})})
    assert "+7.00 points, n/a points per $ of training, +58.33 points per M params" in lines[0]
    assert "($0.00000, n/a of cost)" in lines[-1] and not any("nan" in line for line in lines)
    unpriced = report.build([dict(r, cost_usd=None, device_hours=None) for r in trials()], proxy_scores(), COMPACT,
                            MAJORITY)
    assert "Training cost: n/a device-hours, n/a" in report.summary_lines(unpriced, MAJORITY)  # it said $0.0000
    run_dir = make_run_dir(tmp_path / "run")
    for path in (run_dir / "trials").glob("*.json"):
        trial = json.loads(path.read_text())
        if trial["kind"] == "searched":
            path.write_text(json.dumps(trial | {"accuracy": None, "status": "failed"}))
    report.rebuild(run_dir)  # every searched model failed: there is no best searched model to reach
    text = (run_dir / "report.md").read_text()
    assert "nan" not in text and "compute to best" not in text.lower()
