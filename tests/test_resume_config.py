"""--resume continues the same run: a config that would change what its finished models were is refused before
anything is written; which models to train, how many at once and what happens afterwards may change."""

from __future__ import annotations

import json
import time

import pytest

from orchestrator import pipeline
from orchestrator.config import load_config
from orchestrator.errors import UserError


def _started(tmp_path, overrides: list[str] = ()):
    cfg = load_config(None, [f"results_dir={tmp_path}", "name=job", *overrides])
    pipeline.prepare_run_dir(cfg, resume=False)
    pipeline.write_run_json(cfg)
    return cfg


def test_resume_with_the_same_config_reopens_the_run(tmp_path):
    cfg = _started(tmp_path)
    assert pipeline.prepare_run_dir(load_config(None, [f"results_dir={tmp_path}", "name=job"]), resume=True) == cfg.run_dir


def test_resume_may_add_seeds_and_baselines_and_change_concurrency_memory_and_registration(tmp_path):
    _started(tmp_path)
    more = load_config(None, [f"results_dir={tmp_path}", "name=job", "train.seeds=[0,1,2]", "train.baselines=[uniform_qv,adalora]",
                              "train.max_concurrent=1", "train.max_failures=3", "train.grad_accum_steps=2",
                              "train.eval_batch_size=8", "register.best=false"])
    pipeline.prepare_run_dir(more, resume=True)


def test_resume_must_keep_the_first_seed_first(tmp_path):
    """The first seed's adapters are each model's (and with train.lr_grid its sweep picked the rate)."""
    _started(tmp_path)
    moved = load_config(None, [f"results_dir={tmp_path}", "name=job", "train.seeds=[2,0]"])
    with pytest.raises(UserError, match=r"^--resume: train.seeds is \[2, 0\] here but starts with 0 in the run being "
                                        r"resumed; keep 0 first and add seeds after it"):
        pipeline.prepare_run_dir(moved, resume=True)


def test_resume_with_another_recipe_is_refused_naming_the_key_and_writes_nothing(tmp_path):
    cfg = _started(tmp_path)
    before = (cfg.run_dir / "run.json").read_text()
    other = load_config(None, [f"results_dir={tmp_path}", "name=job", "train.lr=1e-3"])
    with pytest.raises(UserError, match=r"^--resume: train\.lr is 0\.001 here but 0\.002 in the run being resumed; "
                                        r"resume with its config, or start a new run \(name=\.\.\.\)$"):
        pipeline.prepare_run_dir(other, resume=True)
    two = load_config(None, [f"results_dir={tmp_path}", "name=job", "data.task=sms_spam", "screen.seed=5"])
    with pytest.raises(UserError, match=r"^--resume: data\.task is 'sms_spam' here .* \(and 1 more\); "):
        pipeline.prepare_run_dir(two, resume=True)
    assert (cfg.run_dir / "run.json").read_text() == before


def test_keys_an_older_version_did_not_record_count_as_their_default(tmp_path):
    cfg = _started(tmp_path)
    path = cfg.run_dir / "run.json"
    stored = json.loads(path.read_text())
    del stored["config"]["calibrate"], stored["config"]["data"]["validation_size"]
    path.write_text(json.dumps(stored))
    pipeline.prepare_run_dir(load_config(None, [f"results_dir={tmp_path}", "name=job"]), resume=True)
    # its finished models trained on the whole training split: a validation split now would mix two kinds of model
    with pytest.raises(UserError, match=r"^--resume: data\.validation_size is 200 here but None in the run being resumed"):
        pipeline.prepare_run_dir(load_config(None, [f"results_dir={tmp_path}", "name=job", "data.validation_size=200"]),
                                 resume=True)


