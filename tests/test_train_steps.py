"""The training step: gradient accumulation equals one step on the whole batch; the uniform baselines train every
adapter they place; step counts and max_steps."""

import contextlib
import copy
import math
import re
import resource

import pytest
import torch

from orchestrator.allocation import Allocation, apply_lora
from orchestrator.allocators import Budget, baseline_allocations
from orchestrator.config import TrainConfig, load_config
from orchestrator.data import make_loader
from orchestrator.errors import UserError
from orchestrator.models import adaptable_modules, load_model, load_tokenizer
from orchestrator.train import (Adapted, TrainJob, _linear_warmup_decay, _over_workers, accumulation_groups, kernels,
                                build_adapted, concurrent_trainings, epoch_metrics, optimizer_step, total_steps)


def _adapted(tiny_model_dir):
    base = load_model(str(tiny_model_dir), 2, seed=0)
    modules = adaptable_modules(base)
    allocation = Allocation.from_ranks({m.name: 2 for m in modules if m.type in ("query", "value")})
    model = apply_lora(base, allocation).eval()  # no dropout: the two paths must see the same function
    return Adapted(model, allocation, modules)


def _first_batch(tiny_model_dir, tiny_split):
    return next(iter(make_loader(tiny_split, load_tokenizer(str(tiny_model_dir)), 32, 8, shuffle=False)))


def _step(adapted, batches):
    trainable = [p for p in adapted.peft_model.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(trainable, lr=0.5)  # plain SGD: the update is the gradient itself
    scheduler = _linear_warmup_decay(optimizer, 10, 0.0)
    losses = optimizer_step(adapted.peft_model, adapted, batches, optimizer, scheduler, 0, use_bf16=False)
    return losses, {n: p.detach().clone() for n, p in adapted.peft_model.named_parameters() if p.requires_grad}


def test_accumulated_step_equals_one_step_on_the_whole_batch(tiny_model_dir, tiny_split):
    whole = _first_batch(tiny_model_dir, tiny_split)
    halves = [{k: v[:4] for k, v in whole.items()}, {k: v[4:] for k, v in whole.items()}]
    # equal-length micro-batches (padding to the same width), so the mean of means is the mean
    losses_one, after_one = _step(_adapted(tiny_model_dir), [whole])
    losses_two, after_two = _step(_adapted(tiny_model_dir), halves)
    assert len(losses_one) == 1 and len(losses_two) == 2
    assert sum(losses_two) / 2 == pytest.approx(losses_one[0], rel=1e-5)
    initial = {n: p for n, p in _adapted(tiny_model_dir).peft_model.named_parameters() if p.requires_grad}
    assert any(not torch.equal(after_one[n], initial[n]) for n in initial)  # the step did update the adapter
    for name in after_one:
        torch.testing.assert_close(after_two[name], after_one[name], rtol=1e-5, atol=1e-6)


def test_uneven_micro_batches_weigh_by_their_examples(tiny_model_dir, tiny_split):
    """An epoch's last group can be uneven (14 examples in micro-batches of 4: ..., [4, 2]): 6 then 2 rows here."""
    whole = _first_batch(tiny_model_dir, tiny_split)
    parts = [{k: v[:6] for k, v in whole.items()}, {k: v[6:] for k, v in whole.items()}]
    _, after_one = _step(_adapted(tiny_model_dir), [whole])
    _, after_two = _step(_adapted(tiny_model_dir), parts)
    for name in after_one:
        torch.testing.assert_close(after_two[name], after_one[name], rtol=1e-5, atol=1e-6)


def test_non_finite_loss_stops_before_any_update(tiny_model_dir, tiny_split):
    adapted = _adapted(tiny_model_dir)
    before = {n: p.detach().clone() for n, p in adapted.peft_model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.SGD([p for p in adapted.peft_model.parameters() if p.requires_grad], lr=0.5)
    with pytest.raises(FloatingPointError, match="non-finite training loss nan at step 3"):
        optimizer_step(adapted.peft_model, adapted, [_first_batch(tiny_model_dir, tiny_split)], optimizer,
                       _linear_warmup_decay(optimizer, 10, 0.0), 3, use_bf16=False, fault="nan")
    for name, param in adapted.peft_model.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, before[name]), name


@pytest.mark.parametrize("baseline, types", [
    ("uniform_qv", {"query", "value"}),
    ("uniform_all", {"query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"}),
])
def test_uniform_baseline_trains_every_module_it_places(baseline, types, tiny_model_dir, tiny_split, tmp_path):
    """The baselines take the plain LoRA path of `build_adapted`: one step moves the B of every adapter they place."""
    base = load_model(str(tiny_model_dir), 2, seed=0)
    modules = adaptable_modules(base)
    allocation = baseline_allocations(modules, Budget(2048, 0.05), [baseline])[baseline]
    assert {m.type for m in modules if m.name in allocation.as_dict()} == types
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"results_dir={tmp_path}", "name=unit"])
    adapted = build_adapted(cfg, TrainJob(baseline, "baseline", baseline, allocation.as_dict(), 0), base, steps_per_epoch=4)
    lora = {n: p for n, p in adapted.peft_model.named_parameters() if p.requires_grad and "lora_" in n}
    assert sum(p.numel() for p in lora.values()) == adapted.kept()["trainable_params"]
    assert {n.split(".lora_")[0].removeprefix("base_model.model.") for n in lora} == set(allocation.as_dict())
    before = {n: p.detach().clone() for n, p in lora.items()}
    losses, after = _step(adapted, [_first_batch(tiny_model_dir, tiny_split)])
    assert all(map(math.isfinite, losses))
    # B starts at 0 and its gradient is (A x)ᵀ·∂L/∂out: every B moving means every adapter is in the graph
    assert [n for n in lora if "lora_B" in n and torch.equal(after[n], before[n])] == []


