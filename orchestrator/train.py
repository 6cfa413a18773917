"""Train: every survivor and baseline, once per seed, as a Ray Train TorchTrainer inside a Tune trial.

Ray 2.60 is Train V2, where `Tuner(trainer)` does not work: each Tune function trainable builds a
`TorchTrainer` and calls `.fit()`, and `TuneReportCallback` forwards the workers' per-epoch
metrics to Tune. Every epoch leaves a checkpoint (adapter safetensors + optimizer state), so a
killed worker resumes from it. As each model ends, the driver copies its adapter out of the last
checkpoint and writes `trials/<job>.json` (KeepFinished); a resumed run skips it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np
import ray
import torch
from ray import tune
from ray.tune.result import AUTO_RESULT_KEYS
from ray.tune.schedulers import ASHAScheduler

from orchestrator.allocation import (Allocation, apply_adalora, apply_lora, attach_allocation_shortcuts,
                                     load_adalora_state, save_adalora_state, searchable_units)
from orchestrator.allocators import make_budget, space_modules
from orchestrator.config import RunConfig, TrainConfig
from orchestrator.data import TaskData, accuracy_and_macro_f1, make_loader
from orchestrator.dynamic import DynamicReallocator, full_rank_allocation
from orchestrator.errors import Interrupted, UserError
from orchestrator.models import adaptable_modules, head_params, load_model, load_tokenizer
from orchestrator.routing import CONFIG_FILE as ROUTED_CONFIG, WEIGHTS_FILE as ROUTED_WEIGHTS
from orchestrator.routing import (RoutingState, attach_routed_adapters, budget_expert_ranks, load_routed_weights,
                                  measure_inference, save_routed, sync)
from orchestrator.shortcuts import KINDS, SPECS_FILE as SHORTCUT_SPECS, SUBMODULE as SHORTCUTS_MODULE
from orchestrator.shortcuts import WEIGHTS_FILE as SHORTCUT_WEIGHTS, save_shortcuts
from orchestrator.storage import filesystem, run_storage

TRAIN_STATE = "train_state.pt"
HISTORY_KEYS = ("epoch", "train_loss", "eval_loss", "accuracy", "f1", "val_accuracy", "train_wall_s")  # val_: when held out
FAULT_ENV = "LORA_SEARCH_INJECT_FAULT"  # chaos testing only, see fault_plan
FAULTS = ("nan", "oom")
TRIAL_CPUS = 0.25  # a training's Tune trial only waits on its TorchTrainer: the workers get the cores
# Keys of a Tune result that are Tune's bookkeeping, not the model's metrics (left out of trials/<job>.json).
NOT_KEPT = {*AUTO_RESULT_KEYS, "done", "trial_id", "experiment_tag", "should_checkpoint", "checkpoint_path", "history"}


@dataclass(frozen=True)
class TrainJob:
    candidate_id: str
    kind: str  # searched | baseline | routed (a searched allocation as routed LoRA experts)
    label: str  # the baseline's name, or the screen rank of a searched candidate
    ranks: dict[str, int]
    seed: int
    method: str = "lora"  # lora | adalora (the AdaLoRA baseline) | dynamic (re-allocated while training) | routed
    gating: str = ""  # routed: topk (sparse) | dense
    experts: int = 0  # routed: experts per routed module
    lr: float | None = None  # this model's learning rate (train.lr_grid's pick for it); None: train.lr

    @property
    def job_id(self) -> str:
        return f"{self.candidate_id}-s{self.seed}"

    def learning_rate(self, t: TrainConfig) -> float:
        return t.lr if self.lr is None else self.lr


# ---------------------------------------------------------------- inside each Ray Train worker


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _over_workers(value: float, device: torch.device, mean: bool = False) -> float:
    """The max (or the mean) of `value` over the training's workers; one worker's own value without DDP."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = torch.tensor([value], dtype=torch.float64, device=device)  # NCCL reduces CUDA tensors only
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.SUM if mean else torch.distributed.ReduceOp.MAX)
        return float(tensor.item()) / (torch.distributed.get_world_size() if mean else 1)
    return value


def kernels(device: torch.device) -> str:
    """The chip and the kernels a training's floats come from. The same versions, seed and data repeat a training
    bit for bit on one machine; where this string differs, the last bits may too (README "Reproducibility")."""
    if device.type == "cuda":
        return f"cuda {torch.cuda.get_device_name(device)}"
    return f"cpu {cpu_kernels()}, {torch.get_num_threads()} threads"


