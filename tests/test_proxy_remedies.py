"""LoRA-specific proxy remedies (issue #4): the probe's warm-up and per-module normalisation, on the tiny BERT."""

from __future__ import annotations

import math
from itertools import islice

import pytest
import torch

from orchestrator.allocation import Allocation, apply_lora
from orchestrator.data import make_loader
from orchestrator.models import load_model, load_tokenizer
from orchestrator.proxies import get_proxy, normalise, score_modules
from orchestrator.proxies.grad_norm import lora_factors
from orchestrator.proxies.probe import warm_up
from orchestrator.proxies.scoring import perturbed_b
from orchestrator.proxies.vote import normalised_ranks, rank_average

PROBE = dict(probe_rank=4, num_batches=3, batch_size=8, max_length=32, seed=7)


def probe_model(model_dir, modules, seed=PROBE["seed"]):
    torch.manual_seed(seed)
    return apply_lora(load_model(str(model_dir), 2, seed), Allocation.from_ranks({m.name: PROBE["probe_rank"] for m in modules}))


def probe_batches(model_dir, split, count, seed=PROBE["seed"]):
    loader = make_loader(split, load_tokenizer(str(model_dir)), PROBE["max_length"], PROBE["batch_size"], shuffle=True, seed=seed)
    return list(islice(loader, count))


@pytest.mark.parametrize("proxy", ["grad_norm", "snip", "fisher"])
def test_zero_warmup_is_the_old_probe_exactly(proxy, tiny_model_dir, tiny_modules, tiny_split):
    """warmup_steps=0 scores the same batches on the same untouched probe as before the option existed."""
    model = probe_model(tiny_model_dir, tiny_modules)
    batches = probe_batches(tiny_model_dir, tiny_split, PROBE["num_batches"])
    torch.manual_seed(PROBE["seed"])
    expected = get_proxy(proxy).module_scores(model, batches, tiny_modules, PROBE["probe_rank"])
    got = score_modules(str(tiny_model_dir), 2, tiny_split, tiny_modules, [proxy], warmup_steps=0, **PROBE)
    assert got.unit[proxy] == expected  # bit-identical
    assert got.warmup_seconds == 0.0


def test_warm_up_trains_the_probe_deterministically(tiny_model_dir, tiny_modules, tiny_split):
    batches = probe_batches(tiny_model_dir, tiny_split, 6)[3:]  # the batches after the scored ones
    models = [probe_model(tiny_model_dir, tiny_modules) for _ in range(2)]
    before = {k: v.clone() for k, v in models[0].state_dict().items()}
    for model in models:
        model.eval()
        torch.manual_seed(PROBE["seed"])
        warm_up(model, batches, lr=2e-3)
        assert not model.training  # flags restored
    after = [m.state_dict() for m in models]
    assert all(torch.equal(after[0][k], after[1][k]) for k in after[0])  # same seed → same weights, bit for bit
    for m in tiny_modules:
        a, b = lora_factors(models[0], m.name)
        assert b.abs().sum() > 0, "B left zero"
        assert not torch.equal(a, before[next(k for k in before if m.name in k and "lora_A" in k)])
    frozen = [k for k, _ in models[0].named_parameters() if "lora_" not in k and "classifier" not in k]
    assert frozen and all(k in before and torch.equal(after[0][k], before[k]) for k in frozen)  # base untouched


def test_score_modules_warmup_changes_scores_and_is_deterministic(tiny_model_dir, tiny_modules, tiny_split):
    cold = score_modules(str(tiny_model_dir), 2, tiny_split, tiny_modules, ["grad_norm"], **PROBE)
    warm = [score_modules(str(tiny_model_dir), 2, tiny_split, tiny_modules, ["grad_norm"], warmup_steps=3, **PROBE)
            for _ in range(2)]
    assert warm[0].unit == warm[1].unit
    assert warm[0].unit["grad_norm"] != cold.unit["grad_norm"]
    assert warm[0].warmup_seconds > 0


def test_perturbation_only_touches_zero_b(tiny_model_dir, tiny_modules):
    model = probe_model(tiny_model_dir, tiny_modules)
    trained, untouched = tiny_modules[0].name, tiny_modules[1].name
    _, b_trained = lora_factors(model, trained)
    with torch.no_grad():
        b_trained.fill_(0.5)
    with perturbed_b(model, tiny_modules, seed=0):
        assert torch.all(b_trained == 0.5)  # a trained B is scored as it is
        assert lora_factors(model, untouched)[1].abs().sum() > 0  # a zero B gets the perturbation
    assert torch.all(b_trained == 0.5) and not lora_factors(model, untouched)[1].any()  # restored


