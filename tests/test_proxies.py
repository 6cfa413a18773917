"""Zero-cost proxies on the tiny BERT: exact `params`, `grad_norm` against a hand-written autograd
computation, determinism, the B = 0 start of LoRA, and candidate scores as Σ r · unit."""

from __future__ import annotations

from itertools import islice

import pytest
import torch

from orchestrator.allocation import Allocation, apply_lora
from orchestrator.data import make_loader
from orchestrator.errors import UserError
from orchestrator.models import load_model, load_tokenizer
from orchestrator.proxies import PROXIES, ModuleScores, get_proxy, score_modules
from orchestrator.proxies.grad_norm import lora_factors

PROBE = dict(probe_rank=4, num_batches=3, batch_size=8, max_length=32, seed=7)


@pytest.fixture(scope="module")
def scores(tiny_model_dir, tiny_modules, sentences):
    from orchestrator.data import Split

    split = Split(*map(list, sentences))
    return score_modules(str(tiny_model_dir), 2, split, tiny_modules, ["grad_norm", "params"], **PROBE)


def test_registry():
    assert {"grad_norm", "params"} <= set(PROXIES)
    assert get_proxy("params").needs_model is False
    assert get_proxy("grad_norm").needs_model is True
    with pytest.raises(UserError, match=r"unknown proxy 'no_such_proxy'; choose from \["):
        get_proxy("no_such_proxy")


def test_params_proxy_exact(scores, tiny_modules):
    assert scores.unit["params"] == {m.name: float(m.in_features + m.out_features) for m in tiny_modules}
    assert sorted(set(scores.unit["params"].values())) == [64.0, 96.0]
    allocation = Allocation.from_ranks({tiny_modules[0].name: 4, tiny_modules[5].name: 2})
    assert scores.score("params", allocation) == 4 * 64 + 2 * 96 == allocation.trainable_params(tiny_modules)


def test_grad_norm_matches_manual_autograd(scores, tiny_model_dir, tiny_modules, sentences):
    """Rebuild the probe exactly as score_modules does, then take the gradients with torch.autograd.grad."""
    from orchestrator.data import Split

    seed, rank, num_batches = PROBE["seed"], PROBE["probe_rank"], PROBE["num_batches"]
    torch.manual_seed(seed)
    model = apply_lora(load_model(str(tiny_model_dir), 2, seed), Allocation.from_ranks({m.name: rank for m in tiny_modules}))
    loader = make_loader(Split(*map(list, sentences)), load_tokenizer(str(tiny_model_dir)), PROBE["max_length"],
                         PROBE["batch_size"], shuffle=True, seed=seed)
    batches = list(islice(loader, num_batches))
    assert len(batches) == num_batches

    layers = {m.name: model.base_model.model.get_submodule(m.name) for m in tiny_modules}
    factors = [(name, layer.lora_A["default"].weight, layer.lora_B["default"].weight) for name, layer in layers.items()]
    assert all(a.shape == (rank, a.shape[1]) and b.shape == (b.shape[0], rank) for _, a, b in factors)

    expected = {name: 0.0 for name in layers}
    torch.manual_seed(seed)  # score_modules reseeds before each proxy: dropout masks must match
    model.train()
    for batch in batches:
        loss = model(**batch).loss
        grads = torch.autograd.grad(loss, [w for _, a, b in factors for w in (a, b)])
        for i, (name, _, _) in enumerate(factors):
            grad_a, grad_b = grads[2 * i], grads[2 * i + 1]
            expected[name] += (grad_a.double() ** 2).sum().item() + (grad_b.double() ** 2).sum().item()
    expected = {name: total / (num_batches * rank) for name, total in expected.items()}

    got = scores.unit["grad_norm"]
    assert set(got) == set(expected)
    for name in expected:
        assert got[name] == pytest.approx(expected[name], rel=1e-5, abs=0), name


def test_score_modules_deterministic(scores, tiny_model_dir, tiny_modules, tiny_split):
    again = score_modules(str(tiny_model_dir), 2, tiny_split, tiny_modules, ["grad_norm", "params"], **PROBE)
    assert again.unit == scores.unit  # bit-identical, not approximately equal
    assert set(again.seconds) == {"grad_norm", "params"}
    assert all(s >= 0 for s in again.seconds.values())


def test_score_modules_seed_matters(scores, tiny_model_dir, tiny_modules, tiny_split):
    other = score_modules(str(tiny_model_dir), 2, tiny_split, tiny_modules, ["grad_norm"], **(PROBE | {"seed": 8}))
    assert other.unit["grad_norm"] != scores.unit["grad_norm"]


def test_grad_norm_with_b_zero(tiny_model_dir, tiny_modules, tiny_split):
    """PEFT starts lora_B at 0, so ∂L/∂A = 0; ∂L/∂B ≠ 0 carries the signal for every module."""
    torch.manual_seed(0)
    model = apply_lora(load_model(str(tiny_model_dir), 2, 0), Allocation.from_ranks({m.name: 2 for m in tiny_modules}))
    for m in tiny_modules:
        a, b = lora_factors(model, m.name)
        assert torch.count_nonzero(b) == 0, m.name
        assert torch.count_nonzero(a) > 0, m.name
    batches = list(islice(make_loader(tiny_split, load_tokenizer(str(tiny_model_dir)), 32, 8, shuffle=False), 2))

    unit = get_proxy("grad_norm").module_scores(model, batches, tiny_modules, 2)
    assert set(unit) == {m.name for m in tiny_modules}
    assert all(value > 0 for value in unit.values()), unit
    assert len(set(unit.values())) == len(unit)  # not all equal: every module gets its own score
    # the proxy leaves no gradients behind and does not train the probe
    for m in tiny_modules:
        a, b = lora_factors(model, m.name)
        assert a.grad is None and b.grad is None
        assert torch.count_nonzero(b) == 0

    # at B = 0 the A gradient is exactly zero: all of the score comes from B
    model.zero_grad(set_to_none=True)
    model(**batches[0]).loss.backward()
    for m in tiny_modules:
        a, b = lora_factors(model, m.name)
        assert torch.count_nonzero(a.grad) == 0
        assert b.grad.pow(2).sum() > 0


def test_candidate_score_is_rank_weighted_sum(scores, tiny_modules):
    names = [m.name for m in tiny_modules]
    ranks = {names[0]: 4, names[3]: 1, names[5]: 16, names[10]: 2}
    allocation = Allocation.from_ranks(ranks)
    for proxy in ("grad_norm", "params"):
        expected = sum(r * scores.unit[proxy][name] for name, r in ranks.items())
        assert scores.score(proxy, allocation) == pytest.approx(expected, rel=1e-12)
    assert scores.scores(allocation) == {"grad_norm": scores.score("grad_norm", allocation),
                                         "params": 4 * 64 + 64 + 16 * 96 + 2 * 96}


def test_module_scores_golden_arithmetic():
    unit = ModuleScores({"params": {"x": 10.0, "y": 3.0, "z": 100.0}, "grad_norm": {"x": 0.5, "y": 2.0, "z": 0.0}})
    allocation = Allocation.from_ranks({"x": 2, "y": 3, "z": 0})
    assert unit.score("params", allocation) == 29.0
    assert unit.scores(allocation) == {"params": 29.0, "grad_norm": 7.0}
    # doubling every rank doubles the score (linear in rank)
    assert unit.score("grad_norm", Allocation.from_ranks({"x": 4, "y": 6})) == 14.0