def cpu_kernels() -> str:
    """The CPU, the ISA of torch's own kernels and MKL's reproducibility mode (its MKL_CBWR setting)."""
    return f"{_cpu_model()}, {torch.backends.cpu.get_cpu_capability()} kernels, MKL_CBWR={os.environ.get('MKL_CBWR', 'auto')}"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


@torch.no_grad()
def evaluate(model, loader, device: torch.device) -> dict:
    """Accuracy, macro-F1, mean loss and inference latency over the whole eval split."""
    model.eval()
    predictions, labels, losses, batch_seconds = [], [], [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        target = batch.pop("labels")  # loss computed here: AdaLoRA's forward adds a training-only term to it
        sync(device)  # CUDA runs asynchronously: time the kernels, not their launch
        start = time.perf_counter()
        logits = model(**batch).logits
        sync(device)
        batch_seconds.append(time.perf_counter() - start)
        losses.append(float(torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")))
        predictions.append(logits.argmax(-1).cpu())
        labels.append(target.cpu())
    predicted, truth = torch.cat(predictions).numpy(), torch.cat(labels).numpy()
    return {**accuracy_and_macro_f1(truth, predicted), "eval_loss": sum(losses) / len(truth),
            "latency_ms_per_batch": 1000 * float(np.mean(batch_seconds))}


def _cap_address_space(headroom_bytes: int) -> None:
    """Chaos fault "oom": the kernel refuses this process more than `headroom_bytes` of new memory."""
    with open("/proc/self/statm") as statm:
        used = int(statm.read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + headroom_bytes, resource.getrlimit(resource.RLIMIT_AS)[1]))


def total_steps(t, steps_per_epoch: int) -> int:
    """Optimizer steps of the whole training: every epoch, or train.max_steps if that comes first."""
    return min(t.epochs * steps_per_epoch, t.max_steps or t.epochs * steps_per_epoch)


def _linear_warmup_decay(optimizer, steps: int, warmup_ratio: float):
    warmup = max(1, int(steps * warmup_ratio))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (steps - step) / max(1, steps - warmup))))


@dataclass
class Adapted:
    """The model in training and what rides along: shortcuts, AdaLoRA's pruning, dynamic re-allocation, routing."""

    peft_model: torch.nn.Module  # a routed model is the base model with RoutedLoRALinear modules, not PEFT
    allocation: Allocation
    units: list  # every module and shortcut site, for exact parameter counts
    shortcuts: object = None  # ShortcutSet
    dynamic: DynamicReallocator | None = None
    adalora: bool = False
    routing: RoutingState | None = None
    aux_weight: float = 0.0

    def with_aux(self, loss: torch.Tensor) -> torch.Tensor:
        """The task loss plus the routers' sparsity term (routed models only)."""
        return loss if self.routing is None else loss + self.routing.aux_loss(self.aux_weight)

    def after_backward(self) -> None:
        if self.dynamic is not None:
            self.dynamic.after_backward()

    def after_step(self, step: int, optimizer) -> None:
        if self.adalora:  # prune ranks on AdaLoRA's schedule: after the step, before zero_grad
            self.peft_model.base_model.update_and_allocate(step)
        if self.dynamic is not None:
            self.dynamic.after_step(step, optimizer)

    def kept(self) -> dict:
        """Parameters the model keeps (AdaLoRA and dynamic models train more than they keep)."""
        if self.routing is not None:  # experts + routers, beside the plain LoRA count of the same allocation
            r = self.routing
            return {"trainable_params": r.trainable_params(), "expert_params": r.expert_params(),
                    "router_params": r.router_params(), "lora_params": self.allocation.trainable_params(self.units),
                    "routed_modules": len(r.modules), "expert_rank_sum": sum(sum(m.expert_ranks) for m in r.modules.values())}
        if self.dynamic is None:
            return {"trainable_params": self.allocation.trainable_params(self.units)}
        final = self.dynamic.allocation
        return {"trainable_params": final.trainable_params(self.units), "reallocations": self.dynamic.reallocations,
                "held_reallocations": self.dynamic.held,
                "moved_rank": self.dynamic.moved_rank, "final_allocation": final.compact(self.units)}

    def inference_metrics(self, loader, device: torch.device) -> dict:
        """Forward latency per batch (mean, p95; wall clock and this process's CPU time, which other load on a
        shared machine distorts far less), peak inference memory and, when routed, the routing statistics."""
        measured = measure_inference(self.peft_model, loader, device, state=self.routing)
        metrics = {k: measured[k] for k in ("latency_ms_mean", "latency_ms_p95", "latency_cpu_ms_mean", "latency_cpu_ms_p95",
                                            "peak_infer_mem_mb", "peak_infer_mem_method")}
        if self.routing is not None:
            stats = self.routing.stats()
            metrics |= {k: stats[k] for k in ("fraction_active", "router_entropy", "usage_entropy")}
        return metrics

    def save(self, path: str) -> None:
        """Weights as safetensors: the PEFT adapter + head (or routed experts, routers + head) and any shortcuts."""
        if self.routing is not None:
            save_routed(self.peft_model, self.routing, path)
        else:
            self.peft_model.save_pretrained(path)
        if self.adalora:  # beside PEFT's adapter, cut to the pruned ranks: the untrimmed state a restart resumes from
            save_adalora_state(self.peft_model, path)
        if self.shortcuts is not None:
            save_shortcuts(self.shortcuts, path)

    def load(self, path: str) -> None:
        from peft import set_peft_model_state_dict
        from safetensors.torch import load_file

        if self.routing is not None:
            load_routed_weights(self.peft_model, self.routing, path)
        elif self.adalora:
            load_adalora_state(self.peft_model, path)
        else:
            set_peft_model_state_dict(self.peft_model, load_file(Path(path) / "adapter_model.safetensors"))
        if self.shortcuts is not None:
            self.shortcuts.load_weights(path)


