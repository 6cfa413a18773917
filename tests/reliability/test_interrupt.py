"""Ctrl-C: Tune's fit() catches SIGINT and returns normally, leaving trials pending or running. A run must then stop
with one line and exit 130, writing no screen.csv and no report (a --resume continues), instead of reporting and
registering the models that happened to finish. (Checked end to end with a real SIGINT to the CLI: README "What
happens when…".)"""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from orchestrator.errors import Interrupted
from orchestrator.screen import check_screen_ended
from orchestrator.train import TrainJob, check_trainings_ended

from ._support import run_cli


def _job(cid: str) -> TrainJob:
    return TrainJob(cid, "searched", "screen#1", {"bert.encoder.layer.0.attention.self.query": 2}, 0)


def test_a_training_left_without_a_result_or_failure_stops_the_run(tmp_path):
    pending = {job.job_id: job for job in map(_job, ["aaa", "bbb", "ccc"])}
    (tmp_path / "trials").mkdir()
    for job_id in ("aaa-s0", "bbb-s0"):  # finished, or failed with its reason: both ended
        (tmp_path / "trials" / f"{job_id}.json").write_text(json.dumps({"status": "completed"}))
    with pytest.raises(Interrupted, match=r"^training stopped with 1 of 3 model\(s\) unfinished \(ccc-s0\); nothing was "
                                          r"reported$"):
        check_trainings_ended(tmp_path, pending)
    (tmp_path / "trials" / "ccc-s0.json").write_text("{}")
    check_trainings_ended(tmp_path, pending)


def test_a_screen_with_trials_left_pending_or_running_is_not_written():
    done = SimpleNamespace(error=None, metrics={"candidates": "[]"})
    failed = SimpleNamespace(error=RuntimeError("worker died"), metrics={})
    cut_short = SimpleNamespace(error=None, metrics={})  # running when Ctrl-C came: no result yet
    with pytest.raises(Interrupted, match=r"^screen stopped after 2 of 4 trials; nothing was written to screen.csv"):
        check_screen_ended([done, failed, cut_short], num_trials=4)  # the fourth never started: not in the results
    check_screen_ended([done, failed], num_trials=2)


def _cli_run_stopped_by(stop: BaseException, tmp_path, capsys, monkeypatch) -> str:
    """stderr of `lora-search run` whose pipeline stops with `stop`; asserts exit 130 and one line."""
    from orchestrator import pipeline

    def stopped_run(*args, **kwargs):
        raise stop

    monkeypatch.setattr(pipeline, "run", stopped_run)
    code, out, err = run_cli(["run", "search_spaces/quickstart.yaml", f"results_dir={tmp_path}"], capsys, monkeypatch)
    assert code == 130 and "Traceback" not in out + err
    assert err.count("\n") == 1 and err.startswith("interrupted: ")
    return err.strip()


def test_the_cli_says_interrupted_in_one_line_and_exits_130(tmp_path, capsys, monkeypatch):
    stop = Interrupted("training stopped with 1 of 2 model(s) unfinished (x-s0); nothing was reported")
    assert _cli_run_stopped_by(stop, tmp_path, capsys, monkeypatch) == f"interrupted: {stop}; continue with --resume"


def test_a_stopped_train_says_to_run_train_again(tmp_path, capsys, monkeypatch):
    """`lora-search train DIR` resumes by itself: its way on is the same command, not --resume."""
    from orchestrator import pipeline
    from orchestrator.config import load_config

    cfg = load_config("search_spaces/quickstart.yaml", [f"results_dir={tmp_path}"])
    monkeypatch.setattr(pipeline, "stored_config", lambda run_dir: cfg)
    cfg.run_dir.mkdir(parents=True)
    (cfg.run_dir / "run.json").write_text("{}")
    for stop in (Interrupted("training stopped with 1 of 2 model(s) unfinished (x-s0); nothing was reported"),
                 KeyboardInterrupt()):
        def stopped_run(*args, stop=stop, **kwargs):
            raise stop

        monkeypatch.setattr(pipeline, "run", stopped_run)
        code, out, err = run_cli(["train", str(cfg.run_dir)], capsys, monkeypatch)
        assert code == 130 and err.count("\n") == 1
        assert err.strip().endswith(f"; continue with `lora-search train {cfg.run_dir}`")


def test_ctrl_c_outside_tune_says_whether_there_is_a_run_to_resume(tmp_path, capsys, monkeypatch):
    said = _cli_run_stopped_by(KeyboardInterrupt(), tmp_path, capsys, monkeypatch)
    assert said == "interrupted: run 'quickstart' stopped; nothing was written; start it again"
    (tmp_path / "quickstart").mkdir()
    (tmp_path / "quickstart" / "run.json").write_text("{}")
    said = _cli_run_stopped_by(KeyboardInterrupt(), tmp_path, capsys, monkeypatch)
    assert said == "interrupted: run 'quickstart' stopped; continue with --resume"
