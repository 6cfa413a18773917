"""train.lr_grid: each model's learning rate picked on validation before it trains (orchestrator/lr_tuning.py)."""

import json

import pandas as pd
import pytest

from orchestrator import lr_tuning, report
from orchestrator.config import load_config
from orchestrator.errors import UserError
from orchestrator.train import TrainJob

GRID = ["train.lr_grid=[8e-3,2e-3,4e-3,8e-3]", "data.validation_size=64"]


def jobs(seeds=(0, 1)) -> list[TrainJob]:
    return [TrainJob(cid, kind, label, {"m": 1}, seed) for cid, kind, label in
            (("aaaa", "searched", "screen#1"), ("qqqq", "baseline", "uniform_qv")) for seed in seeds]


def trial(val_accuracy, val_f1=0.5, status="completed", wall=100.0) -> dict:
    return {"val_accuracy": val_accuracy, "val_f1": val_f1, "accuracy": val_accuracy - 0.01, "status": status,
            "train_wall_s": wall, "device_hours": wall / 3600, "cost_usd": 0.0446 * wall / 3600}


def test_the_grid_is_sorted_once_and_its_sub_run_is_the_first_seed_inside_the_run(tmp_path):
    cfg = load_config(None, GRID + [f"results_dir={tmp_path}", "name=demo", "train.seeds=[3,1]"])
    assert cfg.train.lr_grid == [2e-3, 4e-3, 8e-3]
    sub = lr_tuning.sweep_config(cfg)
    assert sub.run_dir == (tmp_path / "demo" / "demo.lr-sweep").resolve()
    assert sub.train.seeds == [3] and sub.train.lr_grid is None and sub.train.epochs == cfg.train.epochs
    # ASHA would stop some rates' trainings early, and the sweep compares last epochs
    assert cfg.train.early_stopping and not sub.train.early_stopping


def test_a_run_name_must_leave_room_for_the_sweeps_suffix():
    with pytest.raises(UserError, match=r"^name: .* leaves no room for the '\.lr-sweep' of its sub-run \(train\.lr_grid\)"):
        load_config(None, GRID + ["name=" + "x" * 95])
    assert load_config(None, ["name=" + "x" * 95]).name == "x" * 95  # no grid, no sub-run


def test_a_name_that_fits_both_sub_runs_is_accepted_and_the_sweep_of_a_calibrated_run_checks_no_more():
    """The sweep's own config keeps screen.rank_by: calibrated, but a sub-run has no sub-runs: its name is not checked
    for '.calibration' room again (an 85-character name passed the config check, then failed after the screen)."""
    name = "x" * (100 - len(".calibration"))  # the longest name a calibrated run may have
    cfg = load_config(None, GRID + ["name=" + name, "screen.rank_by=calibrated"])
    assert lr_tuning.sweep_config(cfg).name == name + ".lr-sweep"


def test_sweep_jobs_try_every_lr_on_the_first_seed_under_ids_that_name_the_lr():
    tried = lr_tuning.sweep_jobs(jobs(), [2e-3, 8e-3], seed=0)
    assert [(t.job_id, t.lr, t.label) for t in tried] == [
        ("aaaa-lr0.002-s0", 2e-3, "screen#1"), ("aaaa-lr0.008-s0", 8e-3, "screen#1"),
        ("qqqq-lr0.002-s0", 2e-3, "uniform_qv"), ("qqqq-lr0.008-s0", 8e-3, "uniform_qv")]


