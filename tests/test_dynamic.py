"""Dynamic re-allocation: rank moves during training, the budget holds, masked columns stay dead."""

import numpy as np
import pytest
import torch

from orchestrator.allocation import Allocation, apply_lora
from orchestrator.allocators import Budget
from orchestrator.data import make_loader
from orchestrator.dynamic import DynamicReallocator, full_rank_allocation
from orchestrator.models import adaptable_modules, load_model, load_tokenizer
from orchestrator.proxies.grad_norm import lora_factors


def _setup(tiny_model_dir, tiny_split, allocator="knapsack", total_steps=100, epoch_steps=100):
    base = load_model(str(tiny_model_dir), 2, seed=0)
    modules = adaptable_modules(base)
    q = next(m for m in modules if m.type == "query")
    initial = Allocation.from_ranks({q.name: 2})
    budget = Budget(initial.trainable_params(modules), 0.0)  # exactly one rank-2 attention-sized module
    model = apply_lora(base, full_rank_allocation(modules, 2))
    dynamic = DynamicReallocator(model, modules, [1, 2], budget, initial, interval_steps=2, epoch_steps=epoch_steps,
                                 total_steps=total_steps, allocator=allocator, sign=1.0, seed=0)
    loader = make_loader(tiny_split, load_tokenizer(str(tiny_model_dir)), 32, 8, shuffle=True)
    return model, modules, budget, dynamic, loader


def _train(model, dynamic, loader, steps, weight_decay=0.0):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=5e-2, weight_decay=weight_decay)
    for step, batch in zip(range(steps), loader):
        model(**batch).loss.backward()
        dynamic.after_backward()
        optimizer.step()
        dynamic.after_step(step, optimizer)
        optimizer.zero_grad(set_to_none=True)
    return optimizer


def test_masked_columns_stay_zero_and_budget_holds(tiny_model_dir, tiny_split):
    model, modules, budget, dynamic, loader = _setup(tiny_model_dir, tiny_split)
    _train(model, dynamic, loader, steps=6)
    assert dynamic.reallocations == 3
    assert budget.admits(dynamic.allocation.trainable_params(modules))
    for m in modules:
        _, b = lora_factors(model, m.name)
        assert torch.count_nonzero(b[:, dynamic.active[m.name]:]) == 0, m.name


def test_weight_decay_does_not_shrink_the_rows_of_a_that_feed_masked_columns(tiny_model_dir, tiny_split):
    """Masked rows of A get no gradient, but AdamW's decoupled decay shrinks them: a column switched on later would
    start from a shrunken A. They are put back as they were when they went off."""
    model, modules, _, dynamic, loader = _setup(tiny_model_dir, tiny_split)
    dynamic.interval = 10**6  # no re-allocation: every module but the initial query stays off throughout
    initial = {m.name: lora_factors(model, m.name)[0].detach().clone() for m in modules}
    _train(model, dynamic, loader, steps=4, weight_decay=0.1)
    off = [m.name for m in modules if dynamic.active[m.name] == 0]
    assert len(off) == len(modules) - 1
    for name in off:
        assert torch.equal(lora_factors(model, name)[0], initial[name]), name
    on = next(m.name for m in modules if dynamic.active[m.name])
    assert not torch.equal(lora_factors(model, on)[0], initial[on])  # the live one trains (and decays)

    model, modules, _, dynamic, loader = _setup(tiny_model_dir, tiny_split)  # with re-allocations
    _train(model, dynamic, loader, steps=6, weight_decay=0.1)
    assert dynamic.reallocations > 0
    for m in modules:  # every masked row as it was when its column went off
        a, _ = lora_factors(model, m.name)
        assert torch.equal(a[dynamic.active[m.name]:], dynamic.parked_a[m.name][dynamic.active[m.name]:]), m.name