def build_adapted(cfg: RunConfig, job: TrainJob, base, steps_per_epoch: int) -> Adapted:
    allocation = Allocation.from_ranks(job.ranks)
    # shortcut sites only where something may use them: an encoder without BERT's layer blocks has none
    kinds = KINDS if allocation.shortcuts or cfg.space.shortcuts else ()
    units = searchable_units(base, adaptable_modules(base), shortcut_kinds=kinds)
    if job.method == "adalora":
        return Adapted(apply_adalora(base, allocation, total_steps(cfg.train, steps_per_epoch)), allocation, units, adalora=True)
    if job.method == "dynamic":
        modules = space_modules(adaptable_modules(base), cfg.space)
        peft_model = apply_lora(base, full_rank_allocation(modules, max(cfg.space.ranks)))
        dynamic = DynamicReallocator(
            peft_model, modules, cfg.space.ranks, make_budget(units, cfg.space), allocation,
            interval_steps=round(cfg.train.dynamic_every * steps_per_epoch), epoch_steps=steps_per_epoch,
            total_steps=total_steps(cfg.train, steps_per_epoch), allocator=cfg.train.dynamic_allocator,
            sign=1.0 if cfg.screen.direction == "maximize" else -1.0, seed=job.seed,
            max_move=cfg.train.dynamic_max_move, min_gain=cfg.train.dynamic_min_gain)
        return Adapted(peft_model, allocation, units, dynamic=dynamic)
    if job.method == "routed":  # experts at the allocation's modules, at (at most) its LoRA parameter count
        r = cfg.routing
        sites = budget_expert_ranks(base, allocation.as_dict(), job.experts, r.mode)
        state = attach_routed_adapters(base, list(sites), job.experts, sites, r.top_k, r.mode, job.gating,
                                       r.aux if job.gating == "topk" else "none", r.renormalize)
        return Adapted(base, allocation, units, routing=state, aux_weight=r.aux_weight)
    peft_model = apply_lora(base, allocation)
    return Adapted(peft_model, allocation, units, shortcuts=attach_allocation_shortcuts(peft_model, allocation, job.seed))


