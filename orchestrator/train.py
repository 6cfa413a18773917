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

from orchestrator.allocation import Allocation, apply_lora
from orchestrator.config import RunConfig
from orchestrator.data import TaskData, make_loader
from orchestrator.models import head_params, load_model, load_tokenizer

TRAIN_STATE = "train_state.pt"


@dataclass(frozen=True)
class TrainJob:
    candidate_id: str
    kind: str  # searched | baseline
    label: str  # the baseline's name, or the screen rank of a searched candidate
    ranks: dict[str, int]
    seed: int

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
        start = time.perf_counter()
        output = model(**batch)
        batch_seconds.append(time.perf_counter() - start)
        losses.append(float(output.loss) * len(batch["labels"]))
        predictions.append(output.logits.argmax(-1).cpu())
        labels.append(batch["labels"].cpu())
    predicted, truth = torch.cat(predictions).numpy(), torch.cat(labels).numpy()
    return {"accuracy": float(np.mean(predicted == truth)),
            "f1": float(f1_score(truth, predicted, average="macro", labels=list(range(num_labels)), zero_division=0)),
            "eval_loss": sum(losses) / len(truth),
            "latency_ms_per_batch": 1000 * float(np.mean(batch_seconds))}


def _linear_warmup_decay(optimizer, total_steps: int, warmup_ratio: float):
    warmup = max(1, int(total_steps * warmup_ratio))
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: min((step + 1) / warmup, max(0.0, (total_steps - step) / max(1, total_steps - warmup))))


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

    base = load_model(cfg.model.name, task.num_labels, seed=job.seed)
    n_head = head_params(base)
    model = apply_lora(base, Allocation.from_ranks(job.ranks))
    peft_model = model
    model = ray.train.torch.prepare_model(model)
    device = ray.train.torch.get_device()
    tokenizer = load_tokenizer(cfg.model.name)
    train_loader = ray.train.torch.prepare_data_loader(
        make_loader(task.train, tokenizer, cfg.model.max_length, t.batch_size, shuffle=True, seed=job.seed))
    eval_loader = make_loader(task.eval, tokenizer, cfg.model.max_length, t.eval_batch_size, shuffle=False)

    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=t.lr, weight_decay=t.weight_decay)
    scheduler = _linear_warmup_decay(optimizer, t.epochs * len(train_loader), t.warmup_ratio)
    start_epoch, elapsed = _restore(ray.train.get_checkpoint(), peft_model, optimizer, scheduler)
    use_bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
    lora_params = sum(p.numel() for n, p in peft_model.named_parameters() if p.requires_grad and "lora_" in n)

    for epoch in range(start_epoch, t.epochs):
        if hasattr(train_loader.sampler, "set_epoch"):
            train_loader.sampler.set_epoch(epoch)
        model.train()
        started, losses = time.perf_counter(), []
        for batch in train_loader:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_bf16):
                loss = model(**batch).loss
            if not math.isfinite(float(loss)):
                raise FloatingPointError(f"non-finite training loss {float(loss)} at epoch {epoch}")
            loss.backward()
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(float(loss))
        elapsed += time.perf_counter() - started
        metrics = evaluate(peft_model, eval_loader, device, task.num_labels)
        metrics.update(epoch=epoch + 1, train_loss=float(np.mean(losses)), train_wall_s=elapsed,
                       peak_memory_mb=_max_over_workers(_peak_memory_mb(device)), trainable_params=lora_params,
                       head_params=n_head, device="gpu" if device.type == "cuda" else "cpu")
        _report_with_checkpoint(metrics, peft_model, optimizer, scheduler, epoch + 1, elapsed)


def _report_with_checkpoint(metrics, peft_model, optimizer, scheduler, epochs_done: int, elapsed: float) -> None:
    import ray.train

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ray.train.get_context().get_world_rank() == 0:
            peft_model.save_pretrained(tmp)  # adapter + head only, as safetensors
            torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                        "epochs_done": epochs_done, "elapsed": elapsed}, Path(tmp) / TRAIN_STATE)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint)


