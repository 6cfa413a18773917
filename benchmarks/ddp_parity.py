"""DDP parity: the same model trained by a plain PEFT loop, by the product with 1 Ray Train worker, and with 2.

What it measures: uniform LoRA on query+value at r=8 (73,728 params) on the packaged MiniLM-L6, Rotten
Tomatoes as in the quickstart (4,000 train / 1,000 eval, max_length 64, batch 32 global, AdamW lr 2e-3,
6% warm-up, 1 epoch), for each seed:

  plain    — benchmarks/_common.plain_train: one process, a plain PyTorch/PEFT loop, no Ray;
  1 worker — the product: orchestrator.train.run_training with train.num_workers=1 (a Tune trial that
             fits a Ray Train TorchTrainer);
  2 workers — the same with train.num_workers=2: DDP on CPU (gloo), a DistributedSampler, micro-batches
             of 16 per worker, so the global batch and the optimizer steps equal the 1-worker run's.

Per path: accuracy and train loss, mean ± std over seeds; Welch's t-test of each Ray path against the
plain loop. The data order differs between paths (a DistributedSampler draws its own permutation), so
equal within the seed spread is what parity means here; the step-level equality with a fixed order is
what tests/test_train_steps.py checks.

Target: |2 workers − 1 worker| and |1 worker − plain| within the seed spread (p > 0.05).

Run (from the repository root):
    python benchmarks/ddp_parity.py                 # seeds 0 1 2 (25 min on 2 cores, 2026-12-03)
    python benchmarks/ddp_parity.py --quick         # seed 0, 200 train / 100 eval (a smoke test: no seed spread)
    python benchmarks/ddp_parity.py --seeds 0 1 2 3 4 --train-size 2000
Writes results/benchmarks/ddp_parity.{csv,md} (--quick: in results/benchmarks/quick/; --out changes the
folder).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import pandas as pd  # noqa: E402

PATHS = ["plain", "1 worker", "2 workers"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="seed 0, 200 train / 100 eval (a smoke test: no seed spread)")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--train-size", type=int)
    parser.add_argument("--eval-size", type=int)
    C.add_out_argument(parser)
    args = parser.parse_args()
    args.seeds = args.seeds or ([0] if args.quick else [0, 1, 2])
    args.train_size = args.train_size or (200 if args.quick else 4000)
    args.eval_size = args.eval_size or (100 if args.quick else 1000)
    return args


def product_rows(args, task, allocation, results_dir: str, workers: int) -> list[dict]:
    """Every seed through init_ray → run_training (1-worker models two at a time, 2-worker ones alone)."""
    from orchestrator.config import load_config
    from orchestrator.train import TrainJob, run_training

    seeds = ",".join(map(str, args.seeds))
    cfg = load_config(C.ROOT / "search_spaces" / "quickstart.yaml",
                      [f"name=workers{workers}", f"results_dir={results_dir}", f"data.train_size={args.train_size}",
                       f"data.eval_size={args.eval_size}", f"train.seeds=[{seeds}]", f"train.num_workers={workers}",
                       f"train.max_concurrent={2 // workers}", "train.cpus_per_worker=1", "train.use_gpu=false"])
    cfg.run_dir.mkdir(parents=True)
    jobs = [TrainJob(allocation.candidate_id, "baseline", "uniform_qv", allocation.as_dict(), seed) for seed in args.seeds]
    with C.embedded_ray():
        trials = run_training(cfg, task, jobs)
    return [{"path": f"{workers} worker{'s' if workers > 1 else ''}", "seed": job.seed,
             "accuracy": trials[job.job_id]["accuracy"], "train_loss": trials[job.job_id]["train_loss"],
             "train_wall_s": trials[job.job_id]["train_wall_s"]} for job in jobs]


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    from scipy.stats import ttest_ind

    plain = frame[frame.path == "plain"].accuracy
    rows = []
    for path in PATHS:
        acc = frame[frame.path == path].accuracy
        loss = frame[frame.path == path].train_loss
        rows.append({"path": path, "seeds": len(acc), "accuracy_mean_pct": 100 * acc.mean(),
                     "accuracy_std_pct": 100 * acc.std(), "train_loss_mean": loss.mean(),
                     "diff_vs_plain_pts": 100 * (acc.mean() - plain.mean()),
                     "p_vs_plain": ttest_ind(acc, plain, equal_var=False).pvalue if path != "plain" and len(acc) > 1 else float("nan"),
                     "train_wall_s_mean": frame[frame.path == path].train_wall_s.mean()})
    return pd.DataFrame(rows)


def markdown(frame: pd.DataFrame, table: pd.DataFrame, ctx: dict, args) -> str:
    one, two = (table.set_index("path").loc[p] for p in ("1 worker", "2 workers"))
    gap = two.accuracy_mean_pct - one.accuracy_mean_pct
    spread = max(one.accuracy_std_pct, two.accuracy_std_pct)
    return "\n".join([
        "# DDP parity: plain loop vs 1 vs 2 Ray Train workers", "",
        f"Command: `python benchmarks/ddp_parity.py --seeds {' '.join(map(str, args.seeds))} --train-size {args.train_size} "
        f"--eval-size {args.eval_size}` · {time.strftime('%Y-%m-%d %H:%M')}", "",
        C.context_line(ctx), "",
        f"uniform_qv r=8 on Rotten Tomatoes ({args.train_size:,} train / {args.eval_size:,} eval), 1 epoch, global "
        "batch 32. Accuracy in %, mean ± std over seeds; p = Welch's t-test against the plain loop. Wall times "
        "are each path's training loop only (2 workers: 1 thread each, so twice the cores).", "",
        C.md_table(table), "",
        f"- 2 workers − 1 worker: {gap:+.2f} points; " + (f"the larger seed spread is {spread:.2f} points: "
        f"{'within' if abs(gap) <= spread else 'outside'} it." if len(args.seeds) > 1 else "one seed: no spread to judge it by."), "",
        "## Every run", "", C.md_table(frame), ""])


def main() -> None:
    args = parse_args()
    ctx = C.start()
    import torch

    from orchestrator.allocation import uniform
    from orchestrator.config import load_config
    from orchestrator.data import load_task
    from orchestrator.models import adaptable_modules, load_model

    torch.set_num_threads(1)
    cfg = load_config(C.ROOT / "search_spaces" / "quickstart.yaml",
                      [f"data.train_size={args.train_size}", f"data.eval_size={args.eval_size}"])
    task = load_task(cfg.data)
    allocation = uniform(adaptable_modules(load_model("minilm-l6", task.num_labels)), ("query", "value"), 8)
    rows = []
    for seed in args.seeds:
        plain = C.plain_train(task, allocation, epochs=1, threads=1, seed=seed)
        rows.append({"path": "plain", "seed": seed, "accuracy": plain.metrics[-1]["accuracy"],
                     "train_loss": plain.metrics[-1]["train_loss"], "train_wall_s": sum(plain.epoch_train_s)})
        print(f"plain seed {seed}: accuracy {rows[-1]['accuracy']:.3f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="ddp-parity-") as tmp:
        for workers in (1, 2):
            rows += product_rows(args, task, allocation, tmp, workers)
            print(rows[-len(args.seeds):], flush=True)
    frame = pd.DataFrame(rows)
    table = summary(frame)
    C.write_results(C.out_dir(args), "ddp_parity", frame, markdown(frame, table, ctx, args))


if __name__ == "__main__":
    main()