def train_loop_per_worker(config: dict) -> None:
    """One model: PEFT LoRA on the base model, AdamW with warm-up + linear decay, eval every epoch."""
    import ray.train
    import ray.train.torch

    cfg: RunConfig = config["cfg"]
    task: TaskData = config["task"]
    job = TrainJob(**config["job"])
    fault = config.get("fault")  # chaos testing only (fault_plan): None in real runs
    t = cfg.train
    torch.set_num_threads(t.cpus_per_worker)
    torch.manual_seed(job.seed)

    tokenizer = load_tokenizer(cfg.model.name)
    micro_batch = t.batch_size // (t.num_workers * t.grad_accum_steps)  # batch_size is the global batch per step
    train_loader = ray.train.torch.prepare_data_loader(
        make_loader(task.train, tokenizer, cfg.model.max_length, micro_batch, shuffle=True, seed=job.seed,
                    sampler=distributed_sampler(len(task.train), job.seed)))
    eval_loader = make_loader(task.eval, tokenizer, cfg.model.max_length, t.eval_batch_size, shuffle=False)
    validation_loader = None if task.validation is None else make_loader(
        task.validation, tokenizer, cfg.model.max_length, t.eval_batch_size, shuffle=False)
    steps_per_epoch = math.ceil(len(train_loader) / t.grad_accum_steps)  # optimizer steps
    steps = total_steps(t, steps_per_epoch)

    base = load_model(cfg.model.name, task.num_labels, seed=job.seed, dropout=cfg.model.dropout)
    n_head = head_params(base)
    adapted = build_adapted(cfg, job, base, steps_per_epoch)
    peft_model = adapted.peft_model
    model = ray.train.torch.prepare_model(peft_model)
    device = ray.train.torch.get_device()

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=job.learning_rate(t), weight_decay=t.weight_decay)
    scheduler = _linear_warmup_decay(optimizer, steps, t.warmup_ratio)
    start_epoch, elapsed, history = _restore(ray.train.get_checkpoint(), adapted, optimizer, scheduler)
    use_bf16 = trains_in_bf16(device)
    kernel_setup = kernels(device)  # fixed for the training: read once, not every epoch
    trained_params = adapted.routing.trainable_params() if adapted.routing else sum(
        p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and ("lora_" in n or f"{SHORTCUTS_MODULE}." in n))
    if fault == "oom":
        _cap_address_space(32 * 2**20)  # the first training step needs more: it fails as a real OOM does

    epochs = math.ceil(steps / steps_per_epoch)
    peak_mb = 0.0  # this process's, over its epochs so far
    for epoch in range(start_epoch, epochs):
        seed_epoch(train_loader, job.seed, epoch)
        model.train()
        started, losses = time.perf_counter(), []
        groups = accumulation_groups(train_loader, t.grad_accum_steps)
        for step, group in zip(range(epoch * steps_per_epoch, min((epoch + 1) * steps_per_epoch, steps)), groups):
            losses += optimizer_step(model, adapted, group, optimizer, scheduler, step, use_bf16, fault=fault)
        elapsed += time.perf_counter() - started
        metrics = epoch_metrics(adapted, eval_loader, validation_loader, device,
                                measure_inference=cfg.routing.enabled, peak_before=peak_mb)
        peak_mb = metrics["peak_memory_mb"]
        metrics.update(epoch=epoch + 1, epochs_planned=epochs, train_wall_s=elapsed,
                       train_loss=_over_workers(float(np.mean(losses)), device, mean=True),  # each worker's shard
                       trained_params=trained_params, head_params=n_head, device="gpu" if device.type == "cuda" else "cpu",
                       kernels=kernel_setup,
                       resumed_from_epoch=start_epoch,  # > 0: this worker group restarted from a checkpoint
                       **adapted.kept())
        history.append({k: metrics[k] for k in HISTORY_KEYS if k in metrics})
        metrics["history"] = json.dumps(history)
        _report_with_checkpoint(metrics, adapted, optimizer, scheduler, epoch + 1, elapsed, history)


def epoch_metrics(adapted: Adapted, eval_loader, validation_loader, device: torch.device,
                  measure_inference: bool, peak_before: float = 0.0) -> dict:
    """End of an epoch: eval (and validation) metrics, the peak memory of the training so far (at least `peak_before`,
    the earlier epochs') and, with `measure_inference` (routing runs: plain and routed alike, for the comparison), a
    second, measured inference pass."""
    metrics = evaluate(adapted.peft_model, eval_loader, device)
    if validation_loader is not None:
        validation = evaluate(adapted.peft_model, validation_loader, device)
        metrics.update(val_accuracy=validation["accuracy"], val_f1=validation["f1"])
    # Read before inference_metrics: its measurement resets the process's peak (VmHWM and ru_maxrss on CPU, CUDA's
    # max allocated), so from then on the process only knows the peak since the last epoch: the max keeps the earlier.
    metrics["peak_memory_mb"] = max(peak_before, _over_workers(_peak_memory_mb(device), device))
    if measure_inference:
        metrics.update(adapted.inference_metrics(eval_loader, device))
    return metrics


def accumulation_groups(loader, size: int):
    """One pass over `loader` in groups of `size` micro-batches (the last group may be shorter).

    Ray Train's prepared loader restarts its epoch whenever iter() is called on it, and islice or zip
    call iter() each time: slicing the loader itself would hand every step the same first batches.
    """
    batches = (batch for batch in loader)  # a generator: iter() on it does not restart the loader
    while group := list(islice(batches, size)):
        yield group


