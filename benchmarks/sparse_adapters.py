"""Sparse modular adapters vs a dense mixture vs plain LoRA at equal trainable parameters (DESIGN §6).

What it measures, on the packaged MiniLM-L6 and Rotten Tomatoes (orchestrator.data, split by movie),
with the adapters on query+value of every layer and the recipe of orchestrator/train.py (AdamW
lr 2e-3, 6% warm-up then linear decay, batch 32, classifier head trained, alpha = 2r):

- sparse: E LoRA experts of rank r per module, a per-input router (mean-pooled embeddings), top-k
  active, Switch load-balancing term (weight --aux-weight) in the loss; all experts run in one pair of
  matmuls with zero gates for the unselected ones (routing.py's default, fastest at small ranks);
- dense:  the same experts and routers, every expert active with softmax weights, no aux term;
- lora:   plain PEFT LoRA with the uniform rank whose parameter count is closest to the routed
  models' (experts + routers); both counts are reported;
- eval-only rows on the trained weights: `sparse, only selected experts run` (rows gathered per
  expert: does true sparse compute pay?) and `lora, merged` (B·A folded into W: the
  no-adapter latency floor that plain LoRA can reach and routed experts cannot).

Per model: accuracy, macro-F1, the majority-class rate (a model at it learned nothing), trainable
params (head apart), train seconds, forward latency per eval batch (mean and p95, after one warm-up
batch), peak inference memory above the pre-eval level (CPU: peak RSS via VmHWM; GPU: CUDA max
allocated), fraction of experts active per input, mean router entropy and expert-usage entropy.

Run (from the repository root):
    python benchmarks/sparse_adapters.py --quick    # 500 train / 200 eval, 1 epoch, 1 thread, seed 0
    python benchmarks/sparse_adapters.py            # 4,000 train / 1,000 eval, 1 epoch, 1 thread, seeds 0 1 2
    python benchmarks/sparse_adapters.py --quick --train-size 4000   # any flag overrides the preset
Writes results/benchmarks/sparse_adapters.{csv,md} (--quick: in results/benchmarks/quick/; --out changes the
folder).
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._common import add_out_argument, invoked_command, out_dir, write_results  # noqa: E402
from orchestrator.allocation import Allocation, apply_lora  # noqa: E402
from orchestrator.config import DataConfig  # noqa: E402
from orchestrator.data import load_task, make_loader  # noqa: E402
from orchestrator.models import adaptable_modules, load_model, load_tokenizer  # noqa: E402
from orchestrator.routing import attach_routed_adapters, measure_inference, train_routed  # noqa: E402

PRESETS = {"quick": dict(train_size=500, eval_size=200, epochs=1, seeds=[0]),
           "full": dict(train_size=4000, eval_size=1000, epochs=1, seeds=[0, 1, 2])}
COLUMNS = ["variant", "seed", "accuracy", "f1", "majority_rate", "trainable_params", "head_params", "params_vs_lora",
           "train_s", "train_cpu_s", "latency_ms_mean", "latency_ms_p95", "latency_cpu_ms_mean", "latency_cpu_ms_p95",
           "peak_infer_mem_mb", "fraction_active", "router_entropy",
           "usage_entropy", "top_expert_share", "train_loss", "aux_loss"]


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 train / 200 eval, one seed (a smoke test)")
    parser.add_argument("--train-size", type=int)
    parser.add_argument("--eval-size", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument("--model", default="minilm-l6")
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--eval-batch-size", type=int, default=32, help="smaller: more batches for the p95")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--expert-rank", type=int, default=2)
    parser.add_argument("--top-k", type=int, default=1)
    parser.add_argument("--raw-gate", action="store_true",
                        help="gate = router probability (Switch) instead of renormalised top-k (1.0 at k=1)")
    parser.add_argument("--mode", default="per_input", choices=["per_input", "per_token"])
    parser.add_argument("--aux", default="balance", choices=["balance", "entropy", "none"])
    parser.add_argument("--aux-weight", type=float, default=0.01, help="Switch Transformer used 0.01")
    parser.add_argument("--module-types", nargs="+", default=["query", "value"])
    parser.add_argument("--threads", type=int, default=1)
    add_out_argument(parser)
    args = parser.parse_args()
    for key, value in PRESETS["quick" if args.quick else "full"].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def row(variant: str, seed: int, result: dict, majority: float, lora_params: int) -> dict:
    usage = result.get("usage_sorted")
    return {"variant": variant, "seed": seed, "majority_rate": majority,
            "params_vs_lora": result.get("trainable_params", np.nan) / lora_params,
            "train_s": result.get("train_wall_s", np.nan),
            "train_cpu_s": result.get("train_cpu_s", np.nan), "top_expert_share": usage[0] if usage else np.nan,
            **{k: v for k, v in result.items() if k in COLUMNS}}


def run_seed(args, seed: int, task, tokenizer, names: list[str], lora_rank: int, lora_params: int) -> list[dict]:
    majority = task.majority_rate()
    train_loader = make_loader(task.train, tokenizer, args.max_length, args.batch_size, shuffle=True, seed=seed)
    eval_loader = make_loader(task.eval, tokenizer, args.max_length, args.eval_batch_size, shuffle=False)
    common = dict(epochs=args.epochs, lr=args.lr, device="cpu" if not torch.cuda.is_available() else None)
    rows = []

    def log(r):
        rows.append(r)
        print(json.dumps({k: (round(v, 4) if isinstance(v, float) else v) for k, v in r.items()}), flush=True)

    # plain LoRA at (nearly) equal params
    peft_model = apply_lora(load_model(args.model, task.num_labels, seed=seed), Allocation.from_ranks(
        {name: lora_rank for name in names}))
    result = train_routed(peft_model, None, train_loader, eval_loader, aux_weight=0.0, **common)
    log(row(f"lora r={lora_rank}", seed, result, majority, lora_params))
    merged = copy.deepcopy(peft_model).merge_and_unload()
    log(row(f"lora r={lora_rank}, merged (eval only)", seed, measure_inference(
        merged, eval_loader, next(merged.parameters()).device), majority, lora_params))
    del peft_model, merged

    for gating in ("topk", "dense"):
        model = load_model(args.model, task.num_labels, seed=seed)
        torch.manual_seed(seed)
        state = attach_routed_adapters(model, names, args.experts, args.expert_rank, args.top_k, mode=args.mode,
                                       gating=gating, aux=args.aux if gating == "topk" else "none",
                                       renormalize=not args.raw_gate)
        aux_weight = args.aux_weight if gating == "topk" else 0.0
        result = train_routed(model, state, train_loader, eval_loader, aux_weight=aux_weight, **common)
        label = (f"sparse E={args.experts} r={args.expert_rank} k={args.top_k} {args.mode}"
                 f"{', raw gate' if args.raw_gate else ''}" if gating == "topk"
                 else f"dense E={args.experts} r={args.expert_rank} (all active)")
        log(row(label, seed, result, majority, lora_params))
        if gating == "topk":
            state.set_sparse_compute(True)
            result = measure_inference(model, eval_loader, next(model.parameters()).device, state=state)
            stats = state.stats()
            result |= {"trainable_params": state.trainable_params(), "fraction_active": stats["fraction_active"],
                       "router_entropy": stats["router_entropy"], "usage_entropy": stats["usage_entropy"]}
            log(row(label + ", only selected experts run (eval only)", seed, result, majority, lora_params))
        del model, state
    return rows


def markdown(frame: pd.DataFrame, args, lora_rank: int, lora_params: int, routed_params: int, wall: float) -> str:
    shown = frame[COLUMNS].copy()
    for col in ("accuracy", "f1", "majority_rate", "fraction_active"):
        shown[col] = shown[col].map(lambda v: f"{v:.3f}" if pd.notna(v) else "")
    for col in ("router_entropy", "usage_entropy", "top_expert_share", "train_loss", "aux_loss", "params_vs_lora"):
        shown[col] = shown[col].map(lambda v: f"{v:.3f}" if pd.notna(v) else "")
    for col in ("train_s", "train_cpu_s", "latency_ms_mean", "latency_ms_p95", "latency_cpu_ms_mean", "latency_cpu_ms_p95",
                "peak_infer_mem_mb"):
        shown[col] = shown[col].map(lambda v: f"{v:.1f}" if pd.notna(v) else "")
    shown["head_params"] = shown["head_params"].map(lambda v: f"{int(v):,}" if pd.notna(v) else "")
    shown["trainable_params"] = shown["trainable_params"].map(lambda v: f"{int(v):,}" if pd.notna(v) else "")
    lines = [
        "# Sparse modular adapters vs dense mixture vs plain LoRA",
        "",
        f"`{invoked_command(__file__)}` · {time.strftime('%Y-%m-%d %H:%M')} · "
        f"model {args.model} · "
        f"Rotten Tomatoes {args.train_size} train / {args.eval_size} eval · max_length {args.max_length} · "
        f"{args.epochs} epoch(s) · batch {args.batch_size} (eval {args.eval_batch_size}) · lr {args.lr} · "
        f"{args.threads} thread(s) · {torch.get_num_threads()} torch threads · {platform.processor() or platform.machine()} · "
        f"total {wall / 60:.1f} min",
        "",
        f"Adapters on {', '.join(args.module_types)} of every layer. Routed: E={args.experts} experts of rank "
        f"{args.expert_rank}, router {args.mode}, top-k {args.top_k} ({'raw' if args.raw_gate else 'renormalised'} gates), aux `{args.aux}` × {args.aux_weight} "
        f"(sparse only): {routed_params:,} trainable params (experts + routers). Plain LoRA r={lora_rank}: "
        f"{lora_params:,} ({100 * (routed_params / lora_params - 1):+.1f}%). Head params are apart.",
        "",
        shown.to_markdown(index=False),
        "",
        "latency: forward per eval batch in ms, wall clock and process CPU time (`_cpu_`: what a busy shared machine "
        "distorts least); train_s / train_cpu_s: the same for the whole training; peak_infer_mem_mb: peak memory above the pre-eval level during "
        "the eval pass; fraction_active: experts with a nonzero gate per input / E; router_entropy: mean entropy "
        f"of the router distribution (nats, uniform = {np.log(args.experts):.3f}); usage_entropy: entropy of each "
        "module's expert-usage histogram (balanced = same); top_expert_share: share of inputs the most used expert "
        "of a module gets (mean over modules). A model whose accuracy equals majority_rate learned nothing.",
    ]
    if frame.seed.nunique() > 1:
        agg = frame.groupby("variant", sort=False)[["accuracy", "f1", "train_cpu_s", "latency_cpu_ms_mean",
                                                    "latency_cpu_ms_p95", "peak_infer_mem_mb"]].agg(["mean", "std"])
        agg.columns = [f"{a}_{b}" for a, b in agg.columns]
        lines += ["", "## Mean and std over seeds", "", agg.round(4).to_markdown()]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers deprecation notes raised inside PEFT
    torch.set_num_threads(args.threads)
    started = time.perf_counter()
    task = load_task(DataConfig(task="rotten_tomatoes", train_size=args.train_size, eval_size=args.eval_size))
    tokenizer = load_tokenizer(args.model)
    probe = load_model(args.model, task.num_labels)
    modules = [m for m in adaptable_modules(probe) if m.type in args.module_types]
    names = [m.name for m in modules]
    torch.manual_seed(0)
    routed_params = attach_routed_adapters(probe, names, args.experts, args.expert_rank, args.top_k,
                                           mode=args.mode).trainable_params()
    per_rank = sum(m.params_per_rank for m in modules)
    lora_rank = max(1, round(routed_params / per_rank))
    lora_params = lora_rank * per_rank
    del probe
    print(f"routed params {routed_params:,}; plain LoRA r={lora_rank}: {lora_params:,}; "
          f"{len(task.train)} train / {len(task.eval)} eval, majority {task.majority_rate():.3f}", flush=True)

    rows = []
    for seed in args.seeds:
        rows += run_seed(args, seed, task, tokenizer, names, lora_rank, lora_params)
    frame = pd.DataFrame(rows).reindex(columns=COLUMNS)
    wall = time.perf_counter() - started
    write_results(out_dir(args), "sparse_adapters", frame, markdown(frame, args, lora_rank, lora_params, routed_params, wall))


if __name__ == "__main__":
    main()
