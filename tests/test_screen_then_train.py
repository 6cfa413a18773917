"""`lora-search screen` stops after the screen and lists what training would do; `lora-search train RUN_DIR` goes on
from the run directory alone, with the config the run started with."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import optuna
import pandas as pd
import pytest

from orchestrator import pipeline
from orchestrator.config import load_config
from orchestrator.errors import UserError
from orchestrator.train import TrainJob


QUICKSTART = Path(__file__).parents[1] / "search_spaces" / "quickstart.yaml"  # from any directory


def _started(tmp_path, *overrides: str):
    cfg = load_config(QUICKSTART, [f"results_dir={tmp_path}", "name=job", *overrides])
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
    plan = pipeline.training_plan(jobs, modules, [0, 1], {jobs[0].job_id: {"status": "done"}}, None, "per_input")
    assert plan.to_dict("records") == [{
        "candidate_id": "a1", "kind": "baseline", "label": "uniform_qv", "method": "lora",
        "allocation": "L0.query:4,L0.value:4,L1.query:4,L1.value:4", "trainable_params": 4 * 4 * 64, "modules": 4,
        "total_rank": 16, "unfit": "", "to_train": 1, "failed": 0}]
    assert plan.attrs["seeds"] == [0, 1]


def test_a_failed_training_is_counted_as_failed_not_done(tiny_modules):
    """A --resume does not train a failed model again (README): the plan must not call it done."""
    from orchestrator.allocation import uniform

    jobs = [TrainJob("a1", "baseline", "uniform_qv", uniform(tiny_modules, ("query",), 2).as_dict(), s, "lora")
            for s in (0, 1)]
    plan = pipeline.training_plan(jobs, tiny_modules, [0, 1], {jobs[0].job_id: {"status": "failed"}}, None, "per_input")
    assert plan[["to_train", "failed"]].to_dict("records") == [{"to_train": 1, "failed": 1}]


@pytest.mark.parametrize("gating", ["topk", "dense"])
def test_a_routed_row_shows_what_its_training_builds(tiny_model_dir, gating):
    """budget_expert_ranks drops the low-rank sites where E experts and a router do not fit: the routed model has
    fewer params, modules and Σ rank than its allocation. The plan counts what train.build_adapted builds."""
    from orchestrator.models import adaptable_modules, load_model
    from orchestrator.train import build_adapted

    cfg = load_config("search_spaces/quickstart.yaml", [f"model.name={tiny_model_dir}", "routing.enabled=true",
                                                        "routing.num_experts=[4]"])
    base = load_model(str(tiny_model_dir), 2)
    modules = adaptable_modules(base)
    names = {m.short: m.name for m in modules}
    ranks = {names["L0.query"]: 8, names["L0.value"]: 8, names["L1.query"]: 1, names["L1.value"]: 1}
    job = TrainJob("dense4-a1", "routed", "screen#1 dense E=4", ranks, 0, "routed", gating, 4)
    (row,) = pipeline.training_plan([job], modules, [0], {}, base, cfg.routing.mode).to_dict("records")
    kept = build_adapted(cfg, job, load_model(str(tiny_model_dir), 2), steps_per_epoch=4).kept()
    assert (row["trainable_params"], row["modules"], row["total_rank"]) == (
        kept["trainable_params"], kept["routed_modules"], kept["expert_rank_sum"])
    assert row["modules"] == 2 and row["trainable_params"] < kept["lora_params"]  # the rank-1 sites are dropped


def test_a_routed_row_that_cannot_be_built_says_why_and_the_plan_stands(tiny_model_dir, tmp_path, monkeypatch):
    """An E that passes the screen's check (the cheapest site) may not fit a survivor of costlier sites: that one
    routed training fails, and the plan says so beside its other rows instead of failing whole."""
    from orchestrator.models import adaptable_modules, load_model

    base = load_model(str(tiny_model_dir), 2)
    modules = adaptable_modules(base)
    names = {m.short: m.name for m in modules}
    costly = {names["L0.intermediate.dense"]: 16, names["L1.intermediate.dense"]: 4, names["L1.output.dense"]: 1}
    jobs = [TrainJob("c1", "searched", "screen#1", costly, 0),
            TrainJob("sparse16-c1", "routed", "screen#1 sparse top-1 E=16", costly, 0, "routed", "topk", 16)]
    plan = pipeline.training_plan(jobs, modules, [0], {}, base, "per_input")
    assert plan.unfit.tolist()[0] == "" and plan.trainable_params[0] == 16 * (32 + 64) + 4 * (32 + 64) + 64 + 32
    assert plan.unfit[1].startswith("routing.num_experts: 16 rank-1 experts and a router do not fit in ")
    plan.attrs["seeds"] = [0]
    output = _screen_with(monkeypatch, tmp_path, plan, width=200)
    assert any("screen#1 sparse top-1 E=16" in line and "does not fit" in line for line in output.splitlines())
    assert f"screen#1 sparse top-1 E=16: its training will fail: {plan.unfit[1]}" in " ".join(output.split())


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
    assert run["sessions"][-1]["screen_only"] is True
    study = f"sqlite:///{cfg.run_dir / 'study.db'}"
    screened = len(optuna.load_study(study_name=None, storage=study).trials)

    trained = CliRunner().invoke(app, ["train", str(cfg.run_dir)], terminal_width=100)
    assert trained.exit_code == 0, trained.output
    table = pd.read_parquet(cfg.run_dir / "report.parquet")
    assert sorted(table.label) == ["screen#1", "uniform_qv"] and table.accuracy.notna().all()
    assert survivor in table.candidate_id.tolist()
    run = json.loads((cfg.run_dir / "run.json").read_text())
    assert len(run["sessions"]) == 2 and run["finished_at"] == run["sessions"][-1]["finished_at"]
    assert [s.get("screen_only", False) for s in run["sessions"]] == [True, False]
    assert pd.read_csv(cfg.run_dir / "screen.csv").equals(screen)  # screened once, not again
    assert len(optuna.load_study(study_name=None, storage=study).trials) == screened


def test_a_relative_registry_root_is_the_one_the_run_started_with(tmp_path, monkeypatch):
    """`train ../r/run` from another directory registered into a second registry under that one."""
    monkeypatch.chdir(tmp_path)
    cfg = _started(tmp_path, "register.root=adapters")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert pipeline.stored_config(cfg.run_dir).registry_root == tmp_path / "adapters"


OLDER_PATHS = {"model.name": "models/tiny", "data.task": "data/train.csv", "data.eval_path": "data/eval.csv",
               "register.root": "adapters", "storage_path": "ray_store", "screen.warm_start_from": "results/earlier",
               "screen.storage": "sqlite:///studies/run.db"}


def _older_run(tmp_path, key: str):
    """A run whose run.json holds `key` relative, as versions before 2026-12-07 kept it."""
    cfg = _started(tmp_path)
    path = cfg.run_dir / "run.json"
    stored = json.loads(path.read_text())
    section, _, name = key.rpartition(".")
    (stored["config"][section] if section else stored["config"])[name] = OLDER_PATHS[key]
    path.write_text(json.dumps(stored))
    return cfg


@pytest.mark.parametrize("key", OLDER_PATHS)
def test_an_older_relative_path_is_refused_and_resume_still_takes_it(tmp_path, monkeypatch, key):
    """Relative to the directory the run started in, which run.json does not record: even a path found from here may
    be another model, data file or registry. `run CONFIG --resume` from that directory still continues the run."""
    cfg = _older_run(tmp_path, key)
    (tmp_path / OLDER_PATHS[key]).mkdir(parents=True)  # found from here: still not known to be the run's
    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=rf"^{key}: '{OLDER_PATHS[key]}' in .*run.json is relative \(an older version "
                                        r"kept it as typed\), so `train` cannot tell what it names; continue the run "
                                        r"with `lora-search run CONFIG --resume` from the directory it started in$"):
        pipeline.stored_config(cfg.run_dir)
    if key.startswith("register."):  # may change on a resume
        pipeline.check_run_dir(cfg, resume=True)


def test_an_empty_plan_says_there_is_nothing_to_train(tmp_path, monkeypatch, tiny_modules):
    """No screened model survived (every score non-finite) and train.baselines is empty: the plan has no rows."""
    plan = pipeline.training_plan([], tiny_modules, [0], {}, None, "per_input")
    assert plan.empty and list(plan.columns) == pipeline.PLAN_COLUMNS
    output = _screen_with(monkeypatch, tmp_path, plan)
    assert "Nothing to train: no screened model survived and train.baselines is empty" in " ".join(output.split())


def test_a_damaged_storage_url_in_run_json_is_one_line(tmp_path):
    cfg = _older_run(tmp_path, "screen.storage")
    stored = json.loads((cfg.run_dir / "run.json").read_text())
    stored["config"]["screen"]["storage"] = "my study db"
    (cfg.run_dir / "run.json").write_text(json.dumps(stored))
    with pytest.raises(UserError, match="^screen.storage: 'my study db' is not a SQLAlchemy URL"):
        pipeline.stored_config(cfg.run_dir)


def _screen_with(monkeypatch, tmp_path, plan, width: int = 80):
    from typer.testing import CliRunner

    from orchestrator.cli import app

    monkeypatch.setattr(pipeline, "run", lambda *args, **kwargs: plan)
    shown = CliRunner().invoke(app, ["screen", "search_spaces/quickstart.yaml", f"results_dir={tmp_path}", "name=job"],
                               terminal_width=width)
    assert shown.exit_code == 0, shown.output
    return shown.output


def _plan(rows: list[dict], seeds=(0,)) -> pd.DataFrame:
    keys = ("candidate_id", "kind", "label", "method", "allocation", "trainable_params", "modules", "total_rank",
            "to_train", "failed")
    plan = pd.DataFrame([dict(zip(keys, row)) | {"unfit": ""} for row in rows])
    plan.attrs["seeds"] = list(seeds)
    return plan


def test_the_screen_table_shows_its_last_column_whole_at_80_columns(tmp_path, monkeypatch):
    plan = _plan([("dense4-a1b2c3d4e5f6a7b8c9", "routed", "screen#1 dense E=4", "routed", "", 1234567, 24, 96, 3, 0),
                  ("a9638351818", "baseline", "uniform_qv", "lora", "", 73728, 12, 96, 2, 1)], seeds=(0, 1, 2))
    output = _screen_with(monkeypatch, tmp_path, plan)
    assert any(line.rstrip().endswith("3 of 3") and "dense4-a1b2c3d4e5f6a7b8c9" in line for line in output.splitlines())
    assert any(line.rstrip().endswith("2 of 3, 1 failed") for line in output.splitlines()), output
    said = " ".join(output.split())
    assert f"5 training(s) left; run them with: lora-search train {tmp_path / 'job'}" in said
    assert ("1 training(s) failed (the error is in trials/<job>.json); once the cause is fixed, delete that file and "
            f"run: lora-search train {tmp_path / 'job'}") in said


def test_a_screen_with_nothing_left_to_train_points_at_the_report(tmp_path, monkeypatch):
    said = " ".join(_screen_with(monkeypatch, tmp_path, _plan([("a1", "baseline", "uniform_qv", "lora", "", 1, 1, 1, 0, 0)]),
                                 width=200).split())
    assert "run them with" not in said and "failed" not in said
    assert f"Nothing left to train: the run is trained; its report: lora-search report {tmp_path / 'job'}" in said


def test_compare_on_a_run_only_screened_says_to_train_it(tmp_path):
    from orchestrator import report

    cfg = _started(tmp_path)
    with pytest.raises(UserError, match=rf"not found; give the directory of a finished `lora-search run`, or train this "
                                        rf"one first: lora-search train {cfg.run_dir}$"):
        report.compare([cfg.run_dir], tmp_path / "out")
    assert not (tmp_path / "out").exists()