def test_no_step_that_ends_an_epoch_reallocates(tiny_model_dir, tiny_split):
    """A re-allocation there would zero trained columns and switch on untrained ones, then the epoch's eval (early
    stopping's signal) and checkpoint would see that model."""
    model, modules, budget, dynamic, loader = _setup(tiny_model_dir, tiny_split, total_steps=6)
    _train(model, dynamic, loader, steps=6)
    assert dynamic.reallocations + dynamic.held == 2  # after steps 2 and 4, not after the last, 6
    model, modules, budget, dynamic, loader = _setup(tiny_model_dir, tiny_split, total_steps=8, epoch_steps=4)
    _train(model, dynamic, loader, steps=8)
    assert dynamic.reallocations + dynamic.held == 2  # after steps 2 and 6: 4 and 8 end epochs


def test_masked_model_computes_what_the_current_allocation_would(tiny_model_dir, tiny_split):
    model, modules, _, dynamic, loader = _setup(tiny_model_dir, tiny_split)
    _train(model, dynamic, loader, steps=4)
    static = apply_lora(load_model(str(tiny_model_dir), 2, seed=0), dynamic.allocation)
    with torch.no_grad():  # copy the live columns of every active module, and the trained head
        for name, rank in dynamic.allocation.ranks:
            a, b = lora_factors(model, name)
            sa, sb = lora_factors(static, name)
            sa.copy_(a[:rank]), sb.copy_(b[:, :rank])
        live = {k: v for k, v in model.state_dict().items() if "classifier" in k}
        static.load_state_dict(live, strict=False)
    model.eval(), static.eval()
    batch = next(iter(loader))
    batch.pop("labels")
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, static(**batch).logits, atol=1e-5)


def test_rank_moves_to_the_modules_the_scores_favour(tiny_model_dir, tiny_split):
    model, modules, budget, dynamic, _ = _setup(tiny_model_dir, tiny_split)
    value = next(m for m in modules if m.type == "value")
    dynamic.scores = {m.name: (10.0 if m.name == value.name else 0.1) for m in modules}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])
    dynamic.reallocate(optimizer)
    assert dynamic.active[value.name] == 2 and sum(np.array(list(dynamic.active.values())) > 0) == 1
    assert dynamic.moved_rank == 4  # query 2 → 0, value 0 → 2


def _favour_value(model, modules, dynamic):
    value = next(m for m in modules if m.type == "value")
    dynamic.scores = {m.name: (10.0 if m.name == value.name else 0.1) for m in modules}
    return value, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad])


def test_trust_region_holds_a_move_that_is_too_large(tiny_model_dir, tiny_split):
    model, modules, _, dynamic, _ = _setup(tiny_model_dir, tiny_split)
    before = dict(dynamic.active)
    dynamic.max_move = 0.4  # query 2 → value 2 moves a share 4 / (2 + 2) = 1; query 1 + value 1 moves 0.5
    value, optimizer = _favour_value(model, modules, dynamic)
    dynamic.reallocate(optimizer)
    assert dynamic.active == before and (dynamic.held, dynamic.reallocations, dynamic.moved_rank) == (1, 0, 0)
    assert all(v == 0.0 for v in dynamic.scores.values())  # each interval scores afresh
    dynamic.max_move = 0.5  # now the half move fits, the full swap still does not
    _favour_value(model, modules, dynamic)
    dynamic.reallocate(optimizer)
    query = next(name for name, rank in before.items() if rank)
    assert (dynamic.active[query], dynamic.active[value.name], dynamic.moved_rank) == (1, 1, 2)


def test_min_gain_holds_a_move_that_gains_too_little(tiny_model_dir, tiny_split):
    model, modules, _, dynamic, _ = _setup(tiny_model_dir, tiny_split)
    value, optimizer = _favour_value(model, modules, dynamic)
    dynamic.min_gain = 100.0  # value's 10 × 2 is 100× query's 0.1 × 2: not more than 100× better
    dynamic.reallocate(optimizer)
    assert dynamic.held == 1 and dynamic.active[value.name] == 0
    _favour_value(model, modules, dynamic)
    dynamic.min_gain = 98.0
    dynamic.reallocate(optimizer)
    assert dynamic.reallocations == 1 and dynamic.active[value.name] == 2