def test_another_learning_rate_grid_is_another_run(tmp_path):
    grid = ["data.validation_size=64", "train.lr_grid=[2e-3,8e-3]"]
    _started(tmp_path, grid)
    pipeline.prepare_run_dir(load_config(None, [f"results_dir={tmp_path}", "name=job", *grid]), resume=True)
    wider = load_config(None, [f"results_dir={tmp_path}", "name=job", "data.validation_size=64", "train.lr_grid=[2e-3,8e-3,1.6e-2]"])
    with pytest.raises(UserError, match=r"^--resume: train\.lr_grid is \[0\.002, 0\.008, 0\.016\] here but \[0\.002, 0\.008\]"):
        pipeline.prepare_run_dir(wider, resume=True)


def test_a_run_that_recorded_a_relative_study_file_resumes_from_its_directory(tmp_path, monkeypatch):
    """An older version kept a relative screen.storage as written; it is now made absolute when the config is read."""
    monkeypatch.chdir(tmp_path)
    cfg = _started(tmp_path, ["screen.storage=sqlite:///study-here.db"])
    assert cfg.screen.storage == f"sqlite:///{tmp_path}/study-here.db"
    run = json.loads((cfg.run_dir / "run.json").read_text())
    run["config"]["screen"]["storage"] = "sqlite:///study-here.db"  # as the older version wrote it
    (cfg.run_dir / "run.json").write_text(json.dumps(run))
    again = load_config(None, [f"results_dir={tmp_path}", "name=job", "screen.storage=sqlite:///study-here.db"])
    assert pipeline.prepare_run_dir(again, resume=True) == cfg.run_dir


def test_a_second_driver_on_a_running_run_is_refused_naming_the_first(tmp_path):
    """A --resume beside the running driver trained every model a second time into the same checkpoints (or died
    restoring its screen) and garbled run.json's sessions. The lock goes with the driver's process."""
    import os
    import subprocess
    import sys

    cfg = _started(tmp_path)  # this process holds the lock: it may reopen its own run
    assert pipeline.prepare_run_dir(load_config(None, [f"results_dir={tmp_path}", "name=job"]), resume=True) == cfg.run_dir
    os.close(pipeline._HELD_RUN_LOCKS.pop(cfg.run_dir.resolve()))  # as if this driver had ended
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, os, sys, time\n"
        f"fd = os.open({str(cfg.run_dir / pipeline.RUN_LOCK)!r}, os.O_RDWR)\n"
        "fcntl.flock(fd, fcntl.LOCK_EX)\n"
        "os.ftruncate(fd, 0); os.write(fd, b'pid 4242 on elsewhere')\n"
        "print('held', flush=True); sys.stdin.read()\n")], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        again = load_config(None, [f"results_dir={tmp_path}", "name=job"])
        with pytest.raises(UserError, match=r"^name: run 'job' is running \(pid 4242 on elsewhere\); wait for it to "
                                            "finish, or stop it and pass --resume$"):
            pipeline.prepare_run_dir(again, resume=True)
    finally:
        holder.communicate("")  # the first driver ends: its lock goes with it
    assert pipeline.prepare_run_dir(again, resume=True) == cfg.run_dir


def test_earlier_sessions_read_every_run_json_shape(tmp_path):
    """What a resumed run's wall time adds up: none for a new run, an older run.json's one start and finish, and
    the kept sessions as they are."""
    cfg = load_config(None, [f"results_dir={tmp_path}", "name=job"])
    assert pipeline.earlier_sessions(cfg) == []
    cfg.run_dir.mkdir(parents=True)
    older = {"started_at": "2026-12-01T10:00:00+0000", "finished_at": "2026-12-01T10:30:00+0000", "name": "job"}
    (cfg.run_dir / "run.json").write_text(json.dumps(older))
    assert pipeline.earlier_sessions(cfg) == [{"started_at": older["started_at"], "finished_at": older["finished_at"]}]
    (cfg.run_dir / "run.json").write_text(json.dumps({"name": "job"}))
    assert pipeline.earlier_sessions(cfg) == []
    kept = [{"started_at": "2026-12-01T10:00:00+0000", "finished_at": "2026-12-01T10:30:00+0000"},
            {"started_at": "2026-12-02T09:00:00+0000"}]
    (cfg.run_dir / "run.json").write_text(json.dumps({**older, "sessions": kept}))
    assert pipeline.earlier_sessions(cfg) == kept


