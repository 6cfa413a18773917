"""`lora-search screen` stops after the screen and lists what training would do; `lora-search train RUN_DIR` goes on
from the run directory alone, with the config the run started with."""

from __future__ import annotations

import json
import subprocess
import sys

import optuna
import pandas as pd
import pytest

from orchestrator import pipeline
from orchestrator.config import load_config
from orchestrator.errors import UserError
from orchestrator.train import TrainJob


def _started(tmp_path, *overrides: str):
    cfg = load_config("search_spaces/quickstart.yaml", [f"results_dir={tmp_path}", "name=job", *overrides])
    pipeline.prepare_run_dir(cfg, resume=False)
    pipeline.write_run_json(cfg)
    return cfg


def test_the_stored_config_is_the_one_the_run_started_with(tmp_path):
    cfg = _started(tmp_path, "train.seeds=[3,4]", "screen.survivors=3", "train.lr=0.002")
    assert pipeline.stored_config(cfg.run_dir).to_dict() == cfg.to_dict()


def test_a_moved_run_directory_is_continued_where_it_now_is(tmp_path):
    cfg = _started(tmp_path / "old")
    moved = tmp_path / "new" / "job"
    moved.parent.mkdir()
    cfg.run_dir.rename(moved)
    assert pipeline.stored_config(moved).run_dir == moved.resolve()


@pytest.mark.parametrize("setup, problem", [
    (lambda d: None, r"^train: '.*' has no run.json; give a run directory that `lora-search screen` or"),
    (lambda d: (d / "run.json").write_text("[1]"), r"has no 'config'"),
    (lambda d: (d / "run.json").write_text('{"config": {"name": "other"}}'),
     r"^train: '.*' holds the run 'other'; rename the directory back to that$"),
])
def test_a_directory_that_is_no_run_is_one_line(tmp_path, setup, problem):
    run_dir = tmp_path / "job"
    run_dir.mkdir()
    setup(run_dir)
    with pytest.raises(UserError, match=problem):
        pipeline.stored_config(run_dir)


def test_the_plan_has_one_row_per_model_and_counts_the_seeds_left(tiny_model_dir):
    from orchestrator.allocation import uniform
    from orchestrator.models import adaptable_modules, load_model

    modules = adaptable_modules(load_model(str(tiny_model_dir), 2))
    ranks = uniform(modules, ("query", "value"), 4).as_dict()
    jobs = [TrainJob("a1", "baseline", "uniform_qv", ranks, seed, "lora") for seed in (0, 1)]
    plan = pipeline.training_plan(jobs, modules, [0, 1], finished={jobs[0].job_id})
    assert plan.to_dict("records") == [{
        "candidate_id": "a1", "kind": "baseline", "label": "uniform_qv", "method": "lora",
        "allocation": "L0.query:4,L0.value:4,L1.query:4,L1.value:4", "trainable_params": 4 * 4 * 64, "modules": 4,
        "total_rank": 16, "to_train": 1}]
    assert plan.attrs["seeds"] == [0, 1]


def test_train_on_a_directory_that_is_no_run_is_one_line_exit_2(tmp_path):
    done = subprocess.run([sys.executable, "-m", "orchestrator.cli", "train", str(tmp_path / "none")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and done.stderr.startswith("error: train: '")


@pytest.mark.slow
def test_a_screened_run_trains_its_plan_from_its_directory(tmp_path, tiny_model_dir, embedded_ray):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    overrides = [
        "name=staged", f"results_dir={tmp_path}", f"model.name={tiny_model_dir}", "model.max_length=16",
        "data.train_size=64", "data.eval_size=32", "screen.num_trials=1", "screen.candidates_per_trial=4",
        "screen.survivors=1", "screen.proxy_batches=1", "screen.batch_size=8", "train.batch_size=16",
        "train.eval_batch_size=16", "train.baselines=[uniform_qv]", "register.best=false"]
    cfg = load_config("search_spaces/quickstart.yaml", overrides)
    shown = CliRunner().invoke(app, ["screen", "search_spaces/quickstart.yaml", *overrides], terminal_width=100)
    assert shown.exit_code == 0, shown.output
    screen = pd.read_csv(cfg.run_dir / "screen.csv")
    survivor = screen[screen.survivor].candidate_id.iloc[0]
    for cid, label in ((survivor, "screen#1"), (None, "uniform_qv")):  # one row per model, one seed each left
        assert any(label in line and (cid is None or cid in line) and line.rstrip().endswith("1 of 1")
                   for line in shown.output.splitlines()), shown.output
    assert f"2 training(s) left; run them with: lora-search train {cfg.run_dir}" in " ".join(shown.output.split())
    assert not (cfg.run_dir / "trials").exists() or not list((cfg.run_dir / "trials").iterdir())
    run = json.loads((cfg.run_dir / "run.json").read_text())
    assert "finished_at" not in run and "finished_at" in run["sessions"][-1]  # a timed session, an unfinished run
    study = f"sqlite:///{cfg.run_dir / 'study.db'}"
    screened = len(optuna.load_study(study_name=None, storage=study).trials)

    trained = CliRunner().invoke(app, ["train", str(cfg.run_dir)], terminal_width=100)
    assert trained.exit_code == 0, trained.output
    table = pd.read_parquet(cfg.run_dir / "report.parquet")
    assert sorted(table.label) == ["screen#1", "uniform_qv"] and table.accuracy.notna().all()
    assert survivor in table.candidate_id.tolist()
    run = json.loads((cfg.run_dir / "run.json").read_text())
    assert len(run["sessions"]) == 2 and run["finished_at"] == run["sessions"][-1]["finished_at"]
    assert pd.read_csv(cfg.run_dir / "screen.csv").equals(screen)  # screened once, not again
    assert len(optuna.load_study(study_name=None, storage=study).trials) == screened
