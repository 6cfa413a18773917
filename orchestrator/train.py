"""Train: every survivor and baseline, once per seed, as a Ray Train TorchTrainer inside a Tune trial.

Ray 2.60 is Train V2, where `Tuner(trainer)` does not work: each Tune function trainable builds a
`TorchTrainer` and calls `.fit()`, and `TuneReportCallback` forwards the workers' per-epoch
metrics to Tune. Every epoch leaves a checkpoint (adapter safetensors + optimizer state), so a
killed worker resumes from it. A finished model writes `trials/<job>.json`; a resumed run skips it.
"""

from __future__ import annotations

import json
import math
import resource
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import ray
import torch
from ray import tune
from ray.tune.schedulers import ASHAScheduler

from orchestrator.allocation import (Allocation, apply_adalora, apply_lora, attach_allocation_shortcuts,
                                     searchable_units)
from orchestrator.allocators import make_budget, space_modules
from orchestrator.config import RunConfig
from orchestrator.data import TaskData, make_loader
from orchestrator.dynamic import DynamicReallocator, full_rank_allocation
from orchestrator.models import adaptable_modules, head_params, load_model, load_tokenizer
from orchestrator.shortcuts import KINDS, SPECS_FILE as SHORTCUT_SPECS, SUBMODULE as SHORTCUTS_MODULE
from orchestrator.shortcuts import WEIGHTS_FILE as SHORTCUT_WEIGHTS, save_shortcuts

TRAIN_STATE = "train_state.pt"
HISTORY_KEYS = ("epoch", "train_loss", "eval_loss", "accuracy", "f1", "train_wall_s")


@dataclass(frozen=True)
class TrainJob:
    candidate_id: str
    kind: str  # searched | baseline
    label: str  # the baseline's name, or the screen rank of a searched candidate
    ranks: dict[str, int]
    seed: int
    method: str = "lora"  # lora | adalora (the AdaLoRA baseline) | dynamic (re-allocated while training)

    @property
    def job_id(self) -> str:
        return f"{self.candidate_id}-s{self.seed}"


# ---------------------------------------------------------------- inside each Ray Train worker


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def _max_over_workers(value: float) -> float:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = torch.tensor([value], dtype=torch.float64)
        torch.distributed.all_reduce(tensor, op=torch.distributed.ReduceOp.MAX)
        return float(tensor.item())
    return value


@torch.no_grad()
def evaluate(model, loader, device: torch.device, num_labels: int) -> dict:
    """Accuracy, macro-F1, mean loss and inference latency over the whole eval split."""
    from sklearn.metrics import f1_score

    model.eval()
    predictions, labels, losses, batch_seconds = [], [], [], []
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        target = batch.pop("labels")  # loss computed here: AdaLoRA's forward adds a training-only term to it
        start = time.perf_counter()
        logits = model(**batch).logits
        batch_seconds.append(time.perf_counter() - start)
        losses.append(float(torch.nn.functional.cross_entropy(logits.float(), target, reduction="sum")))
        predictions.append(logits.argmax(-1).cpu())
        labels.append(target.cpu())
    predicted, truth = torch.cat(predictions).numpy(), torch.cat(labels).numpy()
    return {"accuracy": float(np.mean(predicted == truth)),
            "f1": float(f1_score(truth, predicted, average="macro", labels=list(range(num_labels)), zero_division=0)),
            "eval_loss": sum(losses) / len(truth),
            "latency_ms_per_batch": 1000 * float(np.mean(batch_seconds))}


def _linear_warmup_decay(optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup))))


@dataclass
class Adapted:
    """The model in training and what rides along: shortcuts, AdaLoRA's pruning, dynamic re-allocation."""

    peft_model: torch.nn.Module
    allocation: Allocation
    units: list  # every module and shortcut site, for exact parameter counts
    shortcuts: object = None  # ShortcutSet
    dynamic: DynamicReallocator | None = None
    adalora: bool = False

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
        if self.dynamic is None:
            return {"trainable_params": self.allocation.trainable_params(self.units)}
        final = self.dynamic.allocation
        return {"trainable_params": final.trainable_params(self.units), "reallocations": self.dynamic.reallocations,
                "moved_rank": self.dynamic.moved_rank, "final_allocation": final.compact(self.units)}


def build_adapted(cfg: RunConfig, job: TrainJob, base, steps_per_epoch: int) -> Adapted:
    allocation = Allocation.from_ranks(job.ranks)
    units = searchable_units(base, adaptable_modules(base), shortcut_kinds=KINDS)
    if job.method == "adalora":
        return Adapted(apply_adalora(base, allocation, cfg.train.epochs * steps_per_epoch), allocation, units, adalora=True)
    if job.method == "dynamic":
        modules = space_modules(adaptable_modules(base), cfg.space)
        peft_model = apply_lora(base, full_rank_allocation(modules, max(cfg.space.ranks)))
        dynamic = DynamicReallocator(
            peft_model, modules, cfg.space.ranks, make_budget(units, cfg.space), allocation,
            interval_steps=round(cfg.train.dynamic_every * steps_per_epoch), allocator=cfg.train.dynamic_allocator,
            sign=1.0 if cfg.screen.direction == "maximize" else -1.0, seed=job.seed)
        return Adapted(peft_model, allocation, units, dynamic=dynamic)
    peft_model = apply_lora(base, allocation)
    return Adapted(peft_model, allocation, units, shortcuts=attach_allocation_shortcuts(peft_model, allocation, job.seed))