def test_a_run_that_recorded_a_relative_storage_path_resumes_from_its_directory(tmp_path, monkeypatch):
    """Until 2026-12-07 run.json kept storage_path and screen.warm_start_from as written; now it keeps them absolute."""
    monkeypatch.chdir(tmp_path)
    cfg = _started(tmp_path, ["storage_path=ray_store"])
    stored = json.loads((cfg.run_dir / "run.json").read_text())
    assert stored["config"]["storage_path"] == str(tmp_path / "ray_store")
    stored["config"]["storage_path"] = "ray_store"  # as an older version wrote it
    (cfg.run_dir / "run.json").write_text(json.dumps(stored))
    assert pipeline.prepare_run_dir(load_config(None, [f"results_dir={tmp_path}", "name=job", "storage_path=ray_store"]),
                                    resume=True) == cfg.run_dir


def test_a_run_that_recorded_a_relative_data_file_resumes_from_its_directory(tmp_path, monkeypatch):
    """Until 2026-12-07 run.json kept a local model.name, data.task and data.eval_path as written."""
    monkeypatch.chdir(tmp_path)
    for name in ("train.csv", "eval.csv"):
        (tmp_path / name).write_text("text,label\n")
    overrides = ["data.task=train.csv", "data.eval_path=eval.csv"]
    cfg = _started(tmp_path, overrides)
    stored = json.loads((cfg.run_dir / "run.json").read_text())
    assert stored["config"]["data"]["task"] == str(tmp_path / "train.csv")
    stored["config"]["data"] |= {"task": "train.csv", "eval_path": "eval.csv"}  # as an older version wrote them
    (cfg.run_dir / "run.json").write_text(json.dumps(stored))
    again = load_config(None, [f"results_dir={tmp_path}", "name=job", *overrides])
    assert pipeline.prepare_run_dir(again, resume=True) == cfg.run_dir


@pytest.mark.parametrize("damage, problem", [("", "cannot be read"), ("[1, 2]", "has no 'config'")])
def test_a_damaged_run_json_is_one_line_on_resume(tmp_path, damage, problem):
    cfg = _started(tmp_path)
    (cfg.run_dir / "run.json").write_text(damage)
    with pytest.raises(UserError, match=rf"^report: '.*run\.json' {problem}.*; restore it from a backup"):
        pipeline.prepare_run_dir(load_config(None, [f"results_dir={tmp_path}", "name=job"]), resume=True)


@pytest.mark.parametrize("damage", ["", '{"unit": [1]}', '{"unit": {}, "bogus": 1}'])
def test_damaged_module_scores_are_one_line_on_resume(tmp_path, damage):
    cfg = _started(tmp_path)
    (cfg.run_dir / "module_scores.json").write_text(damage)
    with pytest.raises(UserError, match=r"^report: '.*module_scores\.json' .*; delete it and run `lora-search run"):
        pipeline.module_scores(cfg, None, [])


def _finished_run(tmp_path, monkeypatch, tiny_model_dir, extra: list[str] = ()) -> tuple[list[str], dict]:
    """A finished run (one recorded session) whose Ray stages are stand-ins: a --resume of it trains nothing."""
    import pandas as pd

    from orchestrator import report
    from orchestrator.proxies import ModuleScores

    overrides = [f"results_dir={tmp_path}", "name=job", f"model.name={tiny_model_dir}", "model.max_length=16",
                 "data.train_size=64", "data.eval_size=32", "register.best=false", "train.baselines=[uniform_qv]", *extra]
    cfg = load_config("search_spaces/quickstart.yaml", overrides)
    pipeline.prepare_run_dir(cfg, resume=False)
    old = {"started_at": "2026-12-07T10:00:00+0000", "finished_at": "2026-12-07T11:00:00+0000"}
    pipeline.write_run_json(cfg, sessions=[old], **old)
    (cfg.run_dir / "screen.csv").write_text("candidate_id,allocation,survivor\n")
    for name, stand_in in {"init_ray": lambda address: True, "check_trainings_fit": lambda *a, **k: None,
                           "module_scores": lambda *a: ModuleScores(unit={}), "run_training": lambda *a: {}}.items():
        monkeypatch.setattr(pipeline, name, stand_in)  # the Ray stages: everything is trained already
    monkeypatch.setattr(report, "build", lambda *a, **k: pd.DataFrame())
    monkeypatch.setattr(report, "write", lambda table, *a: table)
    return overrides, old