def test_each_model_gets_its_best_validation_lr_then_f1_then_the_lower_lr():
    tried = lr_tuning.sweep_jobs(jobs(), [2e-3, 4e-3, 8e-3], seed=0)
    results = {"aaaa-lr0.002-s0": trial(0.50), "aaaa-lr0.004-s0": trial(0.61, 0.40), "aaaa-lr0.008-s0": trial(0.61, 0.45),
               "qqqq-lr0.002-s0": trial(0.55), "qqqq-lr0.004-s0": trial(0.55),  # a tie in both: the lower lr
               "qqqq-lr0.008-s0": {"status": "failed", "error": "boom"}}
    table = lr_tuning.sweep_table(tried, results)
    chosen = table[table.chosen].set_index("candidate_id").lr.to_dict()
    assert chosen == {"aaaa": 8e-3, "qqqq": 2e-3}
    assert table.set_index(["candidate_id", "lr"]).status[("qqqq", 8e-3)] == "failed"
    assert table.reused.sum() == 2  # the chosen, completed trainings become each model's first seed


def test_a_model_whose_sweep_all_failed_keeps_train_lr(tmp_path):
    tried = lr_tuning.sweep_jobs(jobs(seeds=(0,)), [2e-3, 8e-3], seed=0)
    failed = {"status": "failed", "error": "boom"}
    table = lr_tuning.sweep_table(tried, {"aaaa-lr0.002-s0": trial(0.5), "qqqq-lr0.002-s0": failed,
                                          "qqqq-lr0.008-s0": failed})
    assert lr_tuning.summary(table)["chosen"] == {"aaaa": 2e-3}  # pipeline.tuned_learning_rates: None → train.lr
    cfg = load_config(None, GRID + [f"results_dir={tmp_path}"])
    from orchestrator.data import Split, TaskData

    task = TaskData("t", ["x", "y"], Split(["a"] * 8, [0] * 8), Split(["a"] * 8, [0] * 8), validation=Split(["a"] * 8, [0] * 8))
    text = lr_tuning.markdown(table, cfg, task)
    assert "| qqqq           |            |            | none finished |" in text


def test_the_sweeps_table_has_a_row_per_model_and_names_the_models_at_the_grids_edge():
    tried = lr_tuning.sweep_jobs(jobs(seeds=(0,)) + [TrainJob("bbbb", "searched", "screen#2", {"m": 1}, 0)],
                                 [8e-3, 1.6e-2, 3.2e-2], seed=0)
    accuracies = {"aaaa": (0.60, 0.67, 0.70), "qqqq": (0.66, 0.73, 0.72), "bbbb": (0.68, 0.68, 0.05)}
    table = lr_tuning.sweep_table(tried, {t.job_id: trial(accuracies[t.candidate_id.split("-")[0]][i % 3])
                                          for i, t in enumerate(tried)})
    from orchestrator.data import Split, TaskData

    split = Split(["a"] * 8, [0] * 8)
    text = lr_tuning.markdown(table, load_config(None, GRID), TaskData("t", ["x", "y"], split, split, validation=split))
    assert "| screen#1   | aaaa           | 60.00      | 67.00      | 70.00      | 0.032       |" in text
    assert "| uniform_qv | qqqq           | 66.00      | 73.00      | 72.00      | 0.016       |" in text
    assert text.count("| screen#") == 2 + 6  # one row per model above, one per training below
    assert ("At the edge of the grid, so their best lr may lie beyond it: screen#2 at the lowest (0.008); screen#1 at "
            "the highest (0.032).") in text
    assert lr_tuning.at_the_edge(table[table.candidate_id == "qqqq"]) == ""


def test_the_sweeps_cost_counts_only_the_trainings_the_run_does_not_reuse():
    tried = lr_tuning.sweep_jobs(jobs(seeds=(0,)), [2e-3, 8e-3], seed=0)
    table = lr_tuning.sweep_table(tried, {"aaaa-lr0.002-s0": trial(0.5, wall=10), "aaaa-lr0.008-s0": trial(0.6, wall=20),
                                          "qqqq-lr0.002-s0": trial(0.7, wall=30), "qqqq-lr0.008-s0": trial(0.4, wall=40)})
    summary = lr_tuning.summary(table)
    assert summary["trainings"] == 2 and summary["seconds"] == 50.0  # aaaa at 2e-3 and qqqq at 8e-3
    assert summary["seconds_by_candidate"] == {"aaaa": 10.0, "qqqq": 40.0}
    assert summary["grid"] == [2e-3, 8e-3] and summary["chosen"] == {"aaaa": 8e-3, "qqqq": 2e-3}


