"""Adapter composition on the packaged MiniLM-L6: can LoRA adapters of other tasks, mixed from a few examples,
stand in for training a new adapter?

What it does, all on real shipped data:
1. Task pool. Trains one LoRA source adapter (uniform q,v r=8, 1 epoch, max_length 64) per source task with
   the product's own training path (`orchestrator.train.run_training`: Ray Tune + Ray Train) and registers it
   in an adapter registry (`orchestrator.registry.Registry.add`). Source tasks (`SOURCES`): rotten_tomatoes
   sentiment, Reuters-R8 topics, and two regrouped 20 Newsgroups tasks (comp.* vs rec.*; politics vs religion).
   Sources already in the registry are not trained again.
2. Unseen target tasks (`TARGETS`): 20 Newsgroups sci.med vs sci.space (classes no source saw) and
   sms_spam (a data set no source saw). For each target, shots per class and seed, `orchestrator.compose.compare`
   runs zero_shot, single_best, uniform, learned and few_shot_training on the same few-shot sample and
   measures accuracy / macro-F1 on the target's held-out eval split, search time and cost.
3. Stores the learned composition of the first target (first shots, seed 0) in the registry, reloads it
   through the registry (checksums, base-model hash, PEFT from_pretrained) and re-evaluates it.

Writes results/benchmarks/composition.{csv,md,png} (--quick: in results/benchmarks/quick/; --out changes the
folder); runs and the registry go to results/benchmarks/composition_runs/ (--quick: composition_runs/quick/, its
own registry of smaller sources; git-ignored).

Command: python benchmarks/composition.py [--seeds 3]  (2 targets × shots 8, 16 per class × 3 seeds)
         python benchmarks/composition.py --quick    (2 sources on 300 examples, 200 eval, the first target, 8 shots, 1 seed,
                                                      10 trials)
         or the targets in parallel: `--target 0 &`, `--target 1`, then `--report` (same flags each time)
Target: the whole run in < 25 min on 2 CPU cores (16.9 min on 2 idle cores, 2026-12-03); no claim is asserted,
the table is what was measured.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import NOISE_NOTE, RESULTS, add_out_argument, context_line, md_table, out_dir, start  # noqa: E402

import pandas as pd  # noqa: E402

MODEL = "minilm-l6"
SOURCES = {  # registry name → task spec (orchestrator.compose.load_task_spec)
    "rt-sentiment": "rotten_tomatoes",
    "reuters-topic": "reuters_r8",
    "ng-comp-rec": "newsgroups20:comp.*,rec.*",
    "ng-politics-religion": "newsgroups20:talk.politics.*,alt.atheism+soc.religion.christian+talk.religion.misc",
}
QUICK_SOURCES = ["rt-sentiment", "ng-comp-rec"]  # --quick: two sources (each is a serial training), still a composition
TARGETS = ["newsgroups20:sci.med,sci.space", "sms_spam"]
WORK = RESULTS / "composition_runs"


def train_sources(registry, names: list[str], train_size: int, eval_size: int, work: Path) -> pd.DataFrame:
    """One uniform q,v r=8 adapter per source task, trained by run_training and registered; one row each."""
    from orchestrator import pipeline
    from orchestrator.allocation import uniform
    from orchestrator.compose import load_task_spec
    from orchestrator.config import ModelConfig, RunConfig, TrainConfig
    from orchestrator.models import adaptable_modules, load_model
    from orchestrator.train import TrainJob, run_training

    ranks = uniform(adaptable_modules(load_model(MODEL, 2)), ("query", "value"), 8).as_dict()
    known = {e.name for e in registry.list()}
    rows = []
    for name, spec in ((name, SOURCES[name]) for name in names):
        task = load_task_spec(spec, eval_size, seed=0, train_size=train_size)
        if name not in known:
            pipeline.set_runtime_env()
            pipeline.init_ray(None)
            cfg = RunConfig(name=name, results_dir=str(work / "runs"), model=ModelConfig(MODEL, 64),
                            train=TrainConfig(epochs=1, batch_size=32))
            row = run_training(cfg, task, [TrainJob("uniform_qv", "baseline", "uniform_qv", ranks, 0)])["uniform_qv-s0"]
            if row["status"] != "completed":
                raise RuntimeError(f"source {name} failed: {row.get('error')}")
            metrics = {k: row[k] for k in ("accuracy", "f1", "train_wall_s", "cost_usd", "trainable_params")}
            registry.add(name, cfg.run_dir / row["adapter_dir"], spec, MODEL, None,
                         metrics | {"train_examples": len(task.train), "eval_examples": len(task.eval)},
                         source=f"benchmarks/composition.py:{cfg.run_dir}")
        entry = registry.show(name)
        rows.append({"source": name, "task": spec, "labels": task.num_labels, "train_examples": len(task.train),
                     "eval_accuracy": entry.metrics["accuracy"], "eval_f1": entry.metrics["f1"],
                     "train_wall_s": entry.metrics["train_wall_s"], "cost_usd": entry.metrics["cost_usd"]})
    return pd.DataFrame(rows)


def compose_target(index: int, sources, shots: list[int], seeds: list[int], trials: int, eval_size: int, work: Path):
    """compare() for one target × shots × seed, every run's rows written to <work>/target-<index>.csv at once;
    (shots, seed) pairs already in that file are kept, not run again. Returns the outcomes of the first
    pair run here (None when all were there) for registering."""
    from orchestrator.compose import ComposeConfig, compare, load_task_spec

    target, path, first = TARGETS[index], work / f"target-{index}.csv", None
    tables = [pd.read_csv(path)] if path.is_file() else []
    done = {(r.shots, r.seed) for r in tables[0].itertuples()} if tables else set()
    task = load_task_spec(target, eval_size, seed=0)
    for k in shots:
        for seed in (s for s in seeds if (k, s) not in done):
            started = time.perf_counter()
            cfg = ComposeConfig(shots=k, trials=trials, max_length=64, eval_size=eval_size, seed=seed)
            table, outcomes = compare(sources, MODEL, task, cfg)
            tables.append(table.assign(majority_rate=table.attrs["majority_rate"]))
            pd.concat(tables, ignore_index=True).to_csv(path, index=False)
            first = first or (task, cfg, table, outcomes)
            print(f"{target} shots={k} seed={seed}: {time.perf_counter() - started:.0f} s; "
                  + ", ".join(f"{m} {a:.3f}" for m, a in zip(table.method, table.accuracy)), flush=True)
    return first


def register_learned(registry, sources, first, work: Path) -> dict:
    """Save the learned composition, register it, load it back through the registry and re-evaluate it."""
    import torch

    from orchestrator.compose import register, save_composed
    from orchestrator.data import make_loader
    from orchestrator.models import load_tokenizer
    from orchestrator.train import evaluate

    task, cfg, table, outcomes = first
    row = table[table.method == "learned"].iloc[0].to_dict()
    out = work / "composed" / f"{task.name.replace(':', '_').replace(',', '_')}-s{cfg.shots}-seed{cfg.seed}"
    adapter = save_composed(sources, outcomes["learned"].weights, outcomes["learned"].head, MODEL, out)
    entry = register(registry, "composed-sci-med-space", adapter, sources, MODEL, task.name, row)
    loader = make_loader(task.eval, load_tokenizer(MODEL), cfg.max_length, 64, shuffle=False)
    again = evaluate(registry.load(entry.name, entry.version), loader, torch.device("cpu"))
    return {"name": entry.name, "version": entry.version, "allocation_rank": sum(
        int(part.rsplit(":", 1)[1]) for part in entry.allocation.split(",")), "accuracy_in_compare": row["accuracy"],
        "accuracy_after_registry_load": again["accuracy"], "size_bytes": entry.size_bytes}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="a smoke test: 2 sources on 300 examples, 200 eval, the first target, 8 shots, 1 seed, 10 trials")
    parser.add_argument("--seeds", type=int, default=3, help="few-shot samples per target and shots (full mode)")
    parser.add_argument("--target", type=int, choices=range(len(TARGETS)),
                        help="compose for this target only (run the targets in parallel, then --report)")
    parser.add_argument("--report", action="store_true", help="only write composition.{csv,md,png} from finished targets")
    parser.add_argument("--train-size", type=int, help="training examples per source task (default 1,000; quick 300)")
    parser.add_argument("--eval-size", type=int, help="held-out examples per task (default 400; quick 200)")
    add_out_argument(parser)
    args = parser.parse_args()
    seeds, trials, shots = ([0], 10, [8]) if args.quick else (list(range(args.seeds)), 30, [8, 16])
    names = QUICK_SOURCES if args.quick else list(SOURCES)
    targets = [0] if args.quick else list(range(len(TARGETS)))  # quick: the target the stored composition comes from
    args.train_size = args.train_size or (300 if args.quick else 1000)
    args.eval_size = args.eval_size or (200 if args.quick else 400)
    work = WORK / "quick" if args.quick else WORK  # quick sources see less data: their own registry, never the full one
    work.mkdir(parents=True, exist_ok=True)
    ctx = start()
    import ray

    from orchestrator.compose import load_sources, write_report
    from orchestrator.registry import Registry

    started = time.perf_counter()
    registry = Registry(work / "registry")
    try:
        pool = train_sources(registry, names, args.train_size, args.eval_size, work)
    finally:
        ray.shutdown()
    if not args.report:
        sources, _ = load_sources(registry, names)
        for index in [args.target] if args.target is not None else targets:
            first = compose_target(index, sources, shots, seeds, trials, args.eval_size, work)
            if index == 0 and first is not None:
                (work / "stored.json").write_text(json.dumps(register_learned(registry, sources, first, work)))
        print(f"target(s) done in {(time.perf_counter() - started) / 60:.1f} min", flush=True)
    if args.target is not None:
        return
    table = pd.concat([pd.read_csv(work / f"target-{i}.csv") for i in targets], ignore_index=True)
    stored = json.loads((work / "stored.json").read_text())
    made = registry.show(stored["name"], stored["version"]).metrics  # which few-shot sample it came from
    command = "python benchmarks/composition.py" + (" --quick" if args.quick else f" --seeds {args.seeds}")
    header = [
        "# Adapter composition on MiniLM-L6: composed source adapters vs training on the few examples", "",
        f"Command: `{command}` (or the targets in parallel: `--target 0`, `--target 1`, then `--report`) · "
        f"{time.strftime('%Y-%m-%d %H:%M')}", "", context_line(ctx) + ".", "", NOISE_NOTE, "",
        "## Task pool (source adapters)", "",
        "Each source: LoRA on query+value, r=8, 1 epoch, max_length 64, trained by `run_training` (Ray Tune + "
        f"Ray Train) on {args.train_size} examples at most, evaluated on its own held-out split, then registered.", "",
        md_table(pool), "",
        f"Targets (unseen): {', '.join(f'`{TARGETS[i]}`' for i in targets)}; {args.eval_size} held-out eval examples at most "
        f"(the same for every method and seed). Shots are labelled examples per class ({', '.join(map(str, shots))}); "
        f"seeds {sorted(table.seed.unique().tolist())} draw different few-shot samples. Learned: {trials} Optuna TPE "
        "trials, l1 0.05, w ∈ [-1.5, 1.5]. few_shot_training: fresh LoRA q,v r=8 + head, 20 epochs, AdamW 2e-3. "
        "Heads of the other methods: logistic regression on the pooled features of the few-shot examples. search_s "
        "is the method's wall time on the few-shot examples (evaluation excluded); cost_usd = search_s × torch "
        "threads × 0.0446 USD per vCPU-hour.", "",
        f"Stored: the learned composition of `{TARGETS[0]}` ({made['shots']} shots, seed {made['seed']}) as registry entry "
        f"{stored['name']} v{stored['version']} (rank {stored['allocation_rank']} in all, {stored['size_bytes']:,} "
        f"bytes); accuracy {stored['accuracy_in_compare']:.4f} in the comparison, "
        f"{stored['accuracy_after_registry_load']:.4f} after `Registry.load`.", ""]
    paths = write_report(table, out_dir(args), stem="composition", header=header)
    print(f"Written: {', '.join(map(str, paths))}")


if __name__ == "__main__":
    main()