def test_total_steps_and_max_steps():
    assert total_steps(TrainConfig(epochs=3), 10) == 30
    assert total_steps(TrainConfig(epochs=3, max_steps=25), 10) == 25
    assert total_steps(TrainConfig(epochs=1, max_steps=25), 10) == 10  # epochs come first when shorter


def test_learning_rate_warms_up_linearly_then_decays_to_zero():
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)  # the lr is the multiplier itself
    scheduler = _linear_warmup_decay(optimizer, steps=10, warmup_ratio=0.2)  # 2 warm-up steps, then 8 of decay
    lrs = []
    for _ in range(10):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx([0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125])
    assert optimizer.param_groups[0]["lr"] == 0.0  # where the schedule ends


def test_a_kept_training_is_charged_for_every_device_it_held(tmp_path):
    """device_hours = train_wall_s × devices / 3600, cost_usd = device_hours × the price of the device kind it trained
    on. The integration runs train on one vCPU each: only this test tells the device count apart."""
    import json

    from orchestrator.train import keep_result

    cfg = load_config(None, [f"results_dir={tmp_path}", "cost.price_per_device_hour.gpu=2.5"])
    checkpoint = tmp_path / "checkpoint"
    checkpoint.mkdir()
    job = TrainJob("c1", "searched", "screen#1", {"L0.query": 8}, seed=cfg.train.seeds[0])
    keep_result(cfg, job, {"checkpoint_path": str(checkpoint), "train_wall_s": 900.0, "epoch": 1, "epochs_planned": 1,
                           "history": "[]", "device": "gpu"}, device_count=4)
    kept = json.loads((cfg.run_dir / "trials" / f"{job.job_id}.json").read_text())
    assert kept["device_hours"] == 1.0 and kept["cost_usd"] == 2.5  # 900 s on 4 GPUs at $2.5 per GPU-hour