def train_loop_per_worker(config: dict) -> None:
    """One model: PEFT LoRA on the base model, AdamW with warm-up + linear decay, eval every epoch."""
    import ray.train
    import ray.train.torch

    cfg: RunConfig = config["cfg"]
    task: TaskData = config["task"]
    job = TrainJob(**config["job"])
    t = cfg.train
    torch.set_num_threads(t.cpus_per_worker)
    torch.manual_seed(job.seed)

    tokenizer = load_tokenizer(cfg.model.name)
    train_loader = ray.train.torch.prepare_data_loader(
        make_loader(task.train, tokenizer, cfg.model.max_length, t.batch_size, shuffle=True, seed=job.seed))
    eval_loader = make_loader(task.eval, tokenizer, cfg.model.max_length, t.eval_batch_size, shuffle=False)
    total_steps = t.epochs * len(train_loader)

    base = load_model(cfg.model.name, task.num_labels, seed=job.seed)
    n_head = head_params(base)
    adapted = build_adapted(cfg, job, base, len(train_loader))
    peft_model = adapted.peft_model
    model = ray.train.torch.prepare_model(peft_model)
    device = ray.train.torch.get_device()

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = _linear_warmup_decay(optimizer, total_steps, t.warmup_ratio)
    start_epoch, elapsed, history = _restore(ray.train.get_checkpoint(), adapted, optimizer, scheduler)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    trained_params = sum(p.numel() for n, p in peft_model.named_parameters()
                         if p.requires_grad and ("lora_" in n or f"{SHORTCUTS_MODULE}." in n))

    for epoch in range(start_epoch, t.epochs):
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        model.train()
        started, losses = time.perf_counter(), []
        for step, batch in enumerate(train_loader, start=epoch * len(train_loader)):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(**batch).loss
            if not math.isfinite(float(loss)):
                raise FloatingPointError(f"non-finite training loss {float(loss)} at epoch {epoch}")
            loss.backward()
            adapted.after_backward()
            optimizer.step()
            scheduler.step()
            adapted.after_step(step, optimizer)
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
        elapsed += time.perf_counter() - started
        metrics = evaluate(peft_model, eval_loader, device, task.num_labels)
        metrics.update(epoch=epoch + 1, train_loss=float(np.mean(losses)), train_wall_s=elapsed,
                       peak_memory_mb=_max_over_workers(_peak_memory_mb(device)),
                       trained_params=trained_params, head_params=n_head, device="gpu" if device.type == "cuda" else "cpu",
                       resumed_from_epoch=start_epoch,  # > 0: this worker group restarted from a checkpoint
                       **adapted.kept())
        history.append({k: metrics[k] for k in HISTORY_KEYS})
        metrics["history"] = json.dumps(history)
        _report_with_checkpoint(metrics, adapted, optimizer, scheduler, epoch + 1, elapsed, history)


def _report_with_checkpoint(metrics, adapted: Adapted, optimizer, scheduler, epochs_done: int, elapsed: float,
                            history: list[dict]) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            adapted.peft_model.save_pretrained(tmp)  # adapter + head only, as safetensors
            if adapted.shortcuts is not None:
                save_shortcuts(adapted.shortcuts, tmp)
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "epochs_done": epochs_done, "elapsed": elapsed, "history": json.dumps(history),
                        "active_ranks": json.dumps(adapted.dynamic.active if adapted.dynamic else {})},
                       Path(tmp) / TRAIN_STATE)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _restore(checkpoint, adapted: Adapted, optimizer, scheduler) -> tuple[int, float, list[dict]]:
    """Continue from the last epoch checkpoint after a failure; (0, 0.0, []) on a fresh start."""
    if checkpoint is None:
        return 0, 0.0, []
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    with checkpoint.as_directory() as path:
        set_peft_model_state_dict(adapted.peft_model, load_file(Path(path) / "adapter_model.safetensors"))
        if adapted.shortcuts is not None:
            adapted.shortcuts.load_weights(path)
        state = torch.load(Path(path) / TRAIN_STATE, weights_only=True)
    if adapted.dynamic is not None:
        adapted.dynamic.active = json.loads(state["active_ranks"])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epochs_done"]), float(state["elapsed"]), json.loads(state["history"])


# ---------------------------------------------------------------- the Tune trial around a TorchTrainer