def trains_in_bf16(device: torch.device) -> bool:
    """bf16 autocast on GPUs with bf16 kernels (Ampere, sm_80, and later). Older ones (T4, V100) only emulate it,
    slowly, though torch.cuda.is_bf16_supported() says yes by default: they train in fp32."""
    return device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False)


def optimizer_step(model, adapted: Adapted, group: list[dict], optimizer, scheduler, step: int, use_bf16: bool,
                   fault: str | None = None) -> list[float]:
    """One optimizer step over a group of micro-batches (gradient accumulation); their losses.

    Each micro-batch's (mean) loss is weighted by its share of the group's examples, so the summed gradient is
    that of the mean loss over the whole group, also when the epoch's last micro-batches are uneven: the step
    equals one on the concatenated batch (tested).
    """
    device = next(model.parameters()).device
    losses = []
    examples = [len(batch["labels"]) for batch in group]
    for i, batch in enumerate(group):
        with _no_sync_unless(i == len(group) - 1, model):  # DDP all-reduces the sum on the last one only
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = adapted.with_aux(model(**batch).loss)
            if fault == "nan":
                loss = loss * float("nan")
            value = float(loss.detach())
            if not math.isfinite(value):
                raise FloatingPointError(f"non-finite training loss {value} at step {step}")
            (loss * examples[i] / sum(examples)).backward()
        losses.append(value)
    adapted.after_backward()
    optimizer.step()
    adapted.after_step(step, optimizer)  # at the rate this step used
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return losses


def _no_sync_unless(sync: bool, model):
    """DDP's no_sync() for the micro-batches before the last of an accumulation group; a no-op otherwise."""
    return contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()


def _report_with_checkpoint(metrics, adapted: Adapted, optimizer, scheduler, epochs_done: int, elapsed: float,
                            history: list[dict]) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            save_checkpoint(tmp, adapted, optimizer, scheduler, epochs_done, elapsed, history)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def save_checkpoint(folder: str, adapted: Adapted, optimizer, scheduler, epochs_done: int, elapsed: float,
                    history: list[dict]) -> None:
    """What _restore needs to go on after `epochs_done` epochs: the adapter, AdamW, the schedule and the counters."""
    adapted.save(folder)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "epochs_done": epochs_done, "elapsed": elapsed, "history": json.dumps(history),
                "dynamic": json.dumps(adapted.dynamic.state() if adapted.dynamic else {})}, Path(folder) / TRAIN_STATE)


def distributed_sampler(examples: int, seed: int):
    """With several workers, each one's share of an order that the training seed fixes (Ray's own sampler is seeded 0
    whatever the seed, so every seed would see one order); None with one worker (the loader shuffles)."""
    from torch.utils.data import DistributedSampler

    context = ray.train.get_context()
    if context.get_world_size() == 1:
        return None
    # DistributedSampler seeds epoch e with seed + e: spread apart, seed s's epoch 1 is not seed s+1's epoch 0
    return DistributedSampler(range(examples), num_replicas=context.get_world_size(), rank=context.get_world_rank(),
                              shuffle=True, seed=_spread_seed(seed))


def seed_epoch(loader, seed: int, epoch: int) -> None:
    """Each epoch's data order and dropout masks from (seed, epoch) alone, so a worker restarted at epoch k replays
    epoch k exactly (a generator left running from epoch 0 restarts at epoch 0's draws). Epoch 0 keeps the seed
    itself, as before; before 2026-12-07 dropout went on from epoch 0's state, which a restart could not repeat."""
    if epoch > 0:
        torch.manual_seed(_spread_seed(seed, epoch))
    if hasattr(loader.sampler, "set_epoch"):  # several workers: the DistributedSampler above
        loader.sampler.set_epoch(epoch)
    else:
        loader.generator.manual_seed(seed if epoch == 0 else _spread_seed(seed, epoch))


def _spread_seed(*key: int) -> int:
    """A 32-bit seed (torch's CPU generator keeps 32 bits) spread from the key: distinct keys give distinct orders."""
    return int(np.random.SeedSequence(list(key)).generate_state(1)[0])


