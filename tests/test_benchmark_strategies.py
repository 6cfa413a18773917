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


def test_random_control_trains_its_first_draw_not_the_proxy_best(tmp_path):
    from orchestrator.allocators import get_allocator, make_budget, space_modules
    from orchestrator.config import load_config
    from orchestrator.models import AdaptableModule
    from orchestrator.proxies import ModuleScores
    from orchestrator.screen import ScreenContext

    shapes = {"query": (384, 384), "value": (384, 384), "intermediate.dense": (384, 1536)}
    modules = [AdaptableModule(f"l{layer}.{kind}", layer, kind, *shape) for layer in range(6) for kind, shape in shapes.items()]
    cfg = load_config(strategies.SPACE, [f"results_dir={tmp_path}", "name=strategies", "screen.survivors=1"])
    rng = np.random.default_rng(0)
    scores = ModuleScores({"grad_norm": {m.name: float(rng.uniform(1e-6, 1e-4)) for m in modules},
                           "params": {m.name: float(m.params_per_rank) for m in modules}})
    budget = make_budget(modules, cfg.space)
    context = ScreenContext(space_modules(modules, cfg.space), cfg.space.ranks, budget, scores,
                            cfg.screen.candidates_per_trial, "grad_norm", -1.0, cfg.screen.seed)
    first = get_allocator("random").propose(scores.unit["grad_norm"], context.modules, context.ranks, budget, 1,
                                            np.random.default_rng(cfg.screen.seed), -1.0)[0]
    top, screened = strategies.screened_best(cfg, context, "random")
    assert top.candidate_id == first.candidate_id and screened > 1  # of many draws, the first: no score picked it
    assert strategies.screened_best(cfg, context, "knapsack")[1] > 1 and cfg.screen.allocator == "optuna"  # cfg untouched
