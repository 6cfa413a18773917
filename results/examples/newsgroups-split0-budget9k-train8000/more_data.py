"""Does placement matter again at a tuned learning rate when there is 4x the training data? A check, not a pick.

20 Newsgroups, sample 0 (split_seed 0), 9,216-param budget, the recipe of search_spaces/newsgroups_tight_budget.yaml
(one epoch, batch 32, 6% warm-up, max_length 96, 1,000 eval) with data.train_size=8000 instead of 2,000. Two
allocations of benchmarks/exhaustive.py, FFN-up layers 1-5 r1 (the best there at lr 8e-3 and 1.6e-2) and uniform
q,v r1, at the learning rates given, seeds 0 1 2, trained through `orchestrator.train.run_training` (Ray Tune +
Ray Train, two trainings at a time). The lr is picked on the eval split for both arms alike: a diagnostic.

Run from the repository root:
    python results/examples/newsgroups-split0-budget9k-train8000/more_data.py 8e-3 1.6e-2   (71 min on 2 cores)
    python results/examples/newsgroups-split0-budget9k-train8000/more_data.py 3.2e-2 --resume   (adds a rate)
Writes more_data.csv beside this file: every rate the run in /tmp/runs/ng-train8000 has trained.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "benchmarks"))

import _common as C  # noqa: E402

parser = argparse.ArgumentParser()
parser.add_argument("lrs", type=float, nargs="+")
parser.add_argument("--resume", action="store_true", help="add rates to the earlier run; its trainings are kept")
args = parser.parse_args()
C.start()  # before the imports: it sets the product's runtime variables (HF_HUB_OFFLINE among them)

import pandas as pd  # noqa: E402
import ray  # noqa: E402
from exhaustive import small_space  # noqa: E402

from orchestrator import pipeline  # noqa: E402
from orchestrator.config import load_config  # noqa: E402
from orchestrator.data import load_task  # noqa: E402
from orchestrator.lr_tuning import sweep_id  # noqa: E402
from orchestrator.models import adaptable_modules, load_model  # noqa: E402
from orchestrator.train import TrainJob, run_training  # noqa: E402

SEEDS = (0, 1, 2)
cfg = load_config(ROOT / "search_spaces" / "newsgroups_tight_budget.yaml",
                  ["name=ng-train8000", "results_dir=/tmp/runs", "data.train_size=8000", "train.baselines=[]",
                   f"train.seeds=[{','.join(map(str, SEEDS))}]"])
task = load_task(cfg.data)
modules = adaptable_modules(load_model(cfg.model.name, task.num_labels))
arms = {label: a for label, a in small_space(modules, quick=False).items() if label in ("ffn_up L1-5 r1", "q+v r1")}
jobs = [TrainJob(sweep_id(a.candidate_id, lr), "searched", label, a.as_dict(), seed, lr=lr)
        for lr in args.lrs for seed in SEEDS for label, a in arms.items()]

pipeline.prepare_run_dir(cfg, args.resume)
pipeline.write_run_json(cfg, command="more_data.py", allocations=len(arms))
pipeline.init_ray(None)
try:
    trials = run_training(cfg, task, jobs)
finally:
    ray.shutdown()
rows = [{"lr": t["lr"], "label": t["label"], "seed": t["seed"], "accuracy": t["accuracy"],
         "train_wall_s": t["train_wall_s"]} for t in trials.values() if t.get("status") == "completed"]
table = pd.DataFrame(rows).sort_values(["lr", "label", "seed"])
table.to_csv(Path(__file__).parent / "more_data.csv", index=False)
print(table.groupby(["lr", "label"]).accuracy.agg(["mean", "std", "count"]).round(4))