def _restore(checkpoint, adapted: Adapted, optimizer, scheduler) -> tuple[int, float, list[dict]]:
    """Continue from the last epoch checkpoint after a failure; (0, 0.0, []) on a fresh start."""
    if checkpoint is None:
        return 0, 0.0, []
    with checkpoint.as_directory() as path:
        adapted.load(path)
        state = torch.load(Path(path) / TRAIN_STATE, weights_only=True)
    if adapted.dynamic is not None:
        adapted.dynamic.load_state(json.loads(state["dynamic"]))
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epochs_done"]), float(state["elapsed"]), json.loads(state["history"])


# ---------------------------------------------------------------- the Tune trial around a TorchTrainer


@dataclass
class TrainContext:
    cfg: RunConfig
    task: TaskData
    use_gpu: bool
    faults: dict[str, str] = field(default_factory=dict)  # job id -> injected fault (fault_plan)

    @property
    def device_count(self) -> int:
        """Devices one model holds: GPUs on GPU, vCPUs on CPU (what the price table charges for)."""
        t = self.cfg.train
        return t.num_workers * (1 if self.use_gpu else t.cpus_per_worker)


def train_trial(config: dict, context: TrainContext) -> None:
    """Tune function trainable: fit one TorchTrainer, then keep its adapter and a result file.

    The TorchTrainer's run name is the job id under the run's storage path, so a re-launched job
    (after `--resume`) restores from its last epoch checkpoint instead of starting over.
    """
    from ray.train import CheckpointConfig, FailureConfig, RunConfig as TrainRunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer
    from ray.tune.integration.ray_train import TuneReportCallback

    cfg, job = context.cfg, TrainJob(**config["job"])
    t = cfg.train
    resources = {"CPU": t.cpus_per_worker} | ({"GPU": 1} if context.use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "task": context.task, "job": asdict(job), "fault": context.faults.get(job.job_id)},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=context.use_gpu, resources_per_worker=resources),
        run_config=TrainRunConfig(name=job.job_id, storage_path=run_storage(cfg.storage_path, cfg.run_dir, "train"),
                                  callbacks=[TuneReportCallback()], failure_config=FailureConfig(max_failures=t.max_failures),
                                  checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    result = trainer.fit()
    # The final metrics once more: a model restored with all its epochs done (a resumed run whose driver died
    # before keeping it) reports nothing else. The driver keeps what it heard last (KeepFinished).
    tune.report({**result.metrics, "checkpoint_path": result.checkpoint.path})


def adapter_dir(run_dir: Path, job: TrainJob, first_seed: int) -> Path:
    """adapters/<candidate_id>/ for the first seed; adapters/<candidate_id>/seed-<k>/ for the others."""
    base = run_dir / "adapters" / job.candidate_id
    return base if job.seed == first_seed else base / f"seed-{job.seed}"


def keep_result(cfg: RunConfig, job: TrainJob, metrics: dict, device_count: int) -> None:
    """Copy the adapter out of the last checkpoint (local or in storage_path) and write trials/<job>.json.

    `completed` when the model trained every planned epoch, `stopped` when ASHA ended it earlier.
    """
    from ray.train import Checkpoint

    from orchestrator.report import write_atomic

    target = adapter_dir(cfg.run_dir, job, cfg.train.seeds[0])
    target.mkdir(parents=True, exist_ok=True)
    fs, _ = filesystem(run_storage(cfg.storage_path, cfg.run_dir, "train"))
    with Checkpoint(metrics["checkpoint_path"], filesystem=fs).as_directory() as checkpoint:
        for name in ("adapter_model.safetensors", "adapter_config.json", SHORTCUT_WEIGHTS, SHORTCUT_SPECS, ROUTED_WEIGHTS,
                     ROUTED_CONFIG):
            if (Path(checkpoint) / name).is_file():  # only the files this model has
                shutil.copy2(Path(checkpoint) / name, target / name)
    status = "completed" if metrics["epoch"] >= metrics["epochs_planned"] else "stopped"
    row = {**asdict(job), "lr": job.learning_rate(cfg.train), **{k: v for k, v in metrics.items() if k not in NOT_KEPT},
           "history": json.loads(metrics["history"]), "status": status, "adapter_dir": str(target.relative_to(cfg.run_dir)),
           **_charge(cfg, metrics["train_wall_s"], device_count, metrics["device"])}
    write_atomic(cfg.run_dir / "trials" / f"{job.job_id}.json", lambda p: Path(p).write_text(json.dumps(row, indent=1)))


def keep_failure(cfg: RunConfig, job: TrainJob, error: BaseException, wall_s: float = 0.0, device_count: int = 1,
                 device: str = "cpu") -> None:
    """Write trials/<job>.json as `failed`, charged as keep_result charges a finished model: `wall_s` is the training
    time of the epochs it finished (the part of an epoch it lost is not charged, nor is a finished model's). The
    charge is also kept in trials/failed/, which deleting the trial file to retry the model leaves in place."""
    from orchestrator.report import FAILED_CHARGES, write_atomic

    cost = {"train_wall_s": wall_s, "device": device, **_charge(cfg, wall_s, device_count, device)}
    row = {**asdict(job), "status": "failed", "error": _root_cause(error), **cost}
    ledger = cfg.run_dir / "trials" / FAILED_CHARGES
    ledger.mkdir(parents=True, exist_ok=True)
    attempt = len(list(ledger.glob(f"{job.job_id}.*.json")))
    write_atomic(ledger / f"{job.job_id}.{attempt}.json",
                 lambda p: Path(p).write_text(json.dumps({"job_id": job.job_id, **cost}, indent=1)))
    write_atomic(cfg.run_dir / "trials" / f"{job.job_id}.json", lambda p: Path(p).write_text(json.dumps(row, indent=1)))


def _charge(cfg: RunConfig, wall_s: float, device_count: int, device: str) -> dict:
    """device_hours (training seconds × devices held) and cost_usd at the configured price per device-hour."""
    device_hours = wall_s * device_count / 3600
    return {"device_hours": device_hours, "cost_usd": device_hours * cfg.cost.price_per_device_hour[device]}


def finished_epochs_s(metrics: dict | None) -> float:
    """The training seconds of the epochs a job finished: its last report's cumulative time (none: no epoch)."""
    return float((metrics or {}).get("train_wall_s", 0.0))


def _root_cause(error: BaseException) -> str:
    """The innermost error message, one line (Ray wraps worker errors several times)."""
    while getattr(error, "__cause__", None) is not None:
        error = error.__cause__
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    last = lines[-1].strip() if lines else ""
    name = last.partition(": ")[0]
    if name.isidentifier() and name.endswith(("Error", "Exception")):  # the worker's own error under Ray's wrapper
        return last[:500]
    return f"{type(error).__name__}: {last}"[:500]


def fault_plan() -> dict[str, str]:
    """Chaos-testing hook: LORA_SEARCH_INJECT_FAULT="nan:<job_id>,oom:<job_id>" as {job_id: fault}.

    Never set it in real runs. "nan" makes that model's loss NaN from its first step; "oom" caps its
    worker's address space so its first step cannot allocate. Read on the driver and shipped in the
    trainer's config, so it reaches the workers on any cluster.
    """
    plan = {}
    for item in filter(None, (part.strip() for part in os.environ.get(FAULT_ENV, "").split(","))):
        fault, _, job_id = item.partition(":")
        if fault not in FAULTS or not job_id:
            raise UserError(f"{FAULT_ENV}: '{item}' is not <fault>:<job_id>; write e.g. nan:a10cc48360b-s0 "
                            f"with a fault from {list(FAULTS)}")
        plan[job_id] = fault
    return plan


def finished_jobs(run_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "trials").glob("*.json"))}