def test_the_chosen_training_becomes_the_models_first_seed_without_training_again(tmp_path):
    cfg = load_config(None, GRID + [f"results_dir={tmp_path}", "name=demo", "train.seeds=[0,1]"])
    sub = lr_tuning.sweep_config(cfg)
    tried = lr_tuning.sweep_jobs(jobs(seeds=(0,))[:1], [2e-3, 8e-3], seed=0)
    for job, accuracy in zip(tried, (0.5, 0.6)):  # what train.keep_result leaves in the sub-run
        (sub.run_dir / "adapters" / job.candidate_id).mkdir(parents=True)
        (sub.run_dir / "adapters" / job.candidate_id / "adapter_model.safetensors").write_bytes(job.candidate_id.encode())
        (sub.run_dir / "trials").mkdir(exist_ok=True)
        (sub.run_dir / "trials" / f"{job.job_id}.json").write_text(json.dumps(
            {"candidate_id": job.candidate_id, "seed": 0, "lr": job.lr, "adapter_dir": f"adapters/{job.candidate_id}",
             **trial(accuracy)}))
    table = lr_tuning.sweep_table(tried, {t.job_id: trial(a) for t, a in zip(tried, (0.5, 0.6))})
    lr_tuning.reuse_chosen(cfg, sub, table, {t.candidate_id: t for t in tried})
    kept = json.loads((cfg.run_dir / "trials" / "aaaa-s0.json").read_text())
    assert (kept["candidate_id"], kept["lr"], kept["adapter_dir"], kept["lr_sweep_trial"]) == (
        "aaaa", 8e-3, "adapters/aaaa", "aaaa-lr0.008-s0")
    assert (cfg.run_dir / "adapters" / "aaaa" / "adapter_model.safetensors").read_bytes() == b"aaaa-lr0.008"
    assert not (cfg.run_dir / "trials" / "aaaa-s1.json").exists()  # the other seeds train at 8e-3


def test_the_report_shows_each_models_lr_and_the_sweep_as_a_stage_of_its_own():
    from test_report_roi import COMPACT, MAJORITY, proxy_scores, trials

    rows = [dict(row, lr=8e-3 if row["kind"] == "searched" else 2e-3) for row in trials()]
    table = report.add_derived(report.build(rows, proxy_scores(), COMPACT, MAJORITY))
    assert set(report.models_table(table)["lr"]) == {"0.008", "0.002"}
    assert "lr" not in report.models_table(report.add_derived(report.build(trials(), proxy_scores(), COMPACT, MAJORITY)))
    from rich.console import Console

    narrow = Console(width=80, record=True)  # the terminal folds each model's lr into its name: no number is cut
    report.print_summary(table, MAJORITY, narrow)
    models = narrow.export_text().split("Majority")[0]
    assert "lr=0.008" in models and "lr=0.002" in models and "…" not in models and "+300" in models
    run = {"config": {"cost": {"price_per_device_hour": {"cpu": 0.05}}},
           "lr_sweep": {"trainings": 6, "seconds": 600.0, "device_hours": 0.17, "cost_usd": 0.0074,
                        "seconds_by_candidate": {"aaaa": 200.0, "cccc": 300.0}}}
    plain = report.cost_breakdown(table, {"config": run["config"]}, {"seconds": {"grad_norm": 36.0}})
    costs = report.cost_breakdown(table, run, {"seconds": {"grad_norm": 36.0}})
    assert costs["total_cost_usd"] == pytest.approx(plain["total_cost_usd"] + 0.0074)
    assert costs["compute_to_best_s"] == pytest.approx(plain["compute_to_best_s"] + 300.0)  # cccc is the best searched
    stages = report.cost_table(costs).set_index("stage")
    assert stages.loc["tune lr (each model × lr, first seed)", "items"] == 6
    line = next(text for text in report.roi_lines(table, {"costs": costs}) if text.startswith("Screening"))
    assert "lr sweep: 6 trainings, 600 s" in line
    assert isinstance(report.rows_table(table).lr, pd.Series)


