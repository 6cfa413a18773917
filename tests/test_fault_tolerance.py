"""Real faults in one run of the CLI: a Ray Train worker killed mid-training, then the driver killed mid-run and the
run resumed. One run meets both (not a run each): here each run costs ~50 s of Ray, screen and Train start-up."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pandas as pd
import psutil
import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.train_size=256", "data.eval_size=64", "model.max_length=16", "screen.num_trials=1",
         "screen.candidates_per_trial=4", "screen.survivors=1", "screen.proxy_batches=1", "train.batch_size=32",
         "train.eval_batch_size=64", "train.epochs=2", "train.early_stopping=false"]


def _train_workers(driver_pid: int) -> list[psutil.Process]:
    """The Ray Train workers of this driver's embedded cluster only (its processes descend from the driver):
    other Ray clusters may share the machine."""
    found = []
    for proc in psutil.Process(driver_pid).children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in proc.cmdline()):
                found.append(proc)
        except psutil.Error:  # exited meanwhile
            pass
    return found


def _run_cli(args: list[str]) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "search_spaces/quickstart.yaml", *args],
                            cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)


def _kill_a_worker_until_a_model_finishes(driver: subprocess.Popen, run_dir: Path,
                                          deadline_s: float = 400) -> int | None:
    """SIGKILL the first model's Train worker once its epoch-1 checkpoint is registered, then wait until a model has
    finished (the caller kills the driver). Returns the killed worker's pid (None if none was found)."""
    killed = None
    end = time.time() + deadline_s
    while time.time() < end and not list((run_dir / "trials").glob("*.json")):
        assert driver.poll() is None, driver.stderr.read()[-2000:]
        if killed is None and list((run_dir / "train").glob("*/checkpoint_manager_snapshot.json")):
            for proc in _train_workers(driver.pid):
                proc.kill()  # SIGKILL, no chance to clean up
                killed = proc.pid
        time.sleep(0.2)
    return killed


def test_a_killed_worker_restarts_from_its_checkpoint_and_a_killed_driver_resumes_losing_nothing(tmp_path):
    # two models (the survivor and uniform_qv), two epochs each, one at a time: the worker kill falls in the
    # first model's second epoch, the driver kill between the first model's end and the second's
    args = SMALL + ["name=faults", f"results_dir={tmp_path}", "train.max_concurrent=1", "train.max_failures=2"]
    run_dir = tmp_path / "faults"
    driver = _run_cli(args)
    try:
        killed = _kill_a_worker_until_a_model_finishes(driver, run_dir)
    finally:  # also when the wait fails: never leave a driver and its Ray cluster running
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and the embedded Ray it started
        driver.wait()
    assert killed, "no Ray Train worker was found to kill"
    first = sorted((run_dir / "trials").glob("*.json"))
    assert len(first) == 1, f"{len(first)} models finished before the driver was killed (one was expected)"
    [trial] = [json.loads(p.read_text()) for p in first]
    assert trial["status"] == "completed" and [h["epoch"] for h in trial["history"]] == [1, 2]
    assert trial["resumed_from_epoch"] == 1  # the killed model restarted from its epoch-1 checkpoint, not from scratch
    stamps = {p.name: p.stat().st_mtime_ns for p in first}

    resumed = _run_cli(args + ["--resume"])
    _, err = resumed.communicate(timeout=480)
    assert resumed.returncode == 0, err[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in first} == stamps  # the finished model was not trained again
    report = pd.read_csv(run_dir / "report.csv")
    assert len(report) == 2 and set(report.kind) == {"searched", "baseline"}  # both models, none lost
    assert (report.status == "completed").all()
    screen = pd.read_csv(run_dir / "screen.csv")
    assert screen.survivor.sum() == 1
    # the resumed run reused the screen: the study holds exactly the screened trials, none added twice
    study = optuna.load_study(study_name="screen", storage=f"sqlite:///{run_dir / 'study.db'}")
    assert len(study.trials) == screen.screen_trial.nunique() == 1  # screen.num_trials=1
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert json.loads((run_dir / "run.json").read_text())["finished_at"]
