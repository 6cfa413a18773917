"""Is the quickstart's learning rate (2e-3) on its plateau? A check, not a pick: one seed, scored on the eval split.

Uniform q,v r8 (the quickstart's baseline) on its data (Rotten Tomatoes, 4,000 train / 1,000 eval, max_length 64,
one epoch, batch 32, 6% warm-up then linear decay, seed 0, 1 thread), trained in-process by the plain loop of
benchmarks/_common.py (the Ray Train worker's loop without Ray) at four learning rates.

Run from the repository root: python results/examples/quickstart-lr-check/lr_check.py  (~11 min on 2 cores)
Writes lr_check.csv beside this file.
"""

import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common as C  # noqa: E402

from orchestrator.allocation import uniform  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.data import load_task  # noqa: E402
from orchestrator.models import adaptable_modules, load_model  # noqa: E402

cfg = load_config(ROOT / "search_spaces" / "quickstart.yaml", [])
task = load_task(cfg.data)
allocation = uniform(adaptable_modules(load_model(cfg.model.name, task.num_labels)), ("query", "value"), 8)
lines = ["lr,accuracy,wall_s"]
for lr in (2e-3, 4e-3, 8e-3, 1.6e-2):
    started = time.time()
    result = C.plain_train(task, allocation, lr=lr, max_length=cfg.model.max_length, seed=0, threads=1)
    lines.append(f"{lr},{result.metrics[-1]['accuracy']},{time.time() - started:.1f}")
    print(lines[-1], flush=True)
(Path(__file__).parent / "lr_check.csv").write_text("\n".join(lines) + "\n")