# ---------------------------------------------------------------- the real thing: a run on a slice of the shipped data


def test_a_run_without_validation_examples_is_refused_before_anything_is_written(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "run", "search_spaces/quickstart.yaml",
                           f"results_dir={tmp_path}", "train.lr_grid=[1e-3,1e-2]"],
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert done.stderr.startswith("error: train.lr_grid: picks each model's learning rate on held-out training examples")
    assert "data.validation_size=300" in done.stderr and list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_run_tunes_each_models_lr_on_validation_trains_the_other_seeds_at_it_and_resumes(tmp_path, embedded_ray):
    from orchestrator import pipeline

    cfg = load_config("search_spaces/quickstart.yaml", [
        "name=slice", f"results_dir={tmp_path}", "data.train_size=192", "data.eval_size=96", "data.validation_size=32",
        "model.max_length=16", "screen.num_trials=2", "screen.candidates_per_trial=4", "screen.survivors=1",
        "screen.proxy_batches=2", "train.baselines=[]", "train.seeds=[0,1]", "train.lr_grid=[1e-3,1e-2]"])
    table = pipeline.run(cfg)
    trials = sorted((cfg.run_dir / "trials").glob("*.json"))
    written = {p.name: p.stat().st_mtime_ns for p in trials}
    again = pipeline.run(cfg, resume=True)
    sweep = pd.read_csv(cfg.run_dir / "lr_sweep.csv")
    assert sorted(sweep.lr) == [1e-3, 1e-2] and sweep.chosen.sum() == 1 and sweep.val_accuracy.notna().all()
    best = sweep[sweep.chosen].iloc[0]
    assert best.val_accuracy == sweep.val_accuracy.max()
    assert len(list((cfg.run_dir / "slice.lr-sweep" / "trials").glob("*.json"))) == 2
    assert len(table) == 2 and set(table.lr) == {best.lr}  # both seeds at the chosen lr
    first = json.loads((cfg.run_dir / "trials" / f"{best.candidate_id}-s0.json").read_text())
    assert first["lr_sweep_trial"] == f"{best.candidate_id}-lr{best.lr:g}-s0"  # reused, not trained twice
    assert (cfg.run_dir / first["adapter_dir"] / "adapter_model.safetensors").is_file()
    assert "lr_sweep_trial" not in json.loads((cfg.run_dir / "trials" / f"{best.candidate_id}-s1.json").read_text())
    run = json.loads((cfg.run_dir / "run.json").read_text())
    assert run["lr_sweep"]["chosen"] == {best.candidate_id: best.lr} and run["lr_sweep"]["trainings"] == 1
    assert "tune lr (each model × lr, first seed)" in (cfg.run_dir / "report.md").read_text()
    assert {p.name: p.stat().st_mtime_ns for p in sorted((cfg.run_dir / "trials").glob("*.json"))} == written
    assert again.accuracy.tolist() == table.accuracy.tolist()  # the resumed run trained nothing again
    from orchestrator.registry import Registry

    [entry] = Registry(cfg.registry_root).list("rotten_tomatoes")  # the adapter keeps the rate it was trained at
    assert entry.metrics["lr"] == best.lr and entry.metrics["candidate_id"] == best.candidate_id
    sessions = json.loads((cfg.run_dir / "run.json").read_text())["sessions"]
    # the resume found the run finished and trained nothing: no new session (each one used to add "resumed")
    assert len(sessions) == 1 and sessions[0]["finished_at"] >= sessions[0]["started_at"]
    assert "the run was resumed" not in (cfg.run_dir / "report.md").read_text()
