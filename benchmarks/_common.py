"""Shared pieces of the benchmarks: the plain PEFT training loop, machine context, table writing.

The plain loop is `orchestrator.train.train_loop_per_worker` without Ray: the same loaders
(`make_loader`), the same model (`load_model` + `apply_lora`), AdamW with `_linear_warmup_decay`,
and `evaluate` after every epoch. It is the yardstick the Ray paths are compared with.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import math
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

RESULTS = ROOT / "results" / "benchmarks"
QUICK_RESULTS = RESULTS / "quick"  # --quick tables are smoke-sized: kept apart so they never replace the full ones
WITHIN_PTS = 0.5  # issue #12: "within 0.5 point of the best"
NOISE_NOTE = ("Measured on a 2-core CPU machine shared with other engineers' test runs: every wall time "
              "carries load noise (the load average is given beside each run); compare ratios taken in the same "
              "run, not absolute seconds across runs.")


def machine_context() -> dict:
    """What the numbers were measured on, and how loaded the machine was."""
    from orchestrator.pipeline import package_versions
    from orchestrator.train import cpu_kernels

    return {"python": platform.python_version(), "cpus": os.cpu_count(), "cpu": cpu_kernels(),
            "load_avg_1_5_15": load_now(), **package_versions(("torch", "transformers", "peft", "ray", "optuna"))}


def context_line(ctx: dict) -> str:
    return (f"Python {ctx['python']}, {ctx['cpus']} CPU cores ({ctx['cpu']}), torch {ctx['torch']}, transformers {ctx['transformers']}, "
            f"peft {ctx['peft']}, ray {ctx['ray']}, optuna {ctx['optuna']}; load average (1/5/15 min) at start "
            f"{ctx['load_avg_1_5_15']}")


def invoked_command(script_file: str) -> str:
    """The benchmark's command line as it was invoked, from the repository root (a report's "Command:" line)."""
    return shlex.join(["python", f"benchmarks/{Path(script_file).name}", *sys.argv[1:]])


def load_now() -> str:
    return " / ".join(f"{x:.1f}" for x in os.getloadavg())


def rss_mb() -> float:
    import psutil

    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


def start() -> dict:
    """Set the product's runtime variables (orchestrator.pipeline.RUNTIME_ENV, before torch is imported), print the
    machine context and return it."""
    from orchestrator.pipeline import set_runtime_env

    set_runtime_env()
    ctx = machine_context()
    print("context:", context_line(ctx), flush=True)
    return ctx


def begin(script: str, quick: bool) -> tuple[dict, Path]:
    """start(), and the script's runs folder for its preset."""
    return start(), RESULTS / f"{script}_runs" / ("quick" if quick else "full")


def fresh_runs_root(runs_root: Path) -> Path:
    """The script's runs folder, emptied of its own earlier runs (run names must be new)."""
    if runs_root.exists():
        shutil.rmtree(runs_root)
    runs_root.mkdir(parents=True)
    return runs_root


@contextlib.contextmanager
def embedded_ray():
    """The product's embedded local Ray (`orchestrator.pipeline.init_ray`) for the block, shut down after it."""
    import ray

    from orchestrator.pipeline import init_ray

    init_ray(None)
    try:
        yield
    finally:
        ray.shutdown()


def add_out_argument(parser) -> None:
    parser.add_argument("--out", type=Path, help="folder for the tables (default: results/benchmarks, "
                                                 "with --quick results/benchmarks/quick)")


def out_dir(args) -> Path:
    """Where a script writes its tables: --out, else the full or the --quick results folder."""
    return Path(args.out) if args.out else QUICK_RESULTS if args.quick else RESULTS


def md_table(frame: pd.DataFrame, floatfmt: str = ".4g", blank_missing: bool = False) -> str:
    """The frame as a Markdown table; `blank_missing` leaves NaN cells blank (tabulate's missingval replaces only
    None, so NaN would print "nan")."""
    if blank_missing:
        frame = frame.astype(object).where(frame.notna(), None)
    return frame.to_markdown(index=False, floatfmt=floatfmt)


