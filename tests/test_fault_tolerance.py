"""Real faults: a Ray Train worker killed mid-run, and the driver killed mid-run then resumed."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pandas as pd
import psutil
import pytest

from orchestrator import pipeline
from orchestrator.config import load_config

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
SMALL = ["data.train_size=256", "data.eval_size=64", "model.max_length=32", "screen.num_trials=1",
         "screen.candidates_per_trial=4", "screen.survivors=1", "screen.proxy_batches=1", "train.batch_size=32",
         "train.eval_batch_size=64", "train.epochs=2", "train.early_stopping=false"]


def _train_workers() -> list[psutil.Process]:
    """The Ray Train workers of this test's embedded cluster only (its processes descend from this one):
    other Ray clusters may share the machine."""
    found = []
    for proc in psutil.Process().children(recursive=True):
        try:
            if any("RayTrainWorker" in part for part in proc.cmdline()):
                found.append(proc)
        except psutil.Error:  # exited meanwhile
            pass
    return found


def _kill_a_worker_after_first_checkpoint(run_dir: Path, killed: list, deadline_s: float = 240) -> None:
    end = time.time() + deadline_s
    while time.time() < end and not killed:
        if list((run_dir / "train").glob("*/checkpoint_manager_snapshot.json")):  # a checkpoint is registered
            for proc in _train_workers():
                proc.kill()  # SIGKILL, no chance to clean up
                killed.append(proc.pid)
                return
        time.sleep(0.2)


def test_killed_worker_resumes_from_checkpoint_and_run_completes(tmp_path):
    import ray

    cfg = load_config(REPO / "search_spaces/quickstart.yaml",
                      SMALL + ["name=workerkill", f"results_dir={tmp_path}", "train.max_failures=2", "train.max_concurrent=1",
                               "train.baselines=[]"])  # one model: the survivor
    killed: list[int] = []
    killer = threading.Thread(target=_kill_a_worker_after_first_checkpoint, args=(tmp_path / "workerkill", killed), daemon=True)
    pipeline.set_runtime_env()
    pipeline.init_ray(None)
    try:
        killer.start()
        table = pipeline.run(cfg)
    finally:
        ray.shutdown()
    assert killed, "no Ray Train worker was found to kill"
    assert len(table) == 1 and (table.status == "completed").all()
    [trial] = [json.loads(p.read_text()) for p in (tmp_path / "workerkill" / "trials").glob("*.json")]
    assert [h["epoch"] for h in trial["history"]] == [1, 2]
    assert trial["resumed_from_epoch"] == 1  # the killed model restarted from its epoch-1 checkpoint, not from scratch


def _run_cli(args: list[str], **kwargs) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "run", "search_spaces/quickstart.yaml", *args],
                            cwd=REPO, env=env, start_new_session=True, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, **kwargs)


def test_driver_killed_then_resumed_loses_and_repeats_nothing(tmp_path):
    # two models (the survivor and uniform_qv), one epoch each, one at a time: the kill falls between them
    args = SMALL + ["name=driverkill", f"results_dir={tmp_path}", "train.max_concurrent=1", "train.epochs=1"]
    run_dir = tmp_path / "driverkill"
    driver = _run_cli(args)
    try:
        end = time.time() + 300
        while time.time() < end and not list((run_dir / "trials").glob("*.json")):
            assert driver.poll() is None, driver.stderr.read()[-2000:]
            time.sleep(0.5)
    finally:  # also when the wait fails: never leave a driver and its Ray cluster running
        if driver.poll() is None:
            os.killpg(driver.pid, signal.SIGKILL)  # the driver and the embedded Ray it started
        driver.wait()
    first = sorted((run_dir / "trials").glob("*.json"))
    assert first, "no model finished before the deadline"
    stamps = {p.name: p.stat().st_mtime_ns for p in first}

    resumed = _run_cli(args + ["--resume"])
    _, err = resumed.communicate(timeout=480)
    assert resumed.returncode == 0, err[-3000:]
    assert {p.name: p.stat().st_mtime_ns for p in first} == stamps  # finished models were not trained again
    report = pd.read_csv(run_dir / "report.csv")
    assert len(report) == 2 and set(report.kind) == {"searched", "baseline"}  # both models, none lost
    screen = pd.read_csv(run_dir / "screen.csv")
    assert screen.survivor.sum() == 1
    # the resumed run reused the screen: the study holds exactly the screened trials, none added twice
    study = optuna.load_study(study_name="screen", storage=f"sqlite:///{run_dir / 'study.db'}")
    assert len(study.trials) == screen.screen_trial.nunique() == 1  # screen.num_trials=1
    assert all(t.state == optuna.trial.TrialState.COMPLETE for t in study.trials)
    assert json.loads((run_dir / "run.json").read_text())["finished_at"]