@dataclass
class TrainContext:
    cfg: RunConfig
    task: TaskData
    use_gpu: bool

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
        train_loop_config={"cfg": cfg, "task": context.task, "job": asdict(job)},
        scaling_config=ScalingConfig(num_workers=t.num_workers, use_gpu=context.use_gpu, resources_per_worker=resources),
        run_config=TrainRunConfig(name=job.job_id, storage_path=str(cfg.run_dir / "train"),
                                  callbacks=[TuneReportCallback()], failure_config=FailureConfig(max_failures=t.max_failures),
                                  checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    result = trainer.fit()
    keep_result(cfg, job, result.metrics, result.checkpoint.path, context.device_count, "completed")


def adapter_dir(run_dir: Path, job: TrainJob, first_seed: int) -> Path:
    """adapters/<candidate_id>/ for the first seed; adapters/<candidate_id>/seed-<k>/ for the others."""
    base = run_dir / "adapters" / job.candidate_id
    return base if job.seed == first_seed else base / f"seed-{job.seed}"


def keep_result(cfg: RunConfig, job: TrainJob, metrics: dict, checkpoint_path: str, device_count: int, status: str) -> None:
    """Copy the adapter out of the checkpoint and write trials/<job>.json (what --resume reads)."""
    from orchestrator.report import write_atomic

    target = adapter_dir(cfg.run_dir, job, cfg.train.seeds[0])
    target.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_model.safetensors", "adapter_config.json", SHORTCUT_WEIGHTS, SHORTCUT_SPECS):
        if (Path(checkpoint_path) / name).is_file():  # shortcut files only when the allocation has shortcuts
            shutil.copy2(Path(checkpoint_path) / name, target / name)
    device_hours = metrics["train_wall_s"] * device_count / 3600
    row = {**asdict(job), **{k: v for k, v in metrics.items() if k not in ("checkpoint_path", "history")},
           "history": json.loads(metrics["history"]), "status": status, "adapter_dir": str(target.relative_to(cfg.run_dir)),
           "device_hours": device_hours, "cost_usd": device_hours * cfg.cost.price_per_device_hour[metrics["device"]]}
    write_atomic(cfg.run_dir / "trials" / f"{job.job_id}.json", lambda p: Path(p).write_text(json.dumps(row, indent=1)))


def keep_failure(cfg: RunConfig, job: TrainJob, error: BaseException) -> None:
    from orchestrator.report import write_atomic

    reason = _root_cause(error)
    row = {**asdict(job), "status": "failed", "error": reason}
    write_atomic(cfg.run_dir / "trials" / f"{job.job_id}.json", lambda p: Path(p).write_text(json.dumps(row, indent=1)))


def _root_cause(error: BaseException) -> str:
    """The innermost error message, one line (Ray wraps worker errors several times)."""
    while getattr(error, "__cause__", None) is not None:
        error = error.__cause__
    lines = [line for line in str(error).strip().splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:500]


def finished_jobs(run_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "trials").glob("*.json"))}


def cluster_has_gpu() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


class BaselineSafeASHA(ASHAScheduler):
    """ASHA on eval accuracy across searched models; baselines always run to the end (they are the yardstick)."""

    def on_trial_result(self, tune_controller, trial, result):
        if trial.config["job"]["kind"] == "baseline":
            return self.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)


def run_training(cfg: RunConfig, task: TaskData, jobs: list[TrainJob]) -> dict[str, dict]:
    """Train every job not finished yet (a resumed run skips finished ones) and return all results."""
    done = finished_jobs(cfg.run_dir)
    pending = {job.job_id: job for job in jobs if job.job_id not in done}
    if pending:
        use_gpu = cfg.train.use_gpu == "true" or (cfg.train.use_gpu == "auto" and cluster_has_gpu())
        context = TrainContext(cfg, task, use_gpu)
        # The trial itself only waits on its TorchTrainer: a quarter CPU, so the workers get the cores.
        trainable = tune.with_resources(tune.with_parameters(train_trial, context=context), {"CPU": 0.25})
        scheduler = None
        if cfg.train.epochs > 1 and cfg.train.early_stopping:
            scheduler = BaselineSafeASHA(time_attr="epoch", metric="accuracy", mode="max", max_t=cfg.train.epochs,
                                         grace_period=1)
        tuner = tune.Tuner(
            trainable,
            param_space={"job": tune.grid_search([asdict(job) for job in pending.values()])},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.train.max_concurrent, scheduler=scheduler),
            run_config=tune.RunConfig(name="train", storage_path=str(cfg.run_dir / "tune"), verbose=1),
        )
        for result in tuner.fit():
            job = TrainJob(**result.config["job"])
            if (cfg.run_dir / "trials" / f"{job.job_id}.json").is_file():
                continue
            if result.error:
                keep_failure(cfg, job, result.error)
            elif result.metrics and result.metrics.get("checkpoint_path"):  # stopped early by ASHA
                keep_result(cfg, job, result.metrics, result.metrics["checkpoint_path"], context.device_count, "stopped")
    return finished_jobs(cfg.run_dir)
