"""benchmarks/orchestration_overhead.py: the report describes the work its rows measured, whatever the CLI says."""

from __future__ import annotations

import sys
from argparse import Namespace
from collections import defaultdict
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import orchestration_overhead as O  # noqa: E402


def stored_rows() -> pd.DataFrame:
    """A stored CSV of a 5-epoch run on 2,000 / 500 examples (its Ray row counts 6 epochs, as runs before 2026-12-07
    counted the final report line)."""
    plain = {"path": "plain", "repeat": 0, "workers": 1, "total_s": 110.0, "setup_s": 2.0, "train_s": 90.0,
             "eval_per_epoch_s": 3.0, "checkpoint_s": 0.03, "accuracy": 0.8, "latency_ms_per_batch": 200.0, "epochs": 5,
             "steps_per_epoch": 63, "load_avg": "1.0 / 1.0 / 1.0"}
    ray = {"path": "ray_tune_train", "repeat": 0, "workers": 1, "total_s": 130.0, "train_s": 92.0, "accuracy": 0.8,
           "latency_ms_per_batch": 210.0, "epochs": 6, "load_avg": "1.0 / 1.0 / 1.0", "ray_start_s": 4.0,
           "run_training_s": 126.0, "tune_until_trial_s": 2.0, "first_report_s": 30.0, "epoch1_train_s": 18.0,
           "worker_start_and_setup_s": 8.0, "eval_ckpt_report_per_epoch_s": 4.0, "after_last_report_s": 1.5,
           "peak_memory_mb": 1500.0}
    return pd.DataFrame([plain, ray]).assign(train_examples=2000, eval_examples=500)


def test_render_only_describes_the_stored_epochs_and_task_sizes():
    cli = Namespace(quick=False, ddp=False, repeats=1, epochs=3)  # --render-only with the defaults: 3 epochs
    text = O.markdown(stored_rows(), defaultdict(str), cli)
    assert "2,000 train / 500 eval examples" in text and "5 epochs × 63 steps" in text
    assert "3 epochs" not in text
    raw = text.split("## Raw rows")[1]
    assert "| plain " in raw and "nan" not in raw  # the Ray row's plain-only columns are blank


def test_measured_work_is_the_plain_rows():
    work, task = O.measured_work(stored_rows()[lambda f: f.path == "plain"].median(numeric_only=True))
    assert work.epochs == 5 and (len(task.train), len(task.eval)) == (2000, 500)