def test_a_resume_that_trains_nothing_keeps_the_runs_start_and_finish(tmp_path, monkeypatch, tiny_model_dir):
    """sessions stayed as they were, but the top-level started_at and finished_at took this session's times."""
    overrides, old = _finished_run(tmp_path, monkeypatch, tiny_model_dir)
    pipeline.run(load_config("search_spaces/quickstart.yaml", overrides), resume=True)
    stored = json.loads((tmp_path / "job" / "run.json").read_text())
    assert stored["sessions"] == [old] and (stored["started_at"], stored["finished_at"]) == tuple(old.values())


def test_a_resume_that_trains_a_new_model_is_a_new_session_of_the_run(tmp_path, monkeypatch, tiny_model_dir):
    overrides, old = _finished_run(tmp_path, monkeypatch, tiny_model_dir)
    monkeypatch.setattr(pipeline, "run_training", lambda *a: {"uniform_qv-s1": {}})  # e.g. a seed added on resume
    stamp = "%Y-%m-%dT%H:%M:%S%z"  # run.json's times
    before = time.strftime(stamp)
    pipeline.run(load_config("search_spaces/quickstart.yaml", overrides), resume=True)
    stored, after = json.loads((tmp_path / "job" / "run.json").read_text()), time.strftime(stamp)
    assert len(stored["sessions"]) == 2 and stored["sessions"][0] == old
    new = stored["sessions"][1]
    assert before <= new["started_at"] <= new["finished_at"] <= after
    assert (stored["started_at"], stored["finished_at"]) == (old["started_at"], new["finished_at"])


def test_a_copy_to_storage_path_that_fails_is_not_named_in_run_json(tmp_path, monkeypatch, tiny_model_dir):
    overrides, _ = _finished_run(tmp_path, monkeypatch, tiny_model_dir, [f"storage_path={tmp_path / 'store'}"])

    def disk_full(storage_path, run_dir):
        raise UserError("storage_path: could not copy the run (No space left on device)")

    monkeypatch.setattr(pipeline, "publish_run", disk_full)
    with pytest.raises(UserError, match="could not copy"):
        pipeline.run(load_config("search_spaces/quickstart.yaml", overrides), resume=True)
    assert json.loads((tmp_path / "job" / "run.json").read_text())["copied_to"] is None


def test_a_resume_whose_splits_an_older_version_drew_otherwise_is_refused(tmp_path):
    """Rotten Tomatoes' validation became whole movies (412 rows where 400 were): the remaining models would train on
    other rows than the finished ones, and pick their rates on another validation split."""
    from orchestrator.data import Split, TaskData, task_summary

    cfg = _started(tmp_path)
    split = lambda n: Split([f"t{i}" for i in range(n)], [i % 2 for i in range(n)])  # noqa: E731
    task = TaskData("t", ["a", "b"], split(3588), split(1000), validation=split(412))
    pipeline.write_run_json(cfg, task=task_summary(task) | {"train_examples": 3600, "validation_examples": 400})
    with pytest.raises(UserError, match=r"^--resume: train_examples is 3588 here but 3600 in the run being resumed \(its "
                                        r"data file changed, or an older version drew its splits\); finish it with the "
                                        r"data and version it began with"):
        pipeline.check_same_splits(cfg.run_dir, task)
    pipeline.write_run_json(cfg, task=task_summary(task))
    pipeline.check_same_splits(cfg.run_dir, task)