def write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_csv(path: Path, frame: pd.DataFrame) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".partial")
    frame.to_csv(tmp, index=False)
    tmp.replace(path)


def write_results(out: Path, name: str, frame: pd.DataFrame, text: str) -> None:
    """<out>/<name>.csv and <name>.md, then the Markdown on stdout."""
    write_csv(out / f"{name}.csv", frame)
    write_text(out / f"{name}.md", text)
    print(text, flush=True)


def run_overrides(results_dir: Path, seeds: list[int], quick: bool) -> list[str]:
    """What every benchmark run of a shipped space shares: its results folder, seeds, two CPU trainings at a
    time, and --quick's smoke-sized data (300 train / 200 eval, max_length 64) and probe (2 minibatches, not 8)."""
    found = [f"results_dir={results_dir}", f"train.seeds=[{','.join(map(str, seeds))}]", "train.max_concurrent=2",
             "train.use_gpu=false"]
    if quick:
        found += ["data.train_size=300", "data.eval_size=200", "model.max_length=64", "screen.proxy_batches=2"]
    return found


# ---------------------------------------------------------------- the plain PEFT loop


@dataclass
class PlainResult:
    setup_s: float = 0.0  # tokenizer, tokenised loaders, model load, apply_lora
    epoch_train_s: list[float] = field(default_factory=list)
    epoch_eval_s: list[float] = field(default_factory=list)
    epoch_train_cpu_s: list[float] = field(default_factory=list)  # process CPU time: what load distorts least
    checkpoint_s: float = float("nan")  # one checkpoint as train.py writes it (measured apart, not in total_s)
    total_s: float = 0.0  # setup + train + eval of every epoch
    steps_per_epoch: int = 0
    trainable_params: int = 0
    metrics: list[dict] = field(default_factory=list)
    trained: dict = field(default_factory=dict)  # name → tensor: the trained parameters (LoRA and head) at the end


def plain_train(task, allocation, *, model_name: str = "minilm-l6", max_length: int = 64, epochs: int = 1,
                batch_size: int = 32, eval_batch_size: int = 64, lr: float = 2e-3, warmup_ratio: float = 0.06,
                seed: int = 0, threads: int = 1, evaluate_every_epoch: bool = True,
                measure_checkpoint: bool = False, max_steps: int | None = None) -> PlainResult:
    """Train one allocation in-process exactly as a Ray Train worker would, timing each piece. `max_steps` ends
    training after that many steps, the schedule with it (as `train.max_steps` does)."""
    import torch

    from orchestrator.allocation import apply_lora
    from orchestrator.data import make_loader
    from orchestrator.models import load_model, load_tokenizer
    from orchestrator.train import _linear_warmup_decay, evaluate, seed_epoch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    out = PlainResult()
    started = time.perf_counter()
    tokenizer = load_tokenizer(model_name)
    train_loader = make_loader(task.train, tokenizer, max_length, batch_size, shuffle=True, seed=seed)
    eval_loader = make_loader(task.eval, tokenizer, max_length, eval_batch_size, shuffle=False)
    model = apply_lora(load_model(model_name, task.num_labels, seed=seed), allocation)
    out.setup_s = time.perf_counter() - started
    out.steps_per_epoch = len(train_loader)
    out.trainable_params = sum(p.numel() for n, p in model.named_parameters() if p.requires_grad and "lora_" in n)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=lr, weight_decay=0.0)
    steps = min(epochs * len(train_loader), max_steps or math.inf)
    scheduler = _linear_warmup_decay(optimizer, steps, warmup_ratio)
    device = torch.device("cpu")
    for epoch in range(math.ceil(steps / len(train_loader))):
        seed_epoch(train_loader, seed, epoch)
        model.train()
        t0, c0 = time.perf_counter(), time.process_time()
        losses = []
        for batch in itertools.islice(train_loader, steps - epoch * len(train_loader)):
            loss = model(**batch).loss
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss.detach()))
        out.epoch_train_s.append(time.perf_counter() - t0)
        out.epoch_train_cpu_s.append(time.process_time() - c0)
        metrics = {"epoch": epoch + 1, "train_loss": float(np.mean(losses))}
        if evaluate_every_epoch:
            t0 = time.perf_counter()
            metrics.update(evaluate(model, eval_loader, device))
            out.epoch_eval_s.append(time.perf_counter() - t0)
        out.metrics.append(metrics)
    out.total_s = time.perf_counter() - started
    out.trained = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    if measure_checkpoint:
        out.checkpoint_s = _checkpoint_seconds(model, optimizer, scheduler)
    return out