def test_a_failed_training_is_charged_for_the_epochs_it_finished(tmp_path):
    """A failed training is charged as keep_result charges a finished one: the training time of its finished epochs
    (its Tune result's last report; none finished: 0). The charge is also kept in trials/failed/, once per failure, so
    deleting the trial file to retry the model keeps what the failure cost. Before, a failure had no cost."""
    import json

    from orchestrator import report, train

    cfg = load_config(None, [f"results_dir={tmp_path}", "cost.price_per_device_hour.gpu=2.5"])
    job = TrainJob("c1", "searched", "screen#1", {"L0.query": 8}, seed=cfg.train.seeds[0])
    assert train.finished_epochs_s({"train_wall_s": 900.0, "epoch": 2}) == 900.0
    train.keep_failure(cfg, job, RuntimeError("boom"), train.finished_epochs_s({"train_wall_s": 900.0}), 4, "gpu")
    kept = json.loads((cfg.run_dir / "trials" / f"{job.job_id}.json").read_text())
    assert kept["status"] == "failed" and kept["train_wall_s"] == 900.0 and "job_id" not in kept
    assert kept["device_hours"] == 1.0 and kept["cost_usd"] == 2.5  # 900 s on 4 GPUs at $2.5 per GPU-hour
    (cfg.run_dir / "trials" / f"{job.job_id}.json").unlink()  # the README's retry, which fails again at once
    assert train.finished_epochs_s({}) == train.finished_epochs_s(None) == 0.0  # no epoch reported
    train.keep_failure(cfg, job, RuntimeError("boom"), train.finished_epochs_s({}), 4, "gpu")
    assert [(c["job_id"], c["device_hours"]) for c in report.failed_charges(cfg.run_dir)] == [
        (job.job_id, 1.0), (job.job_id, 0.0)]


@pytest.mark.parametrize("overrides, message", [
    (["train.num_workers=3"], "train.batch_size: 32 does not split into num_workers × grad_accum_steps = 3"),
    (["train.grad_accum_steps=5"], "use a multiple of 5"),
    (["train.grad_accum_steps=0"], "train.grad_accum_steps: 0 is not positive"),
    (["train.max_steps=0"], "train.max_steps: 0 is not positive"),
])
def test_bad_step_settings_name_the_field(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, overrides)


def test_global_batch_splits_over_workers_and_accumulation():
    cfg = load_config(None, ["train.num_workers=2", "train.grad_accum_steps=4"])
    assert cfg.train.batch_size // (cfg.train.num_workers * cfg.train.grad_accum_steps) == 4


@pytest.mark.parametrize("shuffle", [False, True])
def test_an_epoch_over_a_ray_prepared_loader_sees_every_example_once(shuffle):
    """Ray Train's prepared loader restarts on every iter(): an epoch must still be one pass, in order.

    The bug this guards: slicing the prepared loader per step gave every step the same first batch
    under DDP (a DistributedSampler's order is fixed per epoch) and random batches with 1 worker.
    """
    from ray.train.torch.train_loop_utils import _WrappedDataLoader
    from torch.utils.data import DataLoader

    loader = DataLoader(list(range(10)), batch_size=2, shuffle=shuffle, generator=torch.Generator().manual_seed(0))
    prepared = _WrappedDataLoader(loader, torch.device("cpu"), auto_transfer=False)  # what prepare_data_loader returns
    groups = list(accumulation_groups(prepared, 2))
    assert [len(g) for g in groups] == [2, 2, 1]
    seen = [int(x) for group in groups for batch in group for x in batch]
    assert sorted(seen) == list(range(10))


def test_a_restarted_worker_replays_the_epoch_it_resumes():
    """A worker restarted at epoch k builds a fresh loader: its order must be epoch k's, not epoch 0's again."""
    from ray.train.torch.train_loop_utils import _WrappedDataLoader
    from torch.utils.data import DataLoader

    from orchestrator.train import seed_epoch

    def loader(seed):
        plain = DataLoader(list(range(50)), batch_size=50, shuffle=True, generator=torch.Generator().manual_seed(seed))
        return _WrappedDataLoader(plain, torch.device("cpu"), auto_transfer=False)

    def order(prepared, seed, epoch):
        seed_epoch(prepared, seed, epoch)
        return next(iter(prepared)).tolist()

    running = loader(3)
    uninterrupted = [order(running, 3, epoch) for epoch in range(3)]
    assert [order(loader(3), 3, epoch) for epoch in range(3)] == uninterrupted  # each from a fresh (restarted) loader
    assert len({tuple(o) for o in uninterrupted}) == 3
    assert next(iter(loader(3))).tolist() == uninterrupted[0]  # epoch 0 is the seed's order, as it always was
    assert order(loader(0), 0, 1) != order(loader(1), 1, 0)  # seed 0's second epoch is not seed 1's first


