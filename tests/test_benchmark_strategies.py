"""benchmarks/strategies.py: the report's Command line is the one that produced its numbers."""

from __future__ import annotations

import sys
from collections import defaultdict
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

import strategies  # noqa: E402


def test_command_line_keeps_the_seeds(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["strategies.py", "--seeds", "0", "1", "--out", str(tmp_path)])
    args = strategies.parse_args()
    table = pd.DataFrame([{"strategy": name, "candidates_screened": 500, "allocation": "q:8", "trainable_params": 73728,
                           "proxy_grad_norm": score, "seeds": 2, "accuracy_mean": 0.8, "accuracy_std": 0.01,
                           "f1_mean": 0.79, "device_hours": 0.1} for name, score in (("optuna", 1.0), ("uniform_qv", np.nan))])
    task = SimpleNamespace(train=SimpleNamespace(texts=["a"] * 4), eval=SimpleNamespace(texts=["b"] * 2),
                           majority_rate=lambda: 0.5)
    cfg = SimpleNamespace(data=SimpleNamespace(task="rotten_tomatoes"),
                          screen=SimpleNamespace(rank_by="grad_norm", direction="minimize", proxies=["grad_norm"]))
    strategies.write(table, args, defaultdict(str), 60.0, task, cfg)
    assert f"Command: `python benchmarks/strategies.py --seeds 0 1 --out {tmp_path}`" in (tmp_path / "strategies.md").read_text()