def cluster_gpus() -> float:
    return ray.cluster_resources().get("GPU", 0)


def trains_on_gpu(t: TrainConfig, gpus: float) -> bool:
    return t.use_gpu == "true" or (t.use_gpu == "auto" and gpus > 0)


def check_trainings_fit(t: TrainConfig, embedded: bool) -> None:
    """Refuse a training that the embedded local cluster can never hold: Ray Train would retry its worker-group
    start every minute, for ever, without a word. A remote cluster may add nodes for it: there the request waits."""
    if not embedded:
        return
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0), have.get("GPU", 0)
    if t.use_gpu == "true" and not gpus:
        raise UserError("train.use_gpu: 'true', but Ray sees no GPU on this machine; use train.use_gpu=auto (CPU here)")
    if trains_on_gpu(t, gpus) and t.num_workers > gpus:
        raise UserError(f"train.num_workers: {t.num_workers} workers need a GPU each and this machine has {gpus:g}; "
                        f"use train.num_workers={int(gpus)} or fewer")
    if t.num_workers * t.cpus_per_worker + TRIAL_CPUS > cpus:
        raise UserError(f"train.num_workers × train.cpus_per_worker: {t.num_workers} × {t.cpus_per_worker} CPUs (and "
                        f"{TRIAL_CPUS} for the Tune trial) is more than Ray's {cpus:g} CPUs on this machine; lower either")


def alive_nodes() -> int:
    return sum(node["Alive"] for node in ray.nodes())