def test_a_worker_restarted_from_its_checkpoint_trains_on_bit_for_bit(tiny_model_dir, tiny_split, tmp_path):
    """The loop of train_loop_per_worker, with dropout on (the tiny BERT's 0.1): epoch 2 after a restart from the
    epoch-1 checkpoint gives the weights an uninterrupted worker's epoch 2 gives (dropout's draws included)."""
    from orchestrator.train import _restore, save_checkpoint, seed_epoch

    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"results_dir={tmp_path}", "train.batch_size=8"])
    tokenizer = load_tokenizer(str(tiny_model_dir))

    class Checkpoint:  # what ray.train.get_checkpoint() gives a restarted worker
        def as_directory(self):
            return contextlib.nullcontext(tmp_path)

    def worker(checkpoint=None):  # a worker's start: seed, loader, model, optimizer, schedule, restore
        torch.manual_seed(0)
        loader = make_loader(tiny_split, tokenizer, 32, 8, shuffle=True, seed=0)
        base = load_model(str(tiny_model_dir), 2, seed=0)
        ranks = {m.name: 2 for m in adaptable_modules(base) if m.type in ("query", "value")}
        adapted = build_adapted(cfg, TrainJob("a", "baseline", "uniform_qv", ranks, 0), base, len(loader))
        optimizer = torch.optim.AdamW([p for p in adapted.peft_model.parameters() if p.requires_grad], lr=1e-2)
        scheduler = _linear_warmup_decay(optimizer, 2 * len(loader), 0.06)
        assert _restore(checkpoint, adapted, optimizer, scheduler)[0] == (0 if checkpoint is None else 1)
        return adapted, optimizer, scheduler, loader

    def train_epoch(adapted, optimizer, scheduler, loader, epoch):
        seed_epoch(loader, 0, epoch)
        adapted.peft_model.train()
        steps = range(epoch * len(loader), (epoch + 1) * len(loader))
        for step, group in zip(steps, accumulation_groups(loader, 1)):
            optimizer_step(adapted.peft_model, adapted, group, optimizer, scheduler, step, use_bf16=False)
        return {n: p.detach().clone() for n, p in adapted.peft_model.named_parameters() if p.requires_grad}

    uninterrupted = worker()
    train_epoch(*uninterrupted, 0)
    save_checkpoint(str(tmp_path), *uninterrupted[:3], epochs_done=1, elapsed=0.0, history=[])
    expected = train_epoch(*uninterrupted, 1)
    restarted = train_epoch(*worker(Checkpoint()), 1)
    assert expected.keys() == restarted.keys() and all(torch.equal(expected[n], restarted[n]) for n in expected)


def test_concurrent_trainings_fit_a_single_gpu_node():
    two = TrainConfig(max_concurrent=2)
    assert concurrent_trainings(two, use_gpu=False, cluster_gpus=0, nodes=1) == 2  # CPU: as configured
    assert concurrent_trainings(two, use_gpu=True, cluster_gpus=1, nodes=1) == 1  # the second would wait for the GPU
    assert concurrent_trainings(two, use_gpu=True, cluster_gpus=8, nodes=1) == 2
    assert concurrent_trainings(TrainConfig(max_concurrent=4, num_workers=2), use_gpu=True, cluster_gpus=4, nodes=1) == 2
    assert concurrent_trainings(TrainConfig(num_workers=2), use_gpu=True, cluster_gpus=1, nodes=1) == 1  # never 0
    # may be autoscaled: a waiting training's request is what brings the next GPU node
    assert concurrent_trainings(two, use_gpu=True, cluster_gpus=0, nodes=1) == 2
    assert concurrent_trainings(two, use_gpu=True, cluster_gpus=1, nodes=2) == 2


