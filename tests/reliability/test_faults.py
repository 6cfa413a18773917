"""One model's loss turns NaN, another runs out of memory: each is marked failed with its reason, the run goes on,
Ray gets every CPU back and no worker process is left. optuna-dashboard reads the study the whole time.

The faults are real failures inside real Ray Train workers, made by the chaos hook LORA_SEARCH_INJECT_FAULT
(orchestrator/train.py fault_plan): "nan" multiplies the loss by NaN, "oom" caps the worker's address space
(RLIMIT_AS) so its first training step cannot allocate.
"""

from __future__ import annotations

import json

import pandas as pd
import pytest

from orchestrator.errors import UserError
from orchestrator.train import FAULT_ENV, fault_plan

from ._hostile_run import HostileRun, alive_train_workers


def _trial(run: HostileRun, job_id: str) -> dict:
    return json.loads((run.run_dir / "trials" / f"{job_id}.json").read_text())


@pytest.mark.slow
def test_nan_loss_marks_that_model_failed_with_the_reason(hostile_run):
    trial = _trial(hostile_run, hostile_run.nan_job)
    assert trial["status"] == "failed" and trial["label"] == "uniform_qv"
    assert "FloatingPointError: non-finite training loss nan at step 0" in trial["error"], trial["error"]
    # charged for its finished epochs, as a finished model is: none, it failed at its first step
    assert trial["train_wall_s"] == trial["device_hours"] == trial["cost_usd"] == 0.0


@pytest.mark.slow
def test_out_of_memory_marks_that_model_failed_with_the_reason(hostile_run):
    trial = _trial(hostile_run, hostile_run.oom_job)
    assert trial["status"] == "failed" and trial["label"] == "uniform_all"
    assert "can't allocate memory" in trial["error"], trial["error"]


@pytest.mark.slow
def test_the_other_model_completes_and_the_summary_names_the_failures(hostile_run):
    table = hostile_run.table
    assert list(table.kind) == ["searched"] and (table.status == "completed").all()
    assert table.accuracy.notna().all()
    on_disk = pd.read_csv(hostile_run.run_dir / "report.csv")
    assert len(on_disk) == 1 and on_disk.candidate_id.tolist() == table.candidate_id.tolist()
    summary = (hostile_run.run_dir / "report.md").read_text()
    assert "2 training run(s) failed" in summary
    assert "2 failed run(s) included" in summary  # their device time counts in the run's cost
    assert f"{hostile_run.nan_job} (FloatingPointError" in summary and f"{hostile_run.oom_job} (" in summary
    assert json.loads((hostile_run.run_dir / "run.json").read_text())["finished_at"]


@pytest.mark.slow
def test_failed_trainers_give_back_every_cpu_and_leave_no_worker(hostile_run):
    assert hostile_run.available.get("CPU") == hostile_run.cluster["CPU"], (hostile_run.available, hostile_run.cluster)
    assert hostile_run.available.get("GPU", 0) == hostile_run.cluster.get("GPU", 0)
    assert len(hostile_run.worker_pids) == 3, hostile_run.worker_pids  # one per model: max_failures=0, so no retry
    assert not alive_train_workers(hostile_run.worker_pids)


@pytest.mark.slow
def test_dashboard_reads_the_study_throughout_the_run_without_errors(hostile_run):
    run = hostile_run
    during = [p for p in run.polls if run.started <= p[0] <= run.finished]
    assert len(during) >= 20, f"only {len(during)} dashboard requests during the run"
    assert {status for _, status, _ in run.polls} == {200}
    assert "locked" not in run.dashboard_output.lower() and "Traceback" not in run.dashboard_output
    assert "database is locked" not in run.driver_log.read_text(errors="replace")  # the search's writes never failed
    seen = [trials for _, _, trials in run.polls if trials is not None]
    assert seen == sorted(seen), "the dashboard saw the study shrink"
    assert [t for t in seen if 0 < t < seen[-1]], "the dashboard never saw the study mid-screen"
    assert seen[-1] == run.screen_trials == 6


@pytest.mark.parametrize("spec, expected", [
    ("", {}),
    ("nan:a-s0", {"a-s0": "nan"}),
    (" nan:a-s0 , oom:b-s1 ", {"a-s0": "nan", "b-s1": "oom"}),
])
def test_fault_plan_reads_the_env_var(monkeypatch, spec, expected):
    monkeypatch.setenv(FAULT_ENV, spec)
    assert fault_plan() == expected


@pytest.mark.parametrize("spec", ["nan", "segv:a-s0", "nan:", ":a-s0"])
def test_fault_plan_refuses_a_malformed_spec(monkeypatch, spec):
    monkeypatch.setenv(FAULT_ENV, spec)
    with pytest.raises(UserError, match=f"^{FAULT_ENV}: .*; write e.g. nan:"):
        fault_plan()


@pytest.mark.slow
def test_a_failed_model_trains_again_on_resume_once_its_trial_file_is_removed(hostile_run, tmp_path, monkeypatch,
                                                                              embedded_ray):
    """What the README tells a user to do once a failure's cause is fixed (here: the fault is no longer injected)."""
    import shutil

    from orchestrator import pipeline
    from orchestrator.config import load_config

    from ._hostile_run import REPO, SMALL

    results = tmp_path / "results"
    shutil.copytree(hostile_run.run_dir, results / hostile_run.run_dir.name, symlinks=True)
    cfg = load_config(REPO / "search_spaces/quickstart.yaml", SMALL + [f"results_dir={results}"])
    (cfg.run_dir / "trials" / f"{hostile_run.nan_job}.json").unlink()
    oom_trial = (cfg.run_dir / "trials" / f"{hostile_run.oom_job}.json").read_text()
    monkeypatch.delenv(FAULT_ENV, raising=False)  # read by the driver when the training starts
    table = pipeline.run(cfg, resume=True)
    retried = json.loads((cfg.run_dir / "trials" / f"{hostile_run.nan_job}.json").read_text())
    assert retried["status"] == "completed" and retried["label"] == "uniform_qv"
    assert (cfg.run_dir / "trials" / f"{hostile_run.oom_job}.json").read_text() == oom_trial  # not retried
    assert sorted(table.kind) == ["baseline", "searched"]