def test_normalisations_by_hand(tiny_modules):
    # tiny BERT: hidden 32, intermediate 64 → params_per_rank 64 (q, k, v, attention.output.dense), 96 (FFN)
    scores = {m.name: float(10 * m.layer + i) for i, m in enumerate(tiny_modules)}
    q0, q1 = (next(m for m in tiny_modules if m.type == "query" and m.layer == layer) for layer in (0, 1))
    ffn = next(m for m in tiny_modules if m.type == "intermediate.dense" and m.layer == 0)
    assert normalise(scores, tiny_modules, "none") == scores
    per_param = normalise(scores, tiny_modules, "per_param")
    assert per_param[q0.name] == scores[q0.name] / 64 and per_param[ffn.name] == scores[ffn.name] / 96
    ranks = normalise(scores, tiny_modules, "rank")  # 12 distinct scores → ranks 0, 1/11, …, 1
    assert ranks[min(scores, key=scores.get)] == 0.0 and ranks[max(scores, key=scores.get)] == 1.0
    assert sorted(ranks.values()) == pytest.approx([i / 11 for i in range(12)])
    z = normalise(scores, tiny_modules, "type_z")  # two layers per type, 10 apart → z = ∓1
    assert z[q0.name] == pytest.approx(-1.0) and z[q1.name] == pytest.approx(1.0)
    assert normalise({n: 3.0 for n in scores}, tiny_modules, "type_z") == {n: 0.0 for n in scores}
    # 0.1 + 0.1 + 0.1 rounds: a mean off in the last bit made every member z = ±1 (nwot gives shortcut sites one value)
    assert normalise({n: 0.1 for n in scores}, tiny_modules * 3, "type_z") == {n: 0.0 for n in scores}
    with pytest.raises(ValueError, match="unknown normalisation"):
        normalise(scores, tiny_modules, "softmax")


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_non_finite_score_stays_nan_and_the_others_keep_their_order(tiny_modules, bad):
    """One overflowed score must neither zero its whole type (type_z's mean) nor rank first (+inf in `rank`): it
    stays NaN, which the allocators put below every finite score in either direction."""
    scores = {m.name: float(10 * m.layer + i) for i, m in enumerate(tiny_modules)}
    q0, q1 = (next(m for m in tiny_modules if m.type == "query" and m.layer == layer) for layer in (0, 1))
    k0, k1 = (next(m for m in tiny_modules if m.type == "key" and m.layer == layer) for layer in (0, 1))
    clean = {how: normalise(scores, tiny_modules, how) for how in ("rank", "type_z")}
    scores[q0.name] = bad
    for how in ("rank", "type_z"):
        normalised = normalise(scores, tiny_modules, how)
        assert math.isnan(normalised[q0.name]), how
        assert normalised[k0.name] < normalised[k1.name]  # the other modules keep their order
    assert normalise(scores, tiny_modules, "type_z")[k1.name] == clean["type_z"][k1.name]  # its type's stats ignore it
    assert normalise(scores, tiny_modules, "type_z")[q1.name] == 0.0  # the only finite query left


def test_vote_ranks_every_non_finite_score_lowest():
    assert normalised_ranks({"a": math.inf, "b": 1.0, "c": 2.0}) == {"a": 0.0, "b": 0.5, "c": 1.0}
    assert rank_average({"-fisher": {"a": -math.inf, "b": 1.0, "c": 2.0}}) == {"a": 0.0, "b": 1.0, "c": 0.5}


def test_probe_warmup_steps_validated():
    from orchestrator.config import ScreenConfig
    from orchestrator.errors import UserError

    assert ScreenConfig().probe_warmup_steps == 0  # default: PEFT's init, as before
    assert ScreenConfig(probe_warmup_steps=25).probe_warmup_steps == 25
    with pytest.raises(UserError, match="screen.probe_warmup_steps"):
        ScreenConfig(probe_warmup_steps=-1)


def test_score_modules_normalisation(tiny_model_dir, tiny_modules, tiny_split):
    """The probe's normalisation is `normalise` on the raw scores; `params` stays the parameter count."""
    raw = score_modules(str(tiny_model_dir), 2, tiny_split, tiny_modules, ["grad_norm", "params"], **PROBE)
    ranked = score_modules(str(tiny_model_dir), 2, tiny_split, tiny_modules, ["grad_norm", "params"],
                           normalisation="rank", **PROBE)
    assert ranked.unit["grad_norm"] == normalise(raw.unit["grad_norm"], tiny_modules, "rank")
    assert ranked.unit["params"] == raw.unit["params"]


def test_proxy_normalisation_validated():
    from orchestrator.config import ScreenConfig
    from orchestrator.errors import UserError

    assert ScreenConfig().proxy_normalisation == "none"
    with pytest.raises(UserError, match="screen.proxy_normalisation: 'softmax' is unknown; choose from none, per_param"):
        ScreenConfig(proxy_normalisation="softmax")