@pytest.mark.parametrize("train, resources, refused", [
    (dict(num_workers=2, cpus_per_worker=2), {"CPU": 3}, "train.num_workers × train.cpus_per_worker: 2 × 2 CPUs"),
    (dict(num_workers=2, cpus_per_worker=1), {"CPU": 3}, None),  # 2.25 CPUs with the trial's quarter
    (dict(cpus_per_worker=3), {"CPU": 3}, "train.num_workers × train.cpus_per_worker: 1 × 3 CPUs"),
    (dict(use_gpu="true"), {"CPU": 3}, "train.use_gpu: 'true', but Ray sees no GPU on this machine"),
    (dict(num_workers=2), {"CPU": 17, "GPU": 1}, "train.num_workers: 2 workers need a GPU each and this machine has 1; "
                                                 "use train.num_workers=1 or fewer"),
    (dict(num_workers=2, use_gpu="false"), {"CPU": 17, "GPU": 1}, None),  # CPU workers on a GPU machine
    (dict(num_workers=2), {"CPU": 17, "GPU": 2}, None),
])
def test_a_training_the_embedded_cluster_can_never_hold_is_refused(monkeypatch, train, resources, refused):
    """Ray Train would retry the worker group's start every minute, for ever and without a word (README "What
    happens when…"). A remote cluster may be autoscaled: there the request is left to wait."""
    import ray

    from orchestrator.train import check_trainings_fit

    monkeypatch.setattr(ray, "cluster_resources", lambda: resources)
    t = TrainConfig(**train)
    check_trainings_fit(t, embedded=False)
    if refused is None:
        check_trainings_fit(t, embedded=True)
    else:
        with pytest.raises(UserError, match="^" + re.escape(refused)):
            check_trainings_fit(t, embedded=True)


def _report_peak(rank: int, port: int, results) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        value = 100.0 * (rank + 1)
        results[rank] = (_over_workers(value, torch.device("cpu")), _over_workers(value, torch.device("cpu"), mean=True))
    finally:
        torch.distributed.destroy_process_group()


def test_peak_memory_is_the_max_and_train_loss_the_mean_over_workers():
    """Two real gloo workers: each reports the larger peak and the mean loss. (On GPU the tensor goes to the worker's CUDA device,
    since NCCL reduces nothing else: checked on an H200, README "GPU path".)"""
    import torch.multiprocessing as mp

    from orchestrator.pipeline import _free_loopback_port

    results = mp.Manager().dict()
    mp.spawn(_report_peak, args=(_free_loopback_port(), results), nprocs=2)
    assert dict(results) == {0: (200.0, 150.0), 1: (200.0, 150.0)}  # each worker trained on its own shard
    assert _over_workers(7.0, torch.device("cpu"), mean=True) == 7.0  # no process group: the worker's own value