def _checkpoint_seconds(peft_model, optimizer, scheduler) -> float:
    """One epoch checkpoint as `train._report_with_checkpoint` writes it (adapter + optimizer state), to a temp dir.

    Ray then copies the directory into the run's storage (`ray.train.report`); that copy is not counted here."""
    import torch

    tmp = tempfile.mkdtemp()
    try:
        t0 = time.perf_counter()
        peft_model.save_pretrained(tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict()}, Path(tmp) / "train_state.pt")
        return time.perf_counter() - t0
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def hours_to_reach(accuracy, device_hours, goal: float, within_pts: float = WITHIN_PTS) -> float:
    """Device-hours spent training models in the given order until one is within `within_pts` of `goal`.

    `accuracy` (fractions) and `device_hours` are sequences in training order; NaN if none gets there."""
    spent = 0.0
    for acc, hours in zip(accuracy, device_hours):
        spent += hours
        if acc >= goal - within_pts / 100:
            return spent
    return float("nan")


def expected_hours_to_reach(accuracy, device_hours, goal: float, groups=None) -> float:
    """Expected device-hours spent training models until one is within WITHIN_PTS of `goal`, when they are trained
    group by group as listed and in a random order inside each group (`groups`: one key per model, consecutive equal
    keys are one group, e.g. exact ties of a ranking; None: one group, a fully random order). NaN if none gets there.

    Exact: in a group with g such models, each other model is trained before all g with probability 1/(g + 1), and
    each of the g is the first of them with probability 1/g."""
    accuracy, hours = np.asarray(accuracy, float), np.asarray(device_hours, float)
    keys = np.zeros(len(hours)) if groups is None else np.asarray(groups)
    near = accuracy >= goal - WITHIN_PTS / 100
    spent, start = 0.0, 0
    for _, members in itertools.groupby(keys.tolist()):
        end = start + len(list(members))
        mine, hit = hours[start:end], near[start:end]
        if hit.any():
            g = int(hit.sum())
            return float(spent + mine[~hit].sum() / (g + 1) + mine[hit].sum() / g)
        spent, start = spent + mine.sum(), end
    return float("nan")


def probe_seconds(scores: dict) -> float:
    """Seconds of a run's proxy probe from its module_scores.json: every proxy's `seconds` plus the `warmup_seconds`
    paid once before them (as orchestrator.report.cost_breakdown counts it)."""
    return float(sum(scores.get("seconds", {}).values()) + (scores.get("warmup_seconds") or 0.0))


def best_of_every_k_subset(accuracy, k: int) -> np.ndarray:
    """The best accuracy of every k-subset of the given models: its mean is the exact expected best of k
    models drawn at random from them."""
    accuracy = np.asarray(accuracy, float)
    return np.array([accuracy[list(subset)].max() for subset in itertools.combinations(range(len(accuracy)), k)])


def linear_fit(xs, ys) -> tuple[float, float, float]:
    """slope, intercept, R² of a least-squares line."""
    xs, ys = np.asarray(xs, float), np.asarray(ys, float)
    slope, intercept = np.polyfit(xs, ys, 1)
    residual = ys - (slope * xs + intercept)
    total = ((ys - ys.mean()) ** 2).sum()
    r2 = 1.0 - (residual ** 2).sum() / total if total > 0 else float("nan")
    return float(slope), float(intercept), float(r2)