def concurrent_trainings(t: TrainConfig, use_gpu: bool, cluster_gpus: float, nodes: int) -> int:
    """train.max_concurrent, capped on a single GPU node at the trainings its GPUs hold at once: a training that
    waits for a busy GPU fails Ray Train's 60 s worker-group start and is retried, minute after minute. A cluster
    of several nodes, or with no GPU yet, may be autoscaled: there the waiting request is what adds a GPU node."""
    if not use_gpu or nodes > 1 or cluster_gpus == 0:
        return t.max_concurrent
    return max(1, min(t.max_concurrent, int(cluster_gpus) // t.num_workers))


class KeepFinished(tune.Callback):
    """On the driver, as each model ends (trained through or stopped by ASHA): keep its adapter and result row.

    The driver alone writes the run directory, so only storage_path has to be shared between nodes.
    """

    def __init__(self, cfg: RunConfig, device_count: int):
        self.cfg, self.device_count = cfg, device_count

    def on_trial_complete(self, iteration, trials, trial, **info):
        if trial.last_result.get("checkpoint_path"):  # a model that failed before its first epoch has none
            keep_result(self.cfg, TrainJob(**trial.config["job"]), trial.last_result, self.device_count)


def selection_metric(task: TaskData) -> str:
    """What picks models: validation accuracy where data.validation_size holds some out, else eval accuracy."""
    return "accuracy" if task.validation is None else "val_accuracy"


class BaselineSafeASHA(ASHAScheduler):
    """ASHA on selection_metric across searched models; baselines always run to the end (they are the yardstick)."""

    def on_trial_result(self, tune_controller, trial, result):
        if trial.config["job"]["kind"] == "baseline":
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def run_training(cfg: RunConfig, task: TaskData, jobs: list[TrainJob]) -> dict[str, dict]:
    """Train every job not finished yet (a resumed run skips finished ones) and return all results."""
    done = finished_jobs(cfg.run_dir)
    pending = {job.job_id: job for job in jobs if job.job_id not in done}
    if pending:
        gpus = cluster_gpus()
        use_gpu = trains_on_gpu(cfg.train, gpus)
        context = TrainContext(cfg, task, use_gpu, fault_plan())
        trainable = tune.with_resources(tune.with_parameters(train_trial, context=context), {"CPU": TRIAL_CPUS})
        scheduler = None
        if cfg.train.epochs > 1 and cfg.train.early_stopping:
            scheduler = BaselineSafeASHA(time_attr="epoch", metric=selection_metric(task), mode="max", max_t=cfg.train.epochs,
                                         grace_period=1)
        tuner = tune.Tuner(
            trainable,
            param_space={"job": tune.grid_search([asdict(job) for job in pending.values()])},
            # A trial only waits on its TorchTrainer: reusing its process for the next job saves a process start
            # and its imports (~7 CPU-s on 2 cores, measured with a /proc sampler) per training.
            tune_config=tune.TuneConfig(scheduler=scheduler, reuse_actors=True, max_concurrent_trials=concurrent_trainings(
                cfg.train, use_gpu, gpus, alive_nodes())),
            run_config=tune.RunConfig(name="train", storage_path=run_storage(cfg.storage_path, cfg.run_dir, "tune"),
                                      callbacks=[KeepFinished(cfg, context.device_count)], verbose=1),
        )
        for result in tuner.fit():
            job = TrainJob(**result.config["job"])
            if result.error and not (cfg.run_dir / "trials" / f"{job.job_id}.json").is_file():
                # result.metrics: the trial's last report, as Tune's ResultGrid gives it for a failed trial too
                keep_failure(cfg, job, result.error, finished_epochs_s(result.metrics), context.device_count,
                             "gpu" if use_gpu else "cpu")
        check_trainings_ended(cfg.run_dir, pending)
    return finished_jobs(cfg.run_dir)


def check_trainings_ended(run_dir: Path, pending: dict[str, TrainJob]) -> None:
    """Tune's fit() returns on Ctrl-C (SIGINT): a job it left has neither a result nor a failure. Stop the run there,
    or it would report (and register from) the models that happened to finish."""
    unfinished = [job_id for job_id in pending if not (run_dir / "trials" / f"{job_id}.json").is_file()]
    if unfinished:
        raise Interrupted(f"training stopped with {len(unfinished)} of {len(pending)} model(s) unfinished "
                          f"({', '.join(unfinished[:3])}{', …' if len(unfinished) > 3 else ''}); nothing was reported")