def test_the_epochs_peak_memory_is_read_before_the_inference_measurement_resets_it(tiny_model_dir, tiny_split):
    """The measured inference pass (routing runs) resets the process peak (VmHWM and with it ru_maxrss); the epoch's
    training peak must be read first, or the report shows the inference pass's."""
    adapted = _adapted(tiny_model_dir)
    loader = make_loader(tiny_split, load_tokenizer(str(tiny_model_dir)), 32, 8, shuffle=False)
    spike = torch.ones(300 * 2**20 // 4)  # 300 MiB, mapped and unmapped whole: the peak a training step leaves
    del spike
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    metrics = epoch_metrics(adapted, loader, None, torch.device("cpu"), measure_inference=True)
    assert metrics["peak_memory_mb"] >= peak_mib
    assert metrics["peak_infer_mem_mb"] >= 0 and {"accuracy", "latency_ms_mean"} <= set(metrics)


def test_a_later_epochs_peak_memory_keeps_the_earlier_epochs_peak(tiny_model_dir, tiny_split):
    """The first epoch's measured inference pass reset the process peak: the second epoch's reading alone would miss
    the first epoch's training peak."""
    adapted = _adapted(tiny_model_dir)
    loader = make_loader(tiny_split, load_tokenizer(str(tiny_model_dir)), 32, 8, shuffle=False)
    spike = torch.ones(300 * 2**20 // 4)  # 300 MiB in the first epoch
    del spike
    first = epoch_metrics(adapted, loader, None, torch.device("cpu"), measure_inference=True)
    second = epoch_metrics(adapted, loader, None, torch.device("cpu"), measure_inference=True,
                           peak_before=first["peak_memory_mb"])
    assert second["peak_memory_mb"] >= first["peak_memory_mb"]


def test_kernels_name_the_cpu_the_kernel_isa_mkls_mode_and_the_threads(monkeypatch):
    """What a seed's exact floats depend on beyond versions and data (README "Reproducibility"): the kernel ISA and
    MKL's mode each changed the trained weights in a measured check; the thread count is named because MKL promises
    repeats only at a fixed one (1 and 2 gave the same weights here: benchmarks/reproducibility.py)."""
    monkeypatch.setenv("MKL_CBWR", "AVX2")
    setup = kernels(torch.device("cpu"))
    assert setup.startswith("cpu ") and not setup.startswith("cpu ,")
    assert setup.endswith(f", {torch.backends.cpu.get_cpu_capability()} kernels, MKL_CBWR=AVX2, "
                          f"{torch.get_num_threads()} threads")
    monkeypatch.delenv("MKL_CBWR")
    assert "MKL_CBWR=auto" in kernels(torch.device("cpu"))


def test_an_adalora_worker_restarted_after_pruning_began_continues_exactly(tiny_model_dir, tiny_split, tmp_path):
    """The checkpoint keeps AdaLoRA's untrimmed weights, rank pattern and importance averages: a fresh worker that
    loads it takes the same next steps as the worker that wrote it (PEFT's own adapter file is cut to the pruned
    ranks, which a fresh AdaLoRA model cannot load)."""
    cfg = load_config(None, [f"model.name={tiny_model_dir}", f"results_dir={tmp_path}", "name=unit", "train.epochs=3"])
    batches = list(make_loader(tiny_split, load_tokenizer(str(tiny_model_dir)), 32, 4, shuffle=False))

    def fresh_worker():
        base = load_model(str(tiny_model_dir), 2, seed=0)
        allocation = baseline_allocations(adaptable_modules(base), Budget(2048, 0.05), ["uniform_qv"])["uniform_qv"]
        adapted = build_adapted(cfg, TrainJob("adalora", "baseline", "adalora", allocation.as_dict(), 0, method="adalora"),
                                base,
                                steps_per_epoch=10)
        adapted.peft_model.eval()  # no dropout: both workers must compute the same function
        optimizer = torch.optim.AdamW([p for p in adapted.peft_model.parameters() if p.requires_grad], lr=1e-2)
        return adapted, optimizer, _linear_warmup_decay(optimizer, 30, 0.1)

    def train(worker, steps):
        adapted, optimizer, scheduler = worker
        for step in steps:
            optimizer_step(adapted.peft_model, adapted, [batches[step % len(batches)]], optimizer, scheduler, step,
                           use_bf16=False)

    first = fresh_worker()
    train(first, range(12))  # 30 steps planned: pruning runs from step 4 (tinit 3) to step 24
    tuner = first[0].peft_model.base_model
    assert not all(all(kept) for kept in tuner.peft_config["default"].rank_pattern.values())  # pruning has begun
    first[0].save(str(tmp_path))
    optimizer_state, scheduler_state = copy.deepcopy(first[1].state_dict()), first[2].state_dict()  # not live tensors

    restarted = fresh_worker()
    restarted[0].load(str(tmp_path))
    restarted[1].load_state_dict(optimizer_state)
    restarted[2].load_state_dict(scheduler_state)
    train(first, range(12, 30))
    train(restarted, range(12, 30))
    assert restarted[0].peft_model.base_model.peft_config["default"].rank_pattern == tuner.peft_config["default"].rank_pattern
    for (name, param), again in zip(first[0].peft_model.named_parameters(), restarted[0].peft_model.parameters()):
        assert torch.equal(param, again), name


@pytest.mark.parametrize("major, minor, bf16", [(7, 5, False), (7, 0, False), (8, 0, True), (9, 0, True)])
def test_bf16_only_on_gpus_with_bf16_kernels(monkeypatch, major, minor, bf16):
    """A T4 (7.5) or V100 (7.0) can hold bf16 tensors, so torch.cuda.is_bf16_supported() says yes, but it only
    emulates bf16 arithmetic (slowly): those train in fp32."""
    from types import SimpleNamespace

    from orchestrator.train import trains_in_bf16

    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(major=major, minor=minor))
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda device: True)  # what a T4 answers
    assert trains_in_bf16(torch.device("cuda", 0)) is bf16
    assert trains_in_bf16(torch.device("cpu")) is False