def test_moved_fraction():
    from orchestrator.dynamic import moved_fraction, moved_rank

    assert moved_rank({"a": 4, "b": 4}, {"a": 4, "c": 4}) == 8
    assert moved_fraction({"a": 4, "b": 4}, {"a": 4, "c": 4}) == 0.5
    assert moved_fraction({"a": 4}, {"a": 4}) == 0.0 and moved_fraction({"a": 2}, {"b": 2}) == 1.0


def test_a_restarted_worker_goes_on_as_if_it_had_not_stopped(tiny_model_dir, tiny_split):
    """The checkpoint keeps the re-allocator's whole state (JSON, as train.py stores it): ranks, scores, the
    sampler and the counters the report shows, which a restart used to set back to 0."""
    import json

    model, _, _, dynamic, loader = _setup(tiny_model_dir, tiny_split, allocator="top_p")
    _train(model, dynamic, loader, steps=6)
    assert dynamic.reallocations + dynamic.held > 0
    saved = json.loads(json.dumps(dynamic.state()))
    _, _, _, restarted, _ = _setup(tiny_model_dir, tiny_split, allocator="top_p")
    restarted.load_state(saved)
    assert restarted.state() == saved
    assert restarted.rng.random() == dynamic.rng.random()  # the next draw is the one the first worker would make


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_a_column_switched_on_late_steps_as_a_fresh_adamw_would(tiny_model_dir, tiny_split, weight_decay):
    """Its moments start empty at step t0 while AdamW bias-corrects by the tensor's step count t: at t = 6 its
    first step was half a fresh AdamW's, and at t = 2,000 its tenth six times larger. Its steps now follow an
    AdamW of its own, replayed here on the gradients it got."""
    model, modules, _, dynamic, loader = _setup(tiny_model_dir, tiny_split)
    dynamic.interval = 10**6  # only the move below
    other = next(m.name for m in modules if m.type == "value")
    lr, (beta1, beta2), eps = 5e-2, (0.9, 0.999), 1e-12  # the rescale is exact up to eps; some gradients here are 1e-6
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, eps=eps,
                                  weight_decay=weight_decay)
    batches = iter(loader)
    grads = []
    for step in range(8):
        model(**next(batches)).loss.backward()
        dynamic.after_backward()
        if step >= 5:
            grads.append(lora_factors(model, other)[1].grad[:, :2].clone())
        optimizer.step()
        dynamic.after_step(step, optimizer)
        optimizer.zero_grad(set_to_none=True)
        if step == 4:
            dynamic.move_to({name: 0 for name in dynamic.active} | {other: 2}, optimizer)
    assert dynamic.live_since[other] == [5, 5]
    m = v = want = torch.zeros_like(grads[0])  # B of a switched-on column starts at 0
    for k, g in enumerate(grads, start=1):
        m, v = beta1 * m + (1 - beta1) * g, beta2 * v + (1 - beta2) * g * g
        want = want * (1 - lr * weight_decay) - lr * (m / (1 - beta1 ** k)) / ((v / (1 - beta2 ** k)).sqrt() + eps)
    torch.testing.assert_close(lora_factors(model, other)[1][:, :2], want, rtol=1e-4, atol=1e-7)


def test_the_late_columns_rescale_stays_on_the_parameters_device():
    """On a GPU the factors live on CUDA: rescaling tensors built on the CPU failed the first step after a late
    switch-on ("Expected all tensors to be on the same device"). The meta device stands in for CUDA here."""
    from types import SimpleNamespace

    a = torch.nn.Parameter(torch.zeros(2, 8, device="meta"))
    b = torch.nn.Parameter(torch.zeros(8, 2, device="meta"))
    optimizer = SimpleNamespace(param_groups=[{"betas": (0.9, 0.999), "lr": 1e-3, "weight_decay": 0.0}],
                                state={b: {"step": torch.tensor(6.0)}})
    dynamic = SimpleNamespace(factors={"m": (a, b)}, live_since={"m": [0, 5]}, active={"m": 2},
                              before_step={"m": (a.detach().clone(), b.detach().clone())})
    DynamicReallocator._correct_late_columns(dynamic, optimizer)
    assert dynamic.before_step == {}