def _restore(checkpoint, peft_model, optimizer, scheduler) -> tuple[int, float]:
    """Continue from the last epoch checkpoint after a worker failure; (0, 0.0) on a fresh start."""
    if checkpoint is None:
        return 0, 0.0
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    with checkpoint.as_directory() as path:
        set_peft_model_state_dict(peft_model, load_file(Path(path) / "adapter_model.safetensors"))
        state = torch.load(Path(path) / TRAIN_STATE, weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    return int(state["epochs_done"]), float(state["elapsed"])


# ---------------------------------------------------------------- the Tune trial around a TorchTrainer


@dataclass
class TrainContext:
    cfg: RunConfig
    task: TaskData
    use_gpu: bool


def train_trial(config: dict, context: TrainContext) -> None:
    """Tune function trainable: fit one TorchTrainer, then keep its adapter and a result file."""
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
        run_config=TrainRunConfig(name=job.job_id, storage_path=str((cfg.run_dir / "train").resolve()),
                                  callbacks=[TuneReportCallback()], failure_config=FailureConfig(max_failures=t.max_failures),
                                  checkpoint_config=CheckpointConfig(num_to_keep=1)),
    )
    result = trainer.fit()
    device_count = t.num_workers * (1 if context.use_gpu else t.cpus_per_worker)
    keep_result(cfg, job, result.metrics, result.checkpoint, device_count)


def adapter_dir(run_dir: Path, job: TrainJob, first_seed: int) -> Path:
    """adapters/<candidate_id>/ for the first seed; adapters/<candidate_id>/seed-<k>/ for the others."""
    base = run_dir / "adapters" / job.candidate_id
    return base if job.seed == first_seed else base / f"seed-{job.seed}"


def keep_result(cfg: RunConfig, job: TrainJob, metrics: dict, checkpoint, device_count: int) -> None:
    target = adapter_dir(cfg.run_dir, job, cfg.train.seeds[0])
    target.mkdir(parents=True, exist_ok=True)
    with checkpoint.as_directory() as path:
        for name in ("adapter_model.safetensors", "adapter_config.json"):
            shutil.copy2(Path(path) / name, target / name)
    device_hours = metrics["train_wall_s"] * device_count / 3600
    row = {**asdict(job), "status": "completed", "adapter_dir": str(target.relative_to(cfg.run_dir)),
           "device_hours": device_hours,
           "cost_usd": device_hours * cfg.cost.price_per_device_hour[metrics["device"]],
           **{k: v for k, v in metrics.items() if k not in ("checkpoint_path",)}}
    from orchestrator.report import write_atomic

    write_atomic(cfg.run_dir / "trials" / f"{job.job_id}.json", lambda p: Path(p).write_text(json.dumps(row, indent=1)))


def finished_jobs(run_dir: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in sorted((run_dir / "trials").glob("*.json"))}


def cluster_has_gpu() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def run_training(cfg: RunConfig, task: TaskData, jobs: list[TrainJob]) -> dict[str, dict]:
    """Train every job not finished yet (a resumed run skips finished ones) and return all results."""
    done = finished_jobs(cfg.run_dir)
    pending = [job for job in jobs if job.job_id not in done]
    if pending:
        use_gpu = cfg.train.use_gpu == "true" or (cfg.train.use_gpu == "auto" and cluster_has_gpu())
        trainable = tune.with_resources(
            tune.with_parameters(train_trial, context=TrainContext(cfg, task, use_gpu)), {"CPU": 0.25})
        tuner = tune.Tuner(
            trainable,
            param_space={"job": tune.grid_search([asdict(job) for job in pending])},
            tune_config=tune.TuneConfig(max_concurrent_trials=cfg.train.max_concurrent),
            run_config=tune.RunConfig(name="train", storage_path=str((cfg.run_dir / "tune").resolve()), verbose=1),
        )
        tuner.fit()
    return finished_jobs(cfg.run_dir)
